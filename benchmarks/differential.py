"""How close is a slide's differential to the truth: raw counts against the corrected estimate.

    .venv/bin/python benchmarks/differential.py [--predictions runs/review_predictions.npz]
                                                [--slides 500] [--sizes 100 200]

Uses the held-out predictions ``benchmarks/review.py`` saves (calibrated probabilities and
review reasons of every model it trains; run it first). Simulated slides draw cells of each
true class from held-out images, with class shares drawn uniformly within realistic ranges
(neutrophils 40-75%, lymphocytes 20-45%, monocytes 2-10%, eosinophils 1-6%, basophils 0-2%;
neutrophils take the rest, draws outside their range are redrawn); a class's cells are drawn
without replacement while its pool lasts, with replacement beyond (KRD-WBC has 11
eosinophils).

Settings:
- in-lab, per lab: the five grouped cross-validation folds' test predictions (each image
  predicted by the model that did not train on it), split by duplicate group into two
  halves; slides are drawn from one half and corrected with the confusion measured on
  ``--confusion-cells`` cells (739 by default: one test fold's size) drawn from the other
  half, both labs as in a trained model's test fold, as the scoring job does it: the slide's
  lab's rows shrunk toward the pooled ones (``Confusion.for_lab``; the lab is taken as known
  here, where scoring takes the lab most of the slide's cells lie nearest to); then the
  other way round;
- lab held out: the model trained on one lab only, corrected with the confusion on its own
  lab's held-out part, slides drawn from the other lab.

A lab scored through the jobs (``--results`` tables with their ``--models``, e.g. the rest of
PBC-dev that ``benchmarks/adapt_route.py`` scores with each adapted model): slides drawn from
the cells that model scored whose folder names their class, each table's corrected with its model's
confusion for the lab most of its cells lie nearest to, as the scoring job does it. No
``--predictions`` needed.

``--count-out`` and ``--pooled`` measure the alternatives: leaving more flagged cells out of
the differential, and correcting with the pooled confusion.

Per class it prints the mean absolute error of the share in percentage points against the
slide's true composition (what a perfect reader of the same cells would count) and against
the patient's share the slide was drawn with, and how often the 95% interval covers the
patient's share (the interval covers the sampling of cells, so that share is its target);
for the raw share of top predictions (Wilson interval) and the corrected estimate
(``wbc_spark.differential``). Writes ``runs/differential.json``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.lab_route import results_frame  # noqa: E402
from wbc_spark import artifact, differential  # noqa: E402
from wbc_spark.differential import Confusion, estimate, scope_lab  # noqa: E402
from wbc_spark.metrics import wilson  # noqa: E402
RANGES = {"Lymphocyte": (0.20, 0.45), "Monocyte": (0.02, 0.10), "Eosinophil": (0.01, 0.06),
          "Basophil": (0.0, 0.02)}
NEUTROPHIL = (0.40, 0.75)
TARGETS = {"in-lab": 1.5, "lab held out": 3.0}


def draw_shares(classes: list[str], n: int, rng: np.random.Generator) -> np.ndarray:
    out = np.zeros((n, len(classes)))
    i = 0
    while i < n:
        share = {c: rng.uniform(*RANGES[c]) for c in RANGES}
        neut = 1.0 - sum(share.values())
        if NEUTROPHIL[0] <= neut <= NEUTROPHIL[1]:
            share["Neutrophil"] = neut
            out[i] = [share[c] for c in classes]
            i += 1
    return out


class Pool:
    """Held-out cells: true class, predicted class, whether they count in the differential."""

    def __init__(self, labels, predicted, reasons) -> None:
        self.labels = np.asarray(labels)
        self.predicted = np.asarray(predicted)
        self.reasons = [r or None for r in reasons]
        self.counts = np.asarray([differential.counts_as_cell(r) for r in self.reasons], bool)

    @classmethod
    def concat(cls, pools: list[Pool]) -> Pool:
        return cls(np.concatenate([p.labels for p in pools]),
                   np.concatenate([p.predicted for p in pools]),
                   sum((p.reasons for p in pools), []))

    def subset(self, mask: np.ndarray) -> Pool:
        return Pool(self.labels[mask], self.predicted[mask],
                    [r for r, m in zip(self.reasons, mask) if m])

    def confusion(self, classes: list[str], labs=None) -> Confusion:
        return Confusion.from_predictions(classes, self.labels, self.predicted, self.reasons,
                                          labs)


def simulate(pool: Pool, classes: list[str], shares: np.ndarray, size: int,
             rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per slide: true composition counts, top-prediction counts of all classified cells,
    and counts of the cells that enter the differential."""
    k = len(classes)
    by_class = [np.flatnonzero(pool.labels == i) for i in range(k)]
    true = np.zeros((len(shares), k), np.int64)
    top = np.zeros_like(true)
    counted = np.zeros_like(true)
    for s, p in enumerate(shares):
        true[s] = rng.multinomial(size, p)
        for i in range(k):
            if true[s, i] == 0:
                continue
            if len(by_class[i]) == 0:
                raise SystemExit(f"no held-out {classes[i]} cells to draw from")
            cells = rng.choice(by_class[i], true[s, i], replace=true[s, i] > len(by_class[i]))
            top[s] += np.bincount(pool.predicted[cells], minlength=k)
            keep = cells[pool.counts[cells]]
            counted[s] += np.bincount(pool.predicted[keep], minlength=k)
    return true, top, counted


def measure(true, top, counted, shares, confusion, size) -> dict:
    truth = true / size
    raw = top / np.maximum(top.sum(1, keepdims=True), 1)
    raw_ci = np.array([[wilson(int(c), int(t.sum())) for c in t] for t in top])
    est = estimate(counted, confusion)
    ok = ~np.isnan(est.share).any(1)
    out = {"slides": int(len(true)), "no_counted_cells": int((~ok).sum()),
           "counted_share_of_cells": float(counted.sum() / max(1, top.sum())),
           "per_class": {}}
    for j, c in enumerate(confusion.classes):
        out["per_class"][c] = {
            "raw_mae_pp": float(100 * np.abs(raw[:, j] - truth[:, j]).mean()),
            "corrected_mae_pp": float(100 * np.abs(est.share[ok, j] - truth[ok, j]).mean()),
            "raw_mae_vs_patient_pp": float(100 * np.abs(raw[:, j] - shares[:, j]).mean()),
            "corrected_mae_vs_patient_pp": float(
                100 * np.abs(est.share[ok, j] - shares[ok, j]).mean()),
            "raw_coverage": float(((raw_ci[:, j, 0] <= shares[:, j])
                                   & (shares[:, j] <= raw_ci[:, j, 1])).mean()),
            # A slide without counted cells has no interval: it counts as not covered.
            "corrected_coverage": float(np.where(ok, (est.low[:, j] <= shares[:, j])
                                                 & (shares[:, j] <= est.high[:, j]),
                                                 False).mean()),
            "corrected_width_pp": float(100 * (est.high[ok, j] - est.low[ok, j]).mean()),
        }
    return out


def scored_pool(table: str | Path, classes: list[str], model_id: str
                ) -> tuple[Pool, str | None, int]:
    """The cells of a results table that model ``model_id`` scored and whose folder is one of
    ``classes`` (their truth): their Pool, the lab most of them lie nearest to, and how many
    of the model's rows were left out (other folders, unreadable files); no lab where none
    was recorded (the pooled confusion is then used, as the scoring job does)."""
    t = results_frame(table, "predicted_class", "review_reason", "nearest_lab", "error",
                      "model_id")
    t = t[t["model_id"] == model_id]  # a table may hold other models' runs too
    keep = (t["folder"].isin(classes) & t["error"].isna() & t["predicted_class"].isin(classes)
            ).to_numpy()
    if not keep.any():
        raise SystemExit(f"{table}: no cell scored by model {model_id} in a folder named for "
                         f"one of {classes}")
    t = t[keep]
    pool = Pool(t["folder"].map(classes.index).to_numpy(),
                t["predicted_class"].map(classes.index).to_numpy(),
                t["review_reason"].tolist())
    lab = scope_lab(t["nearest_lab"].dropna().astype(str).value_counts().sort_index().to_dict())
    return pool, lab, int((~keep).sum())


def scored_settings(tables: list[str], models: list[str], pooled: bool
                    ) -> tuple[list[str], list]:
    """``--results`` with their ``--models``: one in-lab setting, a part per table."""
    if len(tables) != len(models):
        raise SystemExit(f"{len(tables)} --results tables for {len(models)} --models")
    parts, classes = [], None
    for table, model in zip(tables, models):
        meta = artifact.load(model, expected_classes=classes)[1]
        if "confusion" not in meta:
            raise SystemExit(f"{model}: no differential confusion in the artifact")
        confusion = Confusion.from_state(meta["confusion"])
        classes = list(confusion.classes)
        pool, lab, left = scored_pool(table, classes, meta["model_id"])
        print(f"{table}: {len(pool.labels)} scored cells ({left} rows left out), nearest "
              f"lab {lab}; confusion of {model}")
        parts.append((pool, confusion if pooled else confusion.for_lab(lab)))
    return classes, [("in-lab", f"scored ({len(parts)} tables)", parts)]


def half_of(groups: np.ndarray) -> np.ndarray:
    """0 or 1 per row, by a hash of its duplicate group (duplicates stay together)."""
    return np.asarray([hashlib.sha256(g.encode()).digest()[0] % 2 for g in groups])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--predictions", default=str(REPO / "runs" / "review_predictions.npz"))
    parser.add_argument("--slides", type=int, default=500, help="per setting and size")
    parser.add_argument("--sizes", type=int, nargs="+", default=[100, 200])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--confusion-cells", type=int, default=739,
                        help="in-lab: held-out cells the confusion is measured on (0: all of "
                        "the other half)")
    parser.add_argument("--count-out", default=",".join(differential.COUNTED_OUT),
                        help="review reasons that leave a cell out of the differential")
    parser.add_argument("--pooled", action="store_true",
                        help="correct with the pooled confusion, not the slide's lab's")
    parser.add_argument("--results", nargs="+", default=[],
                        help="scored results tables (cells in folders named for their class)")
    parser.add_argument("--models", nargs="+", default=[],
                        help="the model.pt that scored each --results table")
    parser.add_argument("--json", default=str(REPO / "runs" / "differential.json"))
    args = parser.parse_args(argv)
    if args.models and not args.results:
        parser.error("--models needs the --results tables they scored")
    start = time.perf_counter()
    differential.COUNTED_OUT = tuple(r for r in args.count_out.split(",") if r)
    rng = np.random.default_rng(args.seed)
    if args.results:
        classes, settings = scored_settings(args.results, args.models, args.pooled)
    else:
        classes, settings = held_out_settings(args, rng)
    return report(args, classes, settings, rng, start)


def held_out_settings(args, rng: np.random.Generator) -> tuple[list[str], list]:
    """The in-lab and lab-held-out settings from ``benchmarks/review.py``'s predictions."""
    if not Path(args.predictions).is_file():
        raise SystemExit(f"{args.predictions}: not found; run benchmarks/review.py first (it "
                         "saves every model's held-out predictions)")
    d = np.load(args.predictions)
    classes = [str(c) for c in d["classes"]]
    if "split_group" not in d.files:
        raise SystemExit(f"{args.predictions}: no split_group (saved by benchmarks/review.py "
                         "since the differential benchmark exists); run it again")
    labels, source, groups = d["labels"], d["source"], d["split_group"].astype(str)
    runs = sorted({int(k[3:].split("_")[0]) for k in d.files if k.startswith("run")})
    names = {i: str(d[f"run{i}_name"]) for i in runs}

    def pool(i: int, part: str) -> tuple[Pool, np.ndarray]:
        rows = d[f"run{i}_{part}_rows"]
        return (Pool(labels[rows], d[f"run{i}_{part}_probs"].argmax(1),
                     d[f"run{i}_{part}_reasons"]), rows)

    settings: list[tuple[str, str, list[tuple[Pool, Confusion]]]] = []
    inlab = [i for i in runs if names[i].startswith("in-lab")]
    pools = [pool(i, "test") for i in inlab]
    cv = Pool.concat([p for p, _ in pools])
    cv_rows = np.concatenate([r for _, r in pools])
    half = half_of(groups[cv_rows])
    for lab in sorted(set(source[cv_rows])):
        parts = []
        for h in (0, 1):
            slides = cv.subset((half == h) & (source[cv_rows] == lab))
            other = np.flatnonzero(half != h)
            if args.confusion_cells:
                other = rng.choice(other, min(args.confusion_cells, len(other)), replace=False)
            mask = np.zeros(len(cv_rows), bool)
            mask[other] = True
            confusion = cv.subset(mask).confusion(classes, source[cv_rows][mask])
            parts.append((slides, confusion if args.pooled else confusion.for_lab(lab)))
        settings.append(("in-lab", f"in-lab {lab} ({len(inlab)} folds' test cells)", parts))
    for i in runs:
        if "only" in names[i] and f"run{i}_own_rows" in d.files:
            own, _ = pool(i, "own")
            other, _ = pool(i, "test")
            settings.append(("lab held out", names[i], [(other, own.confusion(classes))]))
    if not settings:
        raise SystemExit(f"{args.predictions}: no runs to simulate from")
    return classes, settings


def report(args, classes: list[str], settings: list, rng: np.random.Generator,
           start: float) -> int:
    """Simulate each setting's slides, print the table and write ``--json``."""
    out: dict = {"settings": {}, "ranges": {**RANGES, "Neutrophil": NEUTROPHIL},
                 "args": vars(args)}
    lines = []
    for kind, name, parts in settings:
        for size in args.sizes:
            per_part = -(-args.slides // len(parts))
            results = []
            for slides_pool, confusion in parts:
                shares = draw_shares(classes, per_part, rng)
                true, top, counted = simulate(slides_pool, classes, shares, size, rng)
                results.append((true, top, counted, shares, confusion))
            # One measure over all parts' slides (each corrected with its own confusion).
            merged = [measure(*r, size) for r in results]
            res = combine(merged, classes)
            out["settings"][f"{name}, {size} cells"] = res
            target = TARGETS[kind]
            lines.append(f"== {name}: {res['slides']} slides of {size} cells; "
                         f"{100 * res['counted_share_of_cells']:.1f}% of cells counted; "
                         f"{res['no_counted_cells']} slides with none")
            lines.append(f"   {'class':<11} {'MAE raw':>8} {'MAE corr':>9} "
                         f"{'(vs patient: raw':>17} {'corr)':>6} {'cover raw':>10} "
                         f"{'cover corr':>11} {'width corr':>11}")
            for c in classes:
                m = res["per_class"][c]
                ok = "" if size != 200 else (
                    "  target met" if m["corrected_mae_pp"] <= target
                    and 0.93 <= m["corrected_coverage"] <= 0.97 else "  TARGET MISSED")
                lines.append(
                    f"   {c:<11} {m['raw_mae_pp']:8.2f} {m['corrected_mae_pp']:9.2f} "
                    f"{m['raw_mae_vs_patient_pp']:17.2f} {m['corrected_mae_vs_patient_pp']:6.2f} "
                    f"{m['raw_coverage']:10.3f} {m['corrected_coverage']:11.3f} "
                    f"{m['corrected_width_pp']:11.1f}{ok}")
    lines.append(f"cells left out: {list(differential.COUNTED_OUT)}; confusion: "
                 f"{'pooled' if args.pooled else 'the lab of the slide, shrunk to the pooled'};"
                 + (" (each table's model's)" if args.results else
                    f" in-lab confusion measured on {args.confusion_cells or 'half the'} cells"))
    lines.append(f"targets (200 cells): corrected MAE <= 1.5 pp in-lab, <= 3 pp lab held out; "
                 f"coverage 93-97% for every class. Wall time "
                 f"{time.perf_counter() - start:.0f} s")
    print("\n".join(lines))
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=2))
    return 0


def combine(parts: list[dict], classes: list[str]) -> dict:
    """Slide-weighted means of the parts' measures."""
    n = np.asarray([p["slides"] for p in parts], float)
    w = n / n.sum()
    out = {"slides": int(n.sum()),
           "no_counted_cells": int(sum(p["no_counted_cells"] for p in parts)),
           "counted_share_of_cells": float(sum(wi * p["counted_share_of_cells"]
                                               for wi, p in zip(w, parts))),
           "per_class": {}}
    for c in classes:
        keys = parts[0]["per_class"][c]
        out["per_class"][c] = {k: float(sum(wi * p["per_class"][c][k] for wi, p in
                                            zip(w, parts))) for k in keys}
    return out


if __name__ == "__main__":
    raise SystemExit(main())
