"""How well do the review flags and the shift alarm know what the model does not know?

    .venv/bin/python benchmarks/review.py [--dataset runs/dataset] [--folds 5] [--slides 500]

Needs a dataset holding KRD-WBC and PBC-dev with PBC-dev's other cell types (as ``make demo``
ingests). With the training job's recipe and review fit (``wbc_spark.train``,
``wbc_spark.review``) in one process, and with ``train.align`` (the default) the jobs' per-lab
alignment of the frozen outputs (``crossval.lab_alignment``; the lab detector still compares
the unaligned ones), it trains:

- in-lab: grouped 5-fold cross-validation over both labs (the other lab always in training);
- lab held out: KRD-WBC only (tested on PBC-dev) and PBC-dev only (tested on KRD-WBC).

No model is trained on the three other cell types (ImmatureGranulocyte, Erythroblast,
Platelet), so every one of them is unseen by every model. Each model also scores images no
blood lab would send: KRD-WBC fields with the white cell masked out and filled in from its
surroundings, scikit-image's sample photos, rotated text and pure noise, each located and
cropped as the scoring job does.

Prints:
1. selective classification: coverage and accuracy of the unflagged cells at the trained
   thresholds (with 95% intervals), and accuracy at fixed coverages, in-lab and held out;
2. not one of the five: the share of each unseen kind flagged not_a_known_cell or
   no_cell_found, the AUROC of ``cell_distance`` against in-lab test cells, and the share of
   in-lab five-class cells flagged so; the share of each kind with any flag (what reaches a
   reviewer) and the classes its unflagged cells are called;
3. shift alarm: the share of simulated slides (``--slides`` draws of 50 and 100 cells) that
   alarm, for held-out cells of the trained labs (also rescaled and stain-shifted as
   ``benchmarks/accuracy.py`` shifts them) and for the lab held out, and the alarm on each
   held-out lab as one run.
Writes ``runs/review.json``, and every model's held-out predictions (calibrated probabilities,
flag reasons) to ``runs/review_predictions.npz`` for ``benchmarks/differential.py``. The
lab-held-out models keep a grouped fifth of their own lab as an in-lab test part (the
confusion matrix a trained model carries), beside the validation fifth.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image, ImageDraw
from scipy import ndimage
from sklearn.metrics import roc_auc_score

from wbc_spark import metrics, review
from wbc_spark.evaluation import crossval
from wbc_spark.augment import AugmentSettings
from wbc_spark.config import load_config
from wbc_spark.preprocessing import Preprocessing
from wbc_spark.model.transfer import build_classifier
from wbc_spark.model.weights import load_pretrained
from wbc_spark.splits import assign_folds, split_groups, train_val_test
from wbc_spark.train import Recipe

REPO = Path(__file__).resolve().parents[1]
SHIFTS = ("rescale_0.75", "rescale_1.33", "stain_shift")


# --- images no blood lab would send ---------------------------------------------------------
def cell_removed(image: bytes, mask: bytes, rng: np.random.Generator) -> Image.Image:
    """A KRD-WBC field with the white cell (its mask, dilated) filled in from the
    surroundings by repeated blurring, plus the field's own grain."""
    img = np.asarray(Image.open(io.BytesIO(image)).convert("RGB"), np.float32)
    m = np.asarray(Image.open(io.BytesIO(mask)).convert("L").resize(img.shape[1::-1])) > 0
    m = ndimage.binary_dilation(m, iterations=12)
    filled = img.copy()
    filled[m] = img[~m].mean(0)
    for _ in range(40):
        blurred = ndimage.gaussian_filter(filled, sigma=(6, 6, 0))
        filled[m] = blurred[m]
    filled[m] += rng.normal(0, 3, (int(m.sum()), 3))
    return Image.fromarray(np.clip(filled, 0, 255).astype(np.uint8))


def photos(rng: np.random.Generator, per_photo: int = 3) -> list[Image.Image]:
    """Crops of scikit-image's bundled sample photos (greyscale ones as RGB)."""
    from skimage import data

    out = []
    for name in ("astronaut", "coffee", "chelsea", "rocket", "camera", "coins", "moon",
                 "page", "horse", "hubble_deep_field", "immunohistochemistry", "retina"):
        arr = np.asarray(getattr(data, name)())
        if arr.dtype == bool:
            arr = arr.astype(np.uint8) * 255
        img = Image.fromarray(arr).convert("RGB")
        w, h = img.size
        for _ in range(per_photo):
            s = int(min(w, h) * rng.uniform(0.5, 1.0))
            x, y = rng.integers(0, w - s + 1), rng.integers(0, h - s + 1)
            out.append(img.crop((x, y, x + s, y + s)).resize((360, 360)))
    return out


def text_images(rng: np.random.Generator, n: int) -> list[Image.Image]:
    words = "blood smear neutrophil report sample patient slide lab count cell review".split()
    out = []
    for _ in range(n):
        img = Image.new("RGB", (360, 360), tuple(int(v) for v in rng.integers(200, 256, 3)))
        draw = ImageDraw.Draw(img)
        for line in range(12):
            text = " ".join(rng.choice(words, 4))
            draw.text((10, 10 + 28 * line), text, fill=tuple(int(v) for v in
                                                             rng.integers(0, 80, 3)))
        out.append(img.rotate(float(rng.uniform(0, 360)), fillcolor=(255, 255, 255)))
    return out


def noise_images(rng: np.random.Generator, n: int) -> list[Image.Image]:
    out = []
    for i in range(n):
        if i % 2:
            arr = rng.integers(0, 256, (360, 360, 3))
        else:
            arr = rng.normal(rng.uniform(60, 200, 3), rng.uniform(10, 60), (360, 360, 3))
        out.append(Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)))
    return out


def non_blood(df: pd.DataFrame, n: int, rng: np.random.Generator) -> dict[str, list]:
    krd = df[(df.source == "KRD-WBC") & df["mask"].notna()]
    pick = krd.iloc[rng.choice(len(krd), min(n, len(krd)), replace=False)]
    return {"blank field (cell removed)": [cell_removed(r.image, r.mask, rng)
                                           for r in pick.itertuples()],
            "natural photo": photos(rng), "rotated text": text_images(rng, n),
            "pure noise": noise_images(rng, n)}


# --- measures ---------------------------------------------------------------------------------
def scored(model, detectors: review.ReviewModel, feats: torch.Tensor, temperature: float,
           found: np.ndarray, align=None) -> dict:
    """Probabilities, cell distances, lab-detector verdicts and flag reasons of frozen outputs
    ``feats``; ``align``: feats -> the aligned outputs the head classifies (a model trained
    with ``train.align``), while the lab detector compares the unaligned ones, as scoring does."""
    logits, cell_f, lab_f = review.embed(model, feats if align is None else align(feats),
                                         lab_features=review.pooled(feats))
    probs = metrics.softmax(logits, temperature)
    cell_d, _, beyond, _ = detectors.distances(cell_f, lab_f)
    reasons = review.flags(probs.max(1), cell_d, found, detectors)
    return {"probs": probs, "cell_d": cell_d, "beyond": beyond,
            "reasons": reasons}


def has(reasons: list, *names: str) -> np.ndarray:
    return np.asarray([bool(set((r or "").split(";")) & set(names)) for r in reasons])


def selective(s: dict, labels: np.ndarray) -> dict:
    conf, pred = s["probs"].max(1), s["probs"].argmax(1)
    correct = pred == labels
    out = {"n": int(len(labels)), "accuracy_all": float(correct.mean())}
    for name, flagged in (("any reason", np.asarray([r is not None for r in s["reasons"]])),
                          ("low_confidence only", has(s["reasons"], "low_confidence"))):
        kept = ~flagged
        out[name] = {"coverage": float(kept.mean()),
                     "accuracy": float(correct[kept].mean()) if kept.any() else float("nan"),
                     "accuracy_ci": metrics.wilson(int(correct[kept].sum()), int(kept.sum()))}
    order = np.argsort(-conf, kind="stable")
    out["accuracy_at_coverage"] = {
        f"{c:.2f}": float(correct[order][:max(1, int(round(c * len(order))))].mean())
        for c in (0.5, 0.8, 0.9, 0.95, 1.0)}
    return out


def alarm_rates(beyond: np.ndarray, slides: int, sizes: tuple[int, ...], alarm_share: float,
                rng: np.random.Generator) -> dict:
    """Share of simulated slides (cells drawn without replacement) whose alarm fires."""
    out = {}
    for size in sizes:
        if len(beyond) < size:
            continue
        fired = [review.shift_alarm(int(beyond[rng.choice(len(beyond), size, replace=False)]
                                        .sum()), size, alarm_share)[1] for _ in range(slides)]
        out[str(size)] = float(np.mean(fired))
    return out


def save_predictions(path: str, runs: list[dict], df: pd.DataFrame, labels: np.ndarray,
                     classes: list[str]) -> None:
    """Every model's held-out rows, probabilities and flag reasons, for the differential
    benchmark (``run<i>_test_*``: its test rows; ``run<i>_own_*``: a lab-held-out model's
    in-lab test part)."""
    out = {"classes": np.asarray(classes), "labels": labels,
           "source": df.source.to_numpy().astype(str),
           # The splits' groups (shared group or identical bytes): duplicates stay together.
           "split_group": split_groups(df[["group", "sha256"]])}
    for i, rec in enumerate(runs):
        out[f"run{i}_name"] = np.asarray(rec["name"])
        for part, rows, s in (("test", rec["test"], rec["test_scored"]),
                              ("own", rec["own"], rec.get("own_scored"))):
            if rows is None:
                continue
            out[f"run{i}_{part}_rows"] = rows
            out[f"run{i}_{part}_probs"] = s["probs"]
            out[f"run{i}_{part}_reasons"] = np.asarray([r or "" for r in s["reasons"]])
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, **out)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(REPO / "conf" / "local.yaml"))
    parser.add_argument("--dataset", default=None, help="ingested dataset (default: config's)")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--slides", type=int, default=500)
    parser.add_argument("--non-blood", type=int, default=40, help="images of each kind")
    parser.add_argument("--shifted", type=int, default=150,
                        help="held-out cells per lab re-cropped under each shift (fold 0)")
    parser.add_argument("--sample", type=int, default=0,
                        help="at most this many images per lab and class (a quick check)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default=str(REPO / "runs" / "review.json"))
    parser.add_argument("--predictions", default=str(REPO / "runs" / "review_predictions.npz"))
    parser.add_argument("overrides", nargs="*", help="section.key=value")
    args = parser.parse_args()
    crossval.benchmark_process(args.threads)
    config = load_config(args.config, args.overrides)
    classes, others = list(config.classes), list(config.other_labels)
    dataset = args.dataset or config.data.dataset
    start = time.perf_counter()
    pre = Preprocessing.from_config(config)
    everything = crossval.load_dataset(dataset, classes + others, pre)
    if args.sample:
        everything = (everything.groupby(["source", "label"], group_keys=False)
                      .apply(lambda g: g.sample(min(len(g), args.sample), random_state=0))
                      .sort_values("image_id").reset_index(drop=True))
    df = everything[everything.label.isin(classes)].reset_index(drop=True)
    unseen = everything[everything.label.isin(others)].reset_index(drop=True)
    labs = sorted(df.source.unique())
    if len(labs) != 2 or unseen.empty:
        raise SystemExit(f"{dataset}: needs two labs and other cell types (ingest KRD-WBC and "
                         "PBC-dev's labels.csv, as make demo does)")
    labels = df.label.map({c: i for i, c in enumerate(classes)}).to_numpy()
    source = df.source.to_numpy()
    keys = df.sha256.to_numpy()
    meta = df[["image_id", "label", "group", "sha256", "source"]]
    pretrained = load_pretrained(config.model.source, config.model.weights_dir or None)
    model = build_classifier(pretrained, len(classes), freeze_until=config.model.freeze_until,
                             dropout=config.model.dropout)
    t, r = config.train, config.review
    prec = t.frozen_precision
    crops = crossval.crops_of(df)
    view_feats = crossval.augmented_view_features(
        model, crops, t.views, seed=1234, settings=AugmentSettings(**config.augment.__dict__),
        precision=prec)
    eval_feats = {"original": crossval.features_of(model, crops, prec)}
    del crops
    found = df.cell_found.fillna(False).to_numpy(bool)
    # Unseen kinds: PBC-dev's other cell types (their stored crops), then non-blood images;
    # with train.align each is mapped by the moments of the lab it would be scored with: its
    # own, and KRD-WBC's for the non-blood kinds (the blank fields are KRD-WBC's).
    extra: dict[str, tuple[torch.Tensor, np.ndarray]] = {}
    extra_lab: dict[str, np.ndarray | str] = {}
    for label in others:
        part = unseen[unseen.label == label]
        extra[label] = (crossval.features_of(model, crossval.crops_of(part), prec),
                        part.cell_found.fillna(False).to_numpy(bool))
        extra_lab[label] = part.source.to_numpy()
    rng = np.random.default_rng(0)
    for kind, imgs in non_blood(everything, args.non_blood, rng).items():
        made = [pre.crop_image(img) for img in imgs]
        extra[kind] = (crossval.features_of(model, np.stack([m[0] for m in made]), prec),
                       np.asarray([m[1].found for m in made]))
        extra_lab[kind] = "KRD-WBC"
    # Shifted held-out cells (fold 0's test images, re-located and cropped under the shift).
    roles0 = train_val_test(meta, folds=args.folds, test_fold=0, val_fraction=t.val_fraction,
                            seed=0)
    shifted_rows = np.concatenate([
        rng.permutation(np.flatnonzero((roles0 == "test") & (source == lab)))[:args.shifted]
        for lab in labs])
    shifted = {name: crossval.features_of(model, crossval.shifted_crops(
        df.iloc[shifted_rows], crossval.SHIFTS[name], pre),
        prec) for name in SHIFTS}
    cache_seconds = time.perf_counter() - start
    logging.info("frozen features in %.0f s", cache_seconds)

    base = Recipe.from_config(t)
    runs: list[dict] = []  # one per trained model

    def train(name: str, tr, va, te, run_id: int, shifted_ok: bool = False,
              own: np.ndarray | None = None) -> dict:
        rec: dict = {"name": name, "test": te, "own": own}

        def inspect(model, result, train_feats, train_labels):
            # The alignment train_and_test trained with (the same call gives the same maps):
            # each lab's rows by its moments; the unseen kinds by the lab they came from.
            alignment = (crossval.lab_alignment(eval_feats["original"], source, keys, tr, te)
                         if t.align else None)

            def by(lab_of):  # frozen outputs -> what the head sees, for rows of lab(s) lab_of
                return lambda f: (f if alignment is None else
                                  alignment.apply(f, np.broadcast_to(lab_of, len(f))))

            original = eval_feats["original"]
            det = review.fit(model, *review.training_cells(model, train_feats, train_labels),
                             by(source[va])(original[va]),
                             labels[va],
                             result.temperature, len(classes), r,
                             plain_pooled=review.pooled(original[tr]),
                             plain_labels=labels[tr], plain_labs=source[tr],
                             val_labs=source[va], val_pooled=review.pooled(original[va]))
            rec["detectors"] = det
            rec["test_scored"] = scored(model, det, original[te], result.temperature,
                                        found[te], by(source[te]))
            if own is not None:
                rec["own_scored"] = scored(model, det, original[own], result.temperature,
                                           found[own], by(source[own]))
            rec["extra"] = {k: scored(model, det, f, result.temperature, fd, by(extra_lab[k]))
                            for k, (f, fd) in extra.items()}
            if shifted_ok:
                rec["shifted"] = {k: (scored(model, det, f, result.temperature,
                                             np.ones(len(f), bool), by(source[shifted_rows])))
                                  for k, f in shifted.items()}

        t0 = time.perf_counter()
        crossval.train_and_test(model, view_feats, eval_feats, labels, tr, va, te, base,
                                len(classes), run=run_id, labs=source, inspect=inspect,
                                align=t.align, keys=keys)
        logging.info("%s: trained and scored in %.0f s", name, time.perf_counter() - t0)
        runs.append(rec)
        return rec

    for fold in range(args.folds):
        roles = train_val_test(meta, folds=args.folds, test_fold=fold,
                               val_fraction=t.val_fraction, seed=0)
        tr, va, te = (np.flatnonzero(roles == x) for x in ("train", "val", "test"))
        train(f"in-lab fold {fold}", tr, va, te, fold, shifted_ok=fold == 0)
    heldout = []
    for lab in labs:
        pool = np.flatnonzero(source == lab)
        inner = assign_folds(meta.iloc[pool].reset_index(drop=True),
                             max(2, int(round(1 / t.val_fraction))), 1)
        te = np.flatnonzero(source != lab)
        heldout.append(train(f"{lab} only -> {te.size} cells of the other lab",
                             pool[inner >= 2], pool[inner == 0], te, 50 + len(heldout),
                             own=pool[inner == 1]))
    save_predictions(args.predictions, runs, df, labels, classes)

    out: dict = {"cache_seconds": cache_seconds, "thresholds": {}}
    lines = []

    def pooled(recs: list[dict], key: str = "test_scored") -> tuple[dict, np.ndarray]:
        keys = ("probs", "cell_d", "beyond")
        s = {k: np.concatenate([x[key][k] for x in recs]) for k in keys}
        s["reasons"] = sum((list(x[key]["reasons"]) for x in recs), [])
        return s, np.concatenate([x["test"] for x in recs])

    inlab = runs[:args.folds]
    for rec in runs:
        d = rec["detectors"]
        out["thresholds"][rec["name"]] = {
            "confidence": d.confidence_threshold, "cell": d.cell_threshold,
            "lab": dict(zip(d.lab.labs, map(float, d.lab.thresholds))),
            "validation": d.validation}

    def subset(s: dict, mask: np.ndarray) -> dict:
        return {k: [q for q, m in zip(v, mask) if m] if k == "reasons" else v[mask]
                for k, v in s.items()}

    s_in, rows_in = pooled(inlab)
    lines.append("== 1. selective classification (accuracy of the unflagged cells)")
    settings = [("in-lab, both labs", s_in, rows_in)] + [
        (f"in-lab, {lab}", subset(s_in, source[rows_in] == lab),
         rows_in[source[rows_in] == lab]) for lab in labs] + [
        (x["name"], x["test_scored"], x["test"]) for x in heldout]
    out["selective"] = {}
    for name, s, rows in settings:
        sel = selective(s, labels[rows])
        out["selective"][name] = sel
        a, lc = sel["any reason"], sel["low_confidence only"]
        lines.append(
            f"{name:<44} n={sel['n']:<5} all cells {sel['accuracy_all']:.3f} | any flag: "
            f"coverage {a['coverage']:.3f}, accuracy {a['accuracy']:.4f} "
            f"[{a['accuracy_ci'][0]:.4f}, {a['accuracy_ci'][1]:.4f}] | low_confidence only: "
            f"coverage {lc['coverage']:.3f}, accuracy {lc['accuracy']:.4f} | at coverage "
            + " ".join(f"{c}: {v:.3f}" for c, v in sel["accuracy_at_coverage"].items()))

    lines.append("== 2. not one of the five: share flagged not_a_known_cell or no_cell_found "
                 "(AUROC of cell_distance against the in-lab test cells)")
    inlab_flag = has(s_in["reasons"], "not_a_known_cell", "no_cell_found")
    out["unknown"] = {"in-lab five classes flagged": float(inlab_flag.mean())}
    lines.append(f"{'in-lab five-class cells (should be low)':<44} flagged "
                 f"{inlab_flag.mean():.3f} of {len(inlab_flag)}")
    for kind in extra:
        flagged = np.concatenate([has(x["extra"][kind]["reasons"], "not_a_known_cell",
                                      "no_cell_found") for x in inlab])
        aucs = [roc_auc_score(np.r_[np.zeros(len(x["test"])), np.ones(len(x["extra"][kind][
            "cell_d"]))], np.r_[x["test_scored"]["cell_d"], x["extra"][kind]["cell_d"]])
            for x in inlab]
        lo, hi = metrics.wilson(int(flagged.sum()), len(flagged))
        # What a reviewer sees: any flag at all, and the class the unflagged ones get.
        reasons = sum((list(x["extra"][kind]["reasons"]) for x in inlab), [])
        anyflag = np.asarray([r is not None for r in reasons])
        called = np.concatenate([x["extra"][kind]["probs"].argmax(1) for x in inlab])
        unflagged = np.bincount(called[~anyflag], minlength=len(classes))
        out["unknown"][kind] = {"flagged": float(flagged.mean()), "ci": (lo, hi),
                                "auroc": float(np.mean(aucs)), "images": len(extra[kind][1]),
                                "any_flag": float(anyflag.mean()),
                                "unflagged_called": dict(zip(classes, unflagged.tolist()))}
        lines.append(f"{kind:<44} flagged {flagged.mean():.3f} [{lo:.3f}, {hi:.3f}] "
                     f"(in-lab models, {len(extra[kind][1])} images x {len(inlab)}), AUROC "
                     f"{np.mean(aucs):.3f}; any flag {anyflag.mean():.3f}, unflagged called "
                     + " ".join(f"{c[:3]} {n}" for c, n in zip(classes, unflagged)))

    lines.append(f"== 3. shift alarm: share of simulated slides that alarm (alarm_share "
                 f"{r.alarm_share}, {args.slides} slides each)")
    rng = np.random.default_rng(1)
    out["alarm"] = {}
    for lab in labs:
        beyond = s_in["beyond"][source[rows_in] == lab]
        rates = alarm_rates(beyond, args.slides, (50, 100), r.alarm_share, rng)
        out["alarm"][f"in-lab {lab}"] = {"beyond": float(beyond.mean()), "rates": rates}
        lines.append(f"{'in-lab ' + lab + ' (should not alarm)':<44} cells beyond "
                     f"{beyond.mean():.3f}; slides alarming {rates}")
        lab_rows = source[shifted_rows] == lab
        for name in SHIFTS:
            b = inlab[0]["shifted"][name]["beyond"][lab_rows]
            rates = alarm_rates(b, args.slides, (50, 100), r.alarm_share, rng)
            out["alarm"][f"in-lab {lab} {name}"] = {"beyond": float(b.mean()), "rates": rates}
            lines.append(f"{'  ' + name + ' (fold 0, should not alarm)':<44} cells beyond "
                         f"{b.mean():.3f}; slides alarming {rates}")
    for x in heldout:
        b = x["test_scored"]["beyond"]
        rates = alarm_rates(b, args.slides, (50, 100), r.alarm_share, rng)
        run_alarm = review.shift_alarm(int(b.sum()), len(b), r.alarm_share)
        out["alarm"][x["name"]] = {"beyond": float(b.mean()), "rates": rates,
                                   "whole run alarms": run_alarm[1]}
        lines.append(f"{x['name'] + ' (should alarm)':<44} cells beyond {b.mean():.3f}; "
                     f"slides alarming {rates}; the whole run alarms: {run_alarm[1]}")
    wall = time.perf_counter() - start
    lines.append(f"frozen features {cache_seconds:.0f} s; wall time {wall:.0f} s")
    print("\n".join(lines))
    out["wall_seconds"] = wall
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=2, default=float))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
