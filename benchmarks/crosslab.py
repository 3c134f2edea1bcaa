"""The cross-lab protocol: does the recipe learn the cell or the lab?

    .venv/bin/python benchmarks/crosslab.py [--dataset runs/dataset] [--draws 3]

Needs a dataset holding two labs (``source`` column), as ``make demo`` ingests: KRD-WBC and
PBC-dev. Runs, with the training job's recipe (``wbc_spark.train``) in one process:

1. lab held out: train on one lab only, test on every five-class image of the other;
2. both labs: grouped 5-fold cross-validation stratified by lab and class, the other lab's
   images always in training; scores per lab;
3. adaptation: one lab plus k = 5, 10, 25 labelled cells per class of the other, tested on
   the rest of that lab (``--draws`` random draws of the k cells each; a class with fewer
   than 2k cells gives half of them, so KRD-WBC's 11 eosinophils give 5 at k = 10 and 25);
4. the seed's setting as one row: KRD-WBC alone, 5-fold cross-validation.

With ``train.align`` (the default) every training aligns the labs' frozen outputs as the
jobs do (``crossval.lab_alignment``): each training lab by its moments from up to 256 of its
training images, a test lab not in training by a profile of up to 256 of its test images
(the scoring job's lab profile; no labels). ``train.align=false`` measures without.

Two levers of prediction, measured beside the plain model in parts 1-3 when asked for:
``--tta N`` averages each test image's calibrated probabilities over the first N of its
eight flips and rotations (at a temperature fitted on the validation images' flips and
rotations); ``--heads K`` trains K heads per run (the plain run's seed and K - 1 more; with
unfrozen blocks, K whole models) and averages their probabilities. The plain model's
figures stay the first member's on the original crops, the same as without them.

Prints per setting balanced accuracy, macro-F1, per-class recall (each with its 95% interval),
ECE, the largest predicted-to-true share ratio of any class (a "sink" class), the confusion
matrix, and the wall time; writes ``runs/crosslab.json`` and ``runs/crops_per_lab.png``
(originals beside the crops the model is fed, per lab and class). The frozen layers' outputs
of every image and training view are computed once and reused by every training.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks import pictures  # noqa: E402
from wbc_spark import metrics  # noqa: E402
from wbc_spark.evaluation import crossval  # noqa: E402
from wbc_spark.augment import AugmentSettings  # noqa: E402
from wbc_spark.config import load_config  # noqa: E402
from wbc_spark.preprocessing import Preprocessing  # noqa: E402
from wbc_spark.model.transfer import build_classifier  # noqa: E402
from wbc_spark.model.weights import load_pretrained  # noqa: E402
from wbc_spark.splits import assign_folds, train_val_test  # noqa: E402
from wbc_spark.stain import surround_mean  # noqa: E402
from wbc_spark.train import Recipe  # noqa: E402
from wbc_spark.transforms import dihedral  # noqa: E402

KS = (5, 10, 25)


def crops_picture(df: pd.DataFrame, classes: list[str], path: str, per_class: int = 4,
                  tile: int = 112) -> None:
    """Per lab and class, ``per_class`` originals each beside the crop made from it."""
    size = int(df.crop_size.iloc[0])
    rows = []
    rng = np.random.default_rng(0)
    for lab in sorted(df.source.unique()):
        for c in classes:
            pick = df[(df.source == lab) & (df.label == c)]
            pick = pick.iloc[rng.choice(len(pick), min(per_class, len(pick)), replace=False)]
            tiles = [pictures.pair_tile(r.image, np.frombuffer(r.crop, np.uint8).reshape(
                size, size, 3), tile) for r in pick.itertuples()]
            rows.append((f"{lab}\n{c}", tiles))
    pictures.save_rows(rows, path, per_class, tile)


@functools.lru_cache(maxsize=4)
def central_disc(side: int) -> np.ndarray:
    yy, xx = np.mgrid[:side, :side]
    return (yy - side / 2) ** 2 + (xx - side / 2) ** 2 < (0.2 * side) ** 2


def cell_density(crop: np.ndarray) -> float:
    """How deeply a crop's cell is stained: optical density against the surroundings' mean
    colour, 90th percentile over the central disc of 0.2 of the side."""
    disc = central_disc(crop.shape[0])
    od = -np.log((crop[disc].astype(np.float32) + 1) / (surround_mean(crop) + 1))
    return float(np.percentile(od.mean(1), 90))


def crop_statistics(df: pd.DataFrame, classes: list[str]) -> pd.DataFrame:
    """Per lab and class, what could tell a lab apart in the crops the model is fed: the mean
    colour of the cell's surroundings (outside the central disc), how deeply the cell is
    stained against them (optical density, -log of the light passed relative to the
    surroundings, 90th percentile over the central disc of 0.2 of the side; median over
    crops), the sharpness (mean absolute difference of neighbouring pixels) and the share of
    crops reaching outside their image."""
    size = int(df.crop_size.iloc[0])
    rows = []
    for (lab, label), part in df.groupby(["source", "label"]):
        crops = [np.frombuffer(b, np.uint8).reshape(size, size, 3) for b in part.crop]
        surround = np.mean([surround_mean(c) for c in crops], axis=0)
        density = float(np.median([cell_density(c) for c in crops]))
        sharp = np.mean([np.abs(np.diff(c.astype(np.int16), axis=1)).mean() for c in crops])
        box = np.stack(part.crop_box.to_numpy())
        beyond = np.maximum.reduce([-box[:, 0], -box[:, 1], box[:, 0] + box[:, 2]
                                    - part.width.to_numpy(), box[:, 1] + box[:, 2]
                                    - part.height.to_numpy(), 0 * box[:, 2]])
        rows.append({"lab": lab, "class": label, "crops": len(part),
                     "surround_rgb": " ".join(f"{v:.0f}" for v in surround),
                     "cell_density": round(density, 2),
                     "sharpness": round(float(sharp), 2),
                     "outside_frame": round(float((beyond > 0).mean()), 2),
                     "crop_side_px": int(np.median(box[:, 2]))})
    frame = pd.DataFrame(rows)
    frame["class"] = pd.Categorical(frame["class"], classes)
    return frame.sort_values(["lab", "class"])


def evaluate(labels: np.ndarray, probs: np.ndarray, classes: list[str]) -> dict:
    """Classification report plus the sink ratio: each class's predicted share over its true
    share (a class predicted for far more cells than it has is where foreign cells go)."""
    rep = metrics.classification_report(labels, probs.argmax(1), classes, probs)
    true = np.bincount(labels, minlength=len(classes)) / len(labels)
    pred = np.bincount(probs.argmax(1), minlength=len(classes)) / len(labels)
    rep["share_ratio"] = {c: float(pred[k] / true[k]) if true[k] else float("nan")
                          for k, c in enumerate(classes)}
    return rep


def inner_validation(meta: pd.DataFrame, pool: np.ndarray, val_fraction: float, seed: int
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Split ``pool`` (row indices) into train and validation, grouped and stratified."""
    inner = assign_folds(meta.iloc[pool].reset_index(drop=True),
                         max(2, int(round(1 / val_fraction))), seed + 1)
    return pool[inner != 0], pool[inner == 0]


def line(name: str, rep: dict, classes: list[str], seconds: float | None = None) -> str:
    def ci(v):
        return f"[{v[0]:.3f}, {v[1]:.3f}]"

    recall = "  ".join(f"{c[:4]} {rep['per_class'][c]['recall']:.2f} "
                       f"{ci(rep['per_class'][c]['recall_ci'])}" for c in classes)
    sink = max(rep["share_ratio"].items(), key=lambda kv: kv[1])
    return (f"{name:<34} n={rep['n']:<5} bal.acc {rep['balanced_accuracy']:.3f} "
            f"{ci(rep['balanced_accuracy_ci'])}  macro-F1 {rep['macro_f1']:.3f} "
            f"{ci(rep['macro_f1_ci'])}  ECE {rep['ece']:.3f}  largest share ratio "
            f"{sink[0]} {sink[1]:.2f}" + (f"  ({seconds:.0f} s)" if seconds else "")
            + f"\n{'':<34} recall: {recall}")


def draws_summary(reps: list[dict], classes: list[str]) -> dict:
    """The adaptation draws of one k: mean [95% interval] of balanced accuracy and
    macro-F1, mean recall per class and ECE, and each draw's report."""
    return {"balanced_accuracy": crossval.mean_interval([r["balanced_accuracy"] for r in reps]),
            "macro_f1": crossval.mean_interval([r["macro_f1"] for r in reps]),
            "recall": {c: float(np.mean([r["per_class"][c]["recall"] for r in reps]))
                       for c in classes},
            "ece": float(np.mean([r["ece"] for r in reps])),
            "draws": reps}


def draws_line(name: str, new: str, reps: list[dict], classes: list[str]) -> str:
    s = draws_summary(reps, classes)
    m, lo, hi = s["balanced_accuracy"]
    return (f"{name}: balanced accuracy on the rest of {new} {m:.3f} [{lo:.3f}, {hi:.3f}] "
            f"over {len(reps)} draws, macro-F1 {s['macro_f1'][0]:.3f}; recall "
            + "  ".join(f"{c[:4]} {s['recall'][c]:.2f}" for c in classes))


class Lines(list):
    """The report: each line printed as it is added, so a long run shows its parts as they
    finish (and a failure late in the run loses none of them)."""

    def append(self, text: str) -> None:
        print(text, flush=True)
        super().append(text)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(REPO / "conf" / "local.yaml"))
    parser.add_argument("--dataset", default=None, help="ingested dataset (default: config's)")
    parser.add_argument("--draws", type=int, default=3, help="draws of the k cells per k")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--ks", default=",".join(map(str, KS)),
                        help="labelled cells per class for the adaptation curve")
    parser.add_argument("--home", default="",
                        help="adaptation: only this lab as the home lab (default: both)")
    parser.add_argument("--only", default="heldout,both,adapt,krd",
                        help="comma-separated parts to run: heldout, both, adapt, krd")
    parser.add_argument("--tta", type=int, default=1, choices=range(1, 9), metavar="N",
                        help="parts 1-3 also scored on the mean of N flips/rotations")
    parser.add_argument("--heads", type=int, default=1, metavar="K",
                        help="parts 1-3 also scored by the mean of K heads (seeds)")
    parser.add_argument("--view-seed", type=int, default=1234,
                        help="seed of the augmented views (another draw of the training crops' "
                             "jitter; train.seed=N draws the heads' initialisation and batches)")
    parser.add_argument("--json", default=str(REPO / "runs" / "crosslab.json"))
    parser.add_argument("--figure", default=str(REPO / "runs" / "crops_per_lab.png"))
    parser.add_argument("overrides", nargs="*", help="section.key=value for the recipe")
    args = parser.parse_args()
    crossval.benchmark_process(args.threads)
    parts = set(args.only.split(","))
    config = load_config(args.config, args.overrides)
    dataset = args.dataset or config.data.dataset
    classes = list(config.classes)
    start = time.perf_counter()
    df = crossval.load_dataset(dataset, classes, Preprocessing.from_config(config))
    labs = sorted(df.source.unique())
    if len(labs) != 2:
        raise SystemExit(f"{dataset}: holds labs {labs}; the protocol needs two (ingest "
                         "KRD-WBC and PBC-dev, as make demo does)")
    crops_picture(df, classes, args.figure)
    print(f"crops per lab and class (original | crop): {args.figure}")
    stats = crop_statistics(df, classes)
    print("what the crops say about their lab (surroundings' mean RGB, the cell's optical "
          "density against them, sharpness, share reaching outside the image, median crop "
          "side in the original's pixels):\n"
          + stats.to_string(index=False))
    labels = df.label.map({c: i for i, c in enumerate(classes)}).to_numpy()
    meta = df[["image_id", "label", "group", "sha256", "source"]].reset_index(drop=True)
    source = df.source.to_numpy()
    keys = df.sha256.to_numpy()
    pretrained = load_pretrained(config.model.source, config.model.weights_dir or None)
    model = build_classifier(pretrained, len(classes), freeze_until=config.model.freeze_until,
                             dropout=config.model.dropout)
    t = config.train
    crops = crossval.crops_of(df)
    view_feats = crossval.augmented_view_features(
        model, crops, t.views, seed=args.view_seed,
        settings=AugmentSettings(**config.augment.__dict__),
        precision=t.frozen_precision)
    eval_feats = {"original": crossval.features_of(model, crops, t.frozen_precision)}
    if args.tta > 1:  # views x images x ...: train_and_test averages the views' probabilities
        eval_feats["tta"] = torch.stack(
            [eval_feats["original"]] + [crossval.features_of(model, dihedral(crops, k),
                                                             t.frozen_precision)
                                        for k in range(1, args.tta)])
    del crops
    cache_seconds = time.perf_counter() - start
    logging.info("frozen features of %d images x %d views in %.0f s", len(df), t.views,
                 cache_seconds)
    base = Recipe.from_config(t)
    out: dict = {"crop_statistics": stats.astype(str).to_dict("records"), "labs": labs,
                 "images": {lab: {c: int(((source == lab) & (df.label == c)).sum())
                                  for c in classes} for lab in labs}}
    report_lines = Lines()

    def predict(tr, va, te, seed: int, run_id: int, heads: int = 1) -> dict:
        """Probabilities of ``te`` per variant: "original" (the first head, as the plain
        protocol), and with ``--tta``/``--heads`` "tta", "heads", "heads+tta"."""
        members = []
        for m in range(heads):
            recipe = Recipe(**{**base.__dict__, "seed": base.seed + seed + 1000 * m})
            probs, _, _ = crossval.train_and_test(model, view_feats, eval_feats, labels, tr,
                                                  va, te, recipe, len(classes), run=run_id,
                                                  labs=source, align=t.align, keys=keys)
            members.append(probs)
        variants = dict(members[0])
        if heads > 1:
            for name in members[0]:
                key = "heads" if name == "original" else f"heads+{name}"
                variants[key] = np.mean([p[name] for p in members], axis=0)
        return variants

    def variant_lines(name: str, part: str, probs_te: dict, te: np.ndarray) -> None:
        for variant, p in probs_te.items():
            if variant == "original":
                continue
            rep = evaluate(labels[te], p, classes)
            out.setdefault("variants", {}).setdefault(part, {}).setdefault(name, {})[
                variant] = rep
            report_lines.append(line(f"{name} [{variant}]", rep, classes))

    def run(name: str, tr, va, te, seed: int = 0, run_id: int = 0,
            heads: int = 1) -> tuple[dict, dict]:
        """The plain model's report, and every variant's probabilities (``predict``)."""
        t0 = time.perf_counter()
        probs = predict(tr, va, te, seed, run_id, heads)
        rep = evaluate(labels[te], probs["original"], classes)
        rep["seconds"] = time.perf_counter() - t0
        rep["n_train"] = int(len(tr))
        logging.info("%s: balanced accuracy %.3f, macro-F1 %.3f (%d train, %.0f s)", name,
                     rep["balanced_accuracy"], rep["macro_f1"], len(tr), rep["seconds"])
        return rep, probs

    if "heldout" in parts:
        out["heldout"] = {}
        for train_lab in labs:
            test_lab = next(lab for lab in labs if lab != train_lab)
            pool = np.flatnonzero(source == train_lab)
            tr, va = inner_validation(meta, pool, t.val_fraction, 0)
            te = np.flatnonzero(source == test_lab)
            rep, variants = run(f"{train_lab} -> {test_lab}", tr, va, te, heads=args.heads)
            out["heldout"][f"{train_lab} -> {test_lab}"] = rep
            report_lines.append(line(f"held out: {train_lab} -> {test_lab}", rep, classes,
                                     rep["seconds"]))
            report_lines.append(metrics.format_report(rep))
            variant_lines(f"held out: {train_lab} -> {test_lab}", "heldout", variants, te)

    if "both" in parts:
        pooled: dict = {}
        seconds = 0.0
        for fold in range(args.folds):
            roles = train_val_test(meta, folds=args.folds, test_fold=fold,
                                   val_fraction=t.val_fraction, seed=0)
            tr, va, te = (np.flatnonzero(roles == r) for r in ("train", "val", "test"))
            t0 = time.perf_counter()
            for variant, p in predict(tr, va, te, 0, fold, args.heads).items():
                pooled.setdefault(variant, np.zeros((len(df), len(classes))))[te] = p
            seconds += time.perf_counter() - t0
            logging.info("both labs, fold %d: %.0f s", fold, time.perf_counter() - t0)
        out["both"] = {}
        for lab in labs:
            rows = source == lab
            rep = evaluate(labels[rows], pooled["original"][rows], classes)
            out["both"][lab] = rep
            report_lines.append(line(f"both labs, {args.folds}-fold, on {lab}", rep, classes))
            report_lines.append(metrics.format_report(rep))
            variant_lines(f"both labs, {args.folds}-fold, on {lab}", "both",
                          {v: p[rows] for v, p in pooled.items()}, np.flatnonzero(rows))
        out["both_seconds"] = seconds

    if "adapt" in parts:
        out["adapt"] = {}
        rng = np.random.default_rng(7)
        for home in [lab for lab in labs if args.home in ("", lab)]:
            new = next(lab for lab in labs if lab != home)
            for k in map(int, args.ks.split(",")):
                reps, variant_reps = [], {}
                for draw in range(args.draws):
                    # k cells per class of the new lab, whole groups, drawn at random.
                    new_rows = np.flatnonzero(source == new)
                    # A class with fewer than 2k cells (KRD-WBC's 11 eosinophils and 20
                    # basophils at k = 10 and 25) gives half of them, so some stay to test.
                    chosen = np.concatenate([
                        rng.choice(of_class, min(k, len(of_class) // 2), replace=False)
                        for of_class in (new_rows[labels[new_rows] == c]
                                         for c in range(len(classes)))])
                    # Rows sharing a group or a content with a chosen cell leave the test
                    # set (a manifest without groups has none: null is no group).
                    same = (meta.group.notna() & meta.group.isin(
                        set(meta.group.iloc[chosen].dropna()))).to_numpy() | meta.sha256.isin(
                        set(meta.sha256.iloc[chosen])).to_numpy()
                    te = np.setdiff1d(new_rows[~same[new_rows]], chosen)
                    pool = np.concatenate([np.flatnonzero(source == home), chosen])
                    tr, va = inner_validation(meta, pool, t.val_fraction, draw)
                    rep, variants = run(f"{home} + {k}/class of {new}, draw {draw}", tr, va,
                                        te, seed=draw, run_id=100 * k + draw, heads=args.heads)
                    reps.append(rep)
                    for variant, p in variants.items():
                        if variant != "original":
                            variant_reps.setdefault(variant, []).append(
                                evaluate(labels[te], p, classes))
                name = f"{home} + k of {new}"
                out["adapt"].setdefault(name, {})[k] = draws_summary(reps, classes)
                report_lines.append(draws_line(f"adaptation: {home} + {k:>2}/class of {new}",
                                               new, reps, classes))
                for variant, vreps in variant_reps.items():
                    out.setdefault("variants", {}).setdefault("adapt", {}).setdefault(
                        name, {}).setdefault(k, {})[variant] = draws_summary(vreps, classes)
                    report_lines.append(draws_line(
                        f"adaptation: {home} + {k:>2}/class of {new} [{variant}]", new, vreps,
                        classes))

    if "krd" in parts and "KRD-WBC" in labs:
        rows = np.flatnonzero(source == "KRD-WBC")
        sub = meta.iloc[rows].reset_index(drop=True)
        pooled = np.zeros((len(rows), len(classes)))
        for fold in range(args.folds):
            roles = train_val_test(sub, folds=args.folds, test_fold=fold,
                                   val_fraction=t.val_fraction, seed=0)
            tr, va, te = (rows[roles == r] for r in ("train", "val", "test"))
            recipe = Recipe(**{**base.__dict__, "seed": base.seed})
            probs, _, _ = crossval.train_and_test(model, view_feats, eval_feats, labels, tr,
                                                  va, te, recipe, len(classes), run=fold,
                                                  labs=source, align=t.align, keys=keys)
            pooled[np.searchsorted(rows, te)] = probs["original"]
        rep = evaluate(labels[rows], pooled, classes)
        out["krd_only"] = rep
        report_lines.append(line(f"KRD-WBC only, {args.folds}-fold (seed's setting)", rep,
                                 classes))

    wall = time.perf_counter() - start
    print(f"recipe {json.dumps(base.__dict__)} align={t.align} views={t.views} "
          f"view_seed={args.view_seed} "
          f"freeze_until={config.model.freeze_until} stain={config.data.stain} "
          f"context={config.data.context} framing={config.data.framing} "
          f"augment={json.dumps(config.augment.__dict__)}; "
          f"frozen features {cache_seconds:.0f} s; wall time {wall:.0f} s")
    out.update(wall_seconds=wall, cache_seconds=cache_seconds, recipe=base.__dict__,
               align=t.align, views=t.views, view_seed=args.view_seed, stain=config.data.stain,
               augment=config.augment.__dict__)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, default=float, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
