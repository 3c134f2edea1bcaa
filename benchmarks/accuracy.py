"""The accuracy protocol: grouped, stratified 5-fold cross-validation x 3 seeds on KRD-WBC.

    .venv/bin/python benchmarks/accuracy.py [--dataset runs/dataset] [--lab KRD-WBC]
                                            [--seeds 3] [--folds 5]

On the dataset's KRD-WBC rows by default (``make demo``'s dataset holds two labs; the
cross-lab protocol is ``benchmarks/crosslab.py``); ``--lab ''`` takes every lab.

Prints, for the original test images and for rescaled (0.75, 1.33), stain-shifted and
cell-at-the-frame-edge copies: accuracy, balanced accuracy, macro-F1, ECE (15 bins) and
per-class recall as means with 95% intervals over the runs, how often other classes' images
are called each class, and the pooled out-of-fold report (per-class precision/recall with
Wilson intervals, confusion matrix) for each seed; then where the class activation maps lie
against the masks, the share of crops reaching outside their image per class, and the cell
locator's IoU. ``--tta`` adds the original images averaged over their eight flips/rotations.
Uses the training job's recipe (wbc_spark.train) in one process; the frozen layers' outputs
are cached once for all runs. If the dataset is missing it is ingested first with
deploy/submit.sh.
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from wbc_spark.evaluation import crossval
from wbc_spark.augment import AugmentSettings
from wbc_spark.config import load_config
from wbc_spark.preprocessing import Preprocessing
from wbc_spark.evaluation.activation_maps import overlay_png
from wbc_spark.model.transfer import build_classifier
from wbc_spark.model.weights import load_pretrained
from wbc_spark.train import Recipe
from wbc_spark.transforms import dihedral

REPO = Path(__file__).resolve().parents[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(REPO / "conf" / "local.yaml"))
    parser.add_argument("--dataset", default=None, help="ingested dataset (default: config's)")
    parser.add_argument("--lab", default="KRD-WBC",
                        help="the dataset's lab (source) to cross-validate on; '' for all")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-shifts", action="store_true", help="skip the robustness copies")
    parser.add_argument("--tta", action="store_true",
                        help="also score the original test images averaged over their eight "
                             "flips/rotations (variant original_tta; about +90 s)")
    parser.add_argument("--json", default=str(REPO / "runs" / "accuracy.json"))
    parser.add_argument("--cache", default=None,
                        help="file to keep the frozen-layer features in; reused when present "
                             "(they depend only on the data, the weights and train.views)")
    parser.add_argument("--figure", default=str(REPO / "runs" / "where_it_looks.png"))
    parser.add_argument("overrides", nargs="*", help="section.key=value for the recipe")
    args = parser.parse_args()
    crossval.benchmark_process(args.threads)
    config = load_config(args.config, args.overrides)
    dataset = args.dataset or config.data.dataset
    if not Path(dataset).exists():
        subprocess.run(["bash", str(REPO / "deploy" / "submit.sh"), "ingest", "--config",
                        args.config, f"data.dataset={dataset}"], check=True, cwd=REPO)
    start = time.perf_counter()
    classes = list(config.classes)
    df = crossval.load_dataset(dataset, classes, Preprocessing.from_config(config))
    if args.lab:
        if args.lab not in set(df.source):
            raise SystemExit(f"{dataset}: no labelled images of lab {args.lab!r} (labs: "
                             f"{', '.join(sorted(set(df.source)))})")
        df = df[df.source == args.lab].reset_index(drop=True)
    labels = df.label.map({c: i for i, c in enumerate(classes)}).to_numpy()
    meta = df[["image_id", "label", "group", "sha256", "source"]]
    pretrained = load_pretrained(config.model.source, config.model.weights_dir or None)
    model = build_classifier(pretrained, len(classes), freeze_until=config.model.freeze_until,
                             dropout=config.model.dropout)
    crops = crossval.crops_of(df)
    size = crops.shape[1]
    t = config.train
    key = {"views": t.views, "freeze_until": config.model.freeze_until,
           "frozen_precision": t.frozen_precision,
           "augment": dict(config.augment.__dict__),
           "ids": df.image_id.tolist(), "shifts": not args.no_shifts, "tta": args.tta}
    cached = torch.load(args.cache, weights_only=True) if args.cache and Path(
        args.cache).exists() else None
    if cached is not None and cached["key"] == key:
        view_feats, eval_feats = cached["views"], cached["eval"]
        logging.info("reusing the feature cache %s", args.cache)
    else:
        view_feats = crossval.augmented_view_features(
            model, crops, t.views, seed=1234,
            settings=AugmentSettings(**config.augment.__dict__), precision=t.frozen_precision)
        eval_feats = {"original": crossval.features_of(model, crops, t.frozen_precision)}
        if args.tta:
            eval_feats["original_tta"] = torch.stack([crossval.features_of(
                model, dihedral(crops, k), t.frozen_precision) for k in range(8)])
            logging.info("cached the eight flips/rotations of the test images")
        if not args.no_shifts:
            for name, shift in crossval.SHIFTS.items():
                eval_feats[name] = crossval.features_of(model, crossval.shifted_crops(
                    df, shift, Preprocessing.from_config(config)), t.frozen_precision)
                logging.info("cached test variant %s", name)
        if args.cache:
            torch.save({"key": key, "views": view_feats, "eval": eval_feats}, args.cache)
    cache_seconds = time.perf_counter() - start
    results = []
    for seed in range(args.seeds):
        recipe = Recipe.from_config(t)
        recipe = Recipe(**{**recipe.__dict__, "seed": seed})
        for fold in range(args.folds):
            r = crossval.run_fold(model, view_feats, eval_feats, labels, meta, recipe,
                                  folds=args.folds, fold=fold, val_fraction=t.val_fraction,
                                  num_classes=len(classes))
            f1 = crossval.metrics.macro_f1(labels[r.test_index],
                                           r.probs["original"].argmax(1), len(classes))
            logging.info("seed %d fold %d: test macro-F1 %.3f (best epoch %d, T %.2f, %.0f s)",
                         seed, fold, f1, r.best_epoch, r.temperature, r.seconds)
            results.append(r)
    summary = crossval.summarise(results, labels, classes)
    wall = time.perf_counter() - start
    print(crossval.format_summary(summary, classes))
    look = crossval.where_it_looks(results, df, classes, labels)
    if look is not None:
        print(crossval.format_where_it_looks(look))
        examples = [i for k in range(len(classes))
                    for i in np.flatnonzero(labels[look["index"]] == k)[:3]]
        rows = look["index"][examples]
        frac = look["mass"][examples]
        overlay_png(
            crops[rows], look["maps"][examples], look["masks"][examples],
            [f"{classes[labels[r]][:4]} {df.image_id.iloc[r].rsplit('/', 1)[-1]} {f:.0%} on cell"
             for r, f in zip(rows, frac)], args.figure)
        print(f"examples (map in red, true cell outline in green): {args.figure}")
    frame = crossval.outside_frame(df)
    print("crops reaching outside their image (filled by reflection), per class: " + "  ".join(
        f"{c} {r.outside:.0%} (mean {r.mean_share:.1%} of the side)"
        for c, r in frame.iterrows()))
    iou = None
    try:
        import pyarrow.dataset as pads

        ious = pads.dataset(dataset, format="parquet", partitioning="hive").to_table(
            columns=["cell_iou"]).to_pandas().cell_iou.dropna()
        iou = (float(ious.mean()), float(ious.median()), float((ious < 0.5).mean()))
        print(f"cell locator vs KRD-WBC masks: IoU mean {iou[0]:.3f}, median {iou[1]:.3f}, "
              f"{iou[2]:.1%} of images under 0.5 (the locator has no trained parameters, so "
              "this is out of fold by construction)")
    except Exception as exc:  # the table without masks: nothing to report
        logging.info("no locator IoU: %s", exc)
    print(f"runs: {len(results)} ({args.seeds} seeds x {args.folds} folds); recipe "
          f"{json.dumps(Recipe.from_config(t).__dict__)} views={t.views} "
          f"freeze_until={config.model.freeze_until} frozen_precision={t.frozen_precision} "
          f"augment={json.dumps(config.augment.__dict__)}; feature cache {cache_seconds:.0f} s; "
          f"wall time {wall:.0f} s")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"summary": summary, "wall_seconds": wall,
                                           "cache_seconds": cache_seconds,
                                           "trainings": len(results), "epochs": t.epochs,
                                           "train_images": sum(r.n_train for r in results)
                                           / len(results),
                                           "cell_iou": iou, "stain": config.data.stain,
                                           "outside_frame": frame.to_dict("index"),
                                           "where_it_looks": None if look is None else {
                                               k: look[k] for k in ("mass_on_cell",
                                                                    "area_on_cell",
                                                                    "peak_on_cell",
                                                                    "per_class")}},
                                          default=float, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
