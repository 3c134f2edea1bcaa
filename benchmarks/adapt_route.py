"""Adapting to a new lab by the route users take: README's "Adapting to your lab", end to end.

    .venv/bin/python benchmarks/adapt_route.py [--k 25] [--draw 0] [--views 1 4] [--reverse]
                                               [--new ../shared/data/PBC-dev]
                                               [--tag T section.key=value ...]

1. Draws ``--k`` images per class of the new lab (draw ``--draw``; a class with fewer than
   2k images gives half of them, so some stay to test) into
   runs/bench_adapt/k<K>_draw<D>/labelled/<class>/, the lab's labelled cells; the rest of its
   five classes go to .../rest/<class>/ (hard links where the file system allows, else
   copies). The new lab is a folder with one sub-folder per class, as PBC-dev is laid out;
   with ``--reverse`` it is KRD-WBC, whose label file is laid out that way here as a user
   would, a known duplicate pair drawn as one (the work folder is then rev_k<K>_draw<D>).
2. ``deploy/submit.sh ingest`` of the home lab (KRD-WBC; with ``--reverse`` PBC-dev from its
   labels.csv, as ``make demo`` ingests it) and of the labelled folder
   (``data.lab=new_lab``) into one dataset (once per draw, kept once both have finished);
3. for each ``--views`` value N, ``deploy/submit.sh train_distributed`` with README's adapting
   settings (``ADAPTING``), any ``section.key=value`` given after them (a lever to measure;
   its models and tables are named with ``--tag``) and ``model.test_views=N``: the same
   seed, so the same weights, calibrated for N test-time views;
4. ``deploy/submit.sh score`` of the rest of the new lab with each model, a fresh results
   table each, and the scores of its images against their folders: balanced accuracy and
   macro-F1 with 95% intervals, per-class recall, the share called each class, the share
   flagged for review (``benchmarks/lab_route.py``'s summary);
5. the differential of slides of 200 cells drawn in blood's shares from those scored cells,
   raw against corrected with the model's confusion for the new lab
   (``benchmarks/differential.py --results``; written to ``differential_views{N}.json``).

Every job's wall time is printed. Nothing here changes the jobs: they run as a user runs them.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks import differential  # noqa: E402
from benchmarks.lab_route import submit, summarise, train_and_score  # noqa: E402
from wbc_spark.config import CLASSES, shared_lake  # noqa: E402
from wbc_spark.sources import krd_wbc  # noqa: E402

# README's adapting command (besides train.output and model.test_views).
ADAPTING = ("train.align=false", "train.sampling=lab_class_equal",
            "model.freeze_until=inception4c", "train.block_lr_factor=0.3", "augment.hed=0",
            "augment.grey=0", "augment.density=0", "augment.resolution=0",
            "augment.frame_edge=0", "train.selection=last")


def folder_catalog(lab: Path) -> pd.DataFrame:
    """path, label and group (the file itself) of each image in ``lab``'s class folders."""
    rows = [(str(p), cls, str(p)) for cls in CLASSES for p in sorted((lab / cls).iterdir())
            if p.is_file() and not p.name.startswith(".")]
    return pd.DataFrame(rows, columns=["path", "label", "group"])


def draw_labelled(catalog: pd.DataFrame, k: int, draw: int, work: Path) -> dict[str, int]:
    """Split each class of ``catalog`` (path, label, group) into ``k`` labelled groups of
    images (half the class where it has fewer than 2k images; seeded by ``draw``) and the
    rest, as class folders under ``work``/labelled and ``work``/rest; the rest's count per
    class."""
    rest_counts = {}
    for index, cls in enumerate(CLASSES):
        of_class = catalog[catalog["label"] == cls]
        groups = sorted(of_class["group"].unique())
        take = min(k, len(of_class) // 2)
        if take < 1:
            raise SystemExit(f"{cls}: {len(of_class)} images, need 2 or more to label and test")
        chosen = np.random.default_rng([draw, index]).choice(len(groups), take, replace=False)
        pick = {groups[i] for i in chosen}
        for path, group in zip(of_class["path"], of_class["group"]):
            target = work / ("labelled" if group in pick else "rest") / cls / Path(path).name
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(path, target)
            except OSError:
                shutil.copy2(path, target)
        rest_counts[cls] = int((~of_class["group"].isin(pick)).sum())
    return rest_counts


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reverse", action="store_true",
                    help="PBC-dev is the home lab and KRD-WBC the new one")
    ap.add_argument("--new", help="the new lab: one sub-folder per class (default PBC-dev; "
                    "with --reverse, KRD-WBC's folder)")
    ap.add_argument("--home", help="the home lab: KRD-WBC's folder (with --reverse, "
                    "PBC-dev's folder with its labels.csv)")
    ap.add_argument("--k", type=int, default=25, help="labelled images per class")
    ap.add_argument("--draw", type=int, default=0)
    ap.add_argument("--views", type=int, nargs="+", default=[1, 4],
                    help="model.test_views of each model trained")
    ap.add_argument("--work", default="runs/bench_adapt")
    ap.add_argument("--tag", default="", help="suffix of the models' and tables' names "
                    "(needed with overrides, so README's own runs are not overwritten)")
    ap.add_argument("overrides", nargs="*", help="section.key=value after README's settings")
    args = ap.parse_args(argv)
    if args.overrides and not args.tag:
        ap.error("overrides need a --tag, or they would replace README's runs' models")
    pbc = Path((args.home if args.reverse else args.new)
               or shared_lake("PBC-dev", "WBC_SPARK_PBC_DEV"))
    krd = Path((args.new if args.reverse else args.home) or krd_wbc.default_root())
    home, new = (pbc, krd) if args.reverse else (krd, pbc)
    prefix = "rev_" if args.reverse else ""
    work = (REPO / args.work / f"{prefix}k{args.k}_draw{args.draw}").resolve()
    dataset = work / "dataset"
    # Written once both ingests have finished: a work folder without it (a run stopped
    # half-way) is drawn and ingested afresh, never trained on half a dataset.
    ingested = work / "INGESTED"
    if not ingested.exists():
        shutil.rmtree(work, ignore_errors=True)
        if args.reverse:  # KRD-WBC's label file, the images that are there
            catalog = krd_wbc.catalog(new, CLASSES)
            catalog = catalog[catalog["path"].map(os.path.isfile)]
        else:
            catalog = folder_catalog(new)
        rest = draw_labelled(catalog, args.k, args.draw, work)
        print(f"new lab {new}: {args.k} labelled per class (half of a class with fewer than "
              f"{2 * args.k}); rest {rest}", flush=True)
        paths = (f"data.dataset={dataset}", f"data.quarantine={work / 'quarantine'}")
        home_source = (("data.source=manifest", f"data.lake={home / 'labels.csv'}",
                        "data.lab=PBC-dev") if args.reverse
                       else ("data.source=krd_wbc", f"data.lake={home}"))
        s = submit("ingest", *home_source, *paths)
        s += submit("ingest", "data.source=folder", f"data.lake={work / 'labelled'}",
                    "data.lab=new_lab", *paths)
        ingested.write_text(f"{home}\n{work / 'labelled'}\n")
        print(f"ingest: {s:.0f} s", flush=True)
    report = []
    for views in args.views:
        t, s, model, results = train_and_score(
            dataset, work, f"views{views}{args.tag}", work / "rest",
            f"train.petastorm_cache={work / 'petastorm_cache'}", *ADAPTING, *args.overrides,
            f"model.test_views={views}")
        setting = " ".join([f"model.test_views={views}", *args.overrides])
        report.append(f"{setting}: training {t:.0f} s, scoring {s:.0f} s "
                      f"(the rest of {new}, k={args.k}, draw {args.draw})\n"
                      f"{summarise(results)}")
        differential.main(["--results", str(results),
                           "--models", str(model),
                           "--slides", "300", "--sizes", "200",
                           "--json", str(work / f"differential_views{views}{args.tag}.json")])
    print("\n".join(report))


if __name__ == "__main__":
    os.environ.setdefault("PYSPARK_PYTHON", str(REPO / ".venv/bin/python"))
    main()
