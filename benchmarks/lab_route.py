"""A lab the model never saw, by the route users take: train on one lab, score another's folder.

    .venv/bin/python benchmarks/lab_route.py [--train-lake ../shared/data/KRD-WBC]
                                             [--score ../shared/data/PBC-dev] [--align false true]

1. ``deploy/submit.sh ingest`` KRD-WBC into runs/bench_route/dataset (once, kept);
2. for each ``--align`` value, ``deploy/submit.sh train_distributed`` on that dataset with
   ``train.align=VALUE`` (conf/local.yaml's recipe otherwise) into runs/bench_route/model_VALUE;
3. ``deploy/submit.sh score`` of the ``--score`` folder (one sub-folder per class, as PBC-dev
   is laid out) into a fresh results table per model;
4. reads each results table and prints, for the images of the five classes: balanced accuracy
   and macro-F1 with 95% bootstrap intervals, per-class recall, the share of images called
   each class (a sink class shows here), and the share flagged for review; for the folders of
   other cell types (not one of the five): the share flagged for review.

Each job's wall time is printed too. Nothing here changes the jobs: they run as a user runs them.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.dataset as pads

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from wbc_spark import metrics  # noqa: E402
from wbc_spark.config import CLASSES, shared_lake  # noqa: E402
from wbc_spark.sources.krd_wbc import default_root  # noqa: E402


def submit(job: str, *args: str) -> float:
    """Run one job through deploy/submit.sh (conf/local.yaml); its wall time in seconds."""
    start = time.monotonic()
    cmd = ["bash", str(REPO / "deploy/submit.sh"), job, "--config", "conf/local.yaml", *args]
    print("$", " ".join(cmd[1:]), flush=True)
    subprocess.run(cmd, cwd=REPO, check=True)
    return time.monotonic() - start


def score_afresh(model: Path, lake: str | Path, results: Path) -> float:
    """Score ``lake`` with ``model`` into a fresh ``results`` table (the tables beside it
    too); the job's wall time in seconds."""
    for old in (results, *(Path(f"{results}{suffix}") for suffix in (
            "_per_class", "_per_class_versions", "_lab_profiles"))):
        shutil.rmtree(old, ignore_errors=True)
        if old.is_symlink() or old.is_file():
            old.unlink()
    return submit("score", f"score.model={model}", f"score.input={lake}",
                  f"score.results={results}")


def train_and_score(dataset: Path, work: Path, name: str, lake: str | Path, *settings: str
                    ) -> tuple[float, float, Path, Path]:
    """Train on ``dataset`` with ``settings`` into ``work``/model_``name``, score ``lake``
    with it into a fresh ``work``/results_``name``: (training s, scoring s, the model's
    artifact, the results table)."""
    model, results = work / f"model_{name}", work / f"results_{name}"
    t = submit("train_distributed", f"data.dataset={dataset}", f"train.output={model}",
               *settings)
    artifact = model / "model.pt"
    return t, score_afresh(artifact, lake, results), artifact, results


def results_frame(table: str | Path, *columns: str) -> pd.DataFrame:
    """``columns`` of every row of a results table, and ``folder``: the name of the folder
    its image lies in (for a labelled folder scored as it is, the image's class)."""
    t = pads.dataset(str(table), format="parquet", partitioning="hive").to_table(
        columns=["path", *columns]).to_pandas()
    return t.assign(folder=t["path"].map(lambda p: Path(p.removeprefix("file:")).parent.name))


def read_results(table: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(class folder, predicted class, needs review, error) of every scored image."""
    t = results_frame(table, "predicted_class", "needs_review", "error")
    return (t["folder"].to_numpy(), t["predicted_class"].to_numpy(),
            t["needs_review"].fillna(False).to_numpy(bool), t["error"].notna().to_numpy())


def summarise(table: Path) -> str:
    folder, predicted, flagged, error = read_results(table)
    five = np.isin(folder, CLASSES) & ~error
    y = np.array([CLASSES.index(f) for f in folder[five]])
    p = np.array([CLASSES.index(c) for c in predicted[five]])
    rep = metrics.classification_report(y, p, list(CLASSES))
    lines = [f"  five classes: n={rep['n']}, {int(error.sum())} unreadable (all folders); "
             f"balanced accuracy {rep['balanced_accuracy']:.3f} "
             f"[{rep['balanced_accuracy_ci'][0]:.3f}, {rep['balanced_accuracy_ci'][1]:.3f}], "
             f"macro-F1 {rep['macro_f1']:.3f} "
             f"[{rep['macro_f1_ci'][0]:.3f}, {rep['macro_f1_ci'][1]:.3f}]",
             "  " + "  ".join(f"{c} recall {rep['per_class'][c]['recall']:.2f}"
                              for c in CLASSES),
             "  called: " + "  ".join(f"{c} {np.mean(p == i):.1%}"
                                       for i, c in enumerate(CLASSES)),
             f"  flagged for review: {flagged[five].mean():.1%} of the five classes; "
             f"balanced accuracy of the unflagged "
             f"{metrics.classification_report(y[~flagged[five]], p[~flagged[five]], list(CLASSES))['balanced_accuracy']:.3f}"
             f" (n={int((~flagged[five]).sum())})"]
    for other in sorted(set(folder[~np.isin(folder, CLASSES) & ~error])):
        sel = (folder == other) & ~error
        lines.append(f"  {other} (not one of the five): n={int(sel.sum())}, flagged "
                     f"{flagged[sel].mean():.1%}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train-lake", default=str(default_root()))
    ap.add_argument("--score", default=str(shared_lake("PBC-dev", "WBC_SPARK_PBC_DEV")))
    ap.add_argument("--align", nargs="+", default=["false", "true"], choices=["false", "true"])
    ap.add_argument("--work", default="runs/bench_route")
    args = ap.parse_args(argv)
    work = (REPO / args.work).resolve()
    dataset = work / "dataset"
    if not dataset.exists():
        s = submit("ingest", "data.source=krd_wbc", f"data.lake={args.train_lake}",
                   f"data.dataset={dataset}", f"data.quarantine={work / 'quarantine'}")
        print(f"ingest: {s:.0f} s", flush=True)
    report = []
    for align in args.align:
        t, s, _, results = train_and_score(dataset, work, align, args.score,
                                           f"train.align={align}")
        report.append(f"train.align={align}: training {t:.0f} s, scoring {s:.0f} s "
                      f"({args.score})\n{summarise(results)}")
    print("\n".join(report))


if __name__ == "__main__":
    os.environ.setdefault("PYSPARK_PYTHON", str(REPO / ".venv/bin/python"))
    main()
