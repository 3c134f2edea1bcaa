"""What the model was fed for the cells it got wrong: crops per (true, predicted) class.

    python benchmarks/confusion_crops.py --results DIR [DIR ...] --model MODEL.pt \
        --pairs Neutrophil:Monocyte,Neutrophil:Eosinophil,Neutrophil:Neutrophil \
        [--reference DATASET --reference-lab LAB --reference-classes Monocyte,Eosinophil] \
        [--per 8] --out FIGURE.png

Reads scoring job results tables (``runs/results``-like) whose images lie in class folders
(``.../Neutrophil/x.jpg``, as ``benchmarks/adapt_route.py`` lays out a new lab's rest), so
the folder is the true class. For each TRUE:PREDICTED pair it prints how many cells went
that way and their mean probabilities, and draws up to ``--per`` of them: the original
beside the crop the model's own preprocessing makes of it (the network's input; the lab
alignment acts later, on the frozen features). ``--reference`` adds rows of a dataset's
stored crops of one lab and class (for an adapted model, its home lab's cells, most of them in
its training split).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.dataset as pads

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import pictures  # noqa: E402
from benchmarks.lab_route import results_frame  # noqa: E402
from wbc_spark import artifact  # noqa: E402
from wbc_spark.preprocessing import Preprocessing  # noqa: E402
from wbc_spark.sources.folder import local_path  # noqa: E402

TILE = 112


def read_results(dirs: list[str], classes: list[str]) -> pd.DataFrame:
    """The results rows of every table, with the true class from the image's folder."""
    columns = ["sha256", "predicted_class", *[f"p_{c}" for c in classes], "needs_review",
               "error"]
    df = pd.concat([results_frame(d, *columns) for d in dirs], ignore_index=True)
    df = df[df["error"].isna() & df["predicted_class"].notna()]
    return df.rename(columns={"folder": "true_class"})


def pair_tiles(rows: pd.DataFrame, pre: Preprocessing, per: int) -> list[np.ndarray]:
    """Original | crop tiles for up to ``per`` rows (spread over the rows, in path order)."""
    rows = rows.sort_values("path")
    pick = rows.iloc[np.linspace(0, len(rows) - 1, min(per, len(rows))).round().astype(int)]
    tiles = []
    for p in pick["path"]:
        data = Path(local_path(p)).read_bytes()
        tiles.append(pictures.pair_tile(data, pre.crop(data)[0], TILE))
    return tiles


def reference_tiles(dataset: str, lab: str, label: str, per: int) -> list[np.ndarray]:
    """Original | stored crop tiles for ``per`` of a dataset's images of one lab and class."""
    table = pads.dataset(dataset, format="parquet", partitioning="hive").to_table(
        columns=["path", "source", "label", "image", "crop", "crop_size"],
        filter=(pads.field("source") == lab) & (pads.field("label") == label)).to_pandas()
    table = table.sort_values("path")
    pick = table.iloc[np.linspace(0, len(table) - 1, min(per, len(table))).round().astype(int)]
    return [pictures.pair_tile(r.image, np.frombuffer(r.crop, np.uint8).reshape(
        int(r.crop_size), int(r.crop_size), 3), TILE) for r in pick.itertuples()]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--results", nargs="+", required=True,
                    help="results tables (folders); rows of all of them are counted")
    ap.add_argument("--model", required=True, help="the model.pt that scored them")
    ap.add_argument("--pairs", required=True, help="TRUE:PREDICTED,... (class names)")
    ap.add_argument("--reference", help="a dataset folder to take one lab's crops from")
    ap.add_argument("--reference-lab", default="")
    ap.add_argument("--reference-classes", default="")
    ap.add_argument("--per", type=int, default=8, help="cells drawn per row")
    ap.add_argument("--out", required=True, help="the picture (PNG)")
    args = ap.parse_args(argv)
    _, meta = artifact.load(args.model)
    pre = Preprocessing.from_artifact(meta)
    classes = list(meta["classes"])
    df = read_results(args.results, classes)
    rows = []
    for pair in args.pairs.split(","):
        if pair.count(":") != 1:
            raise SystemExit(f"confusion_crops: --pairs wants TRUE:PREDICTED,..., got {pair!r}")
        true, predicted = pair.split(":")
        for name in (true, predicted):
            if name not in classes:
                raise SystemExit(f"confusion_crops: {name!r} is not one of the model's classes "
                                 f"{classes}")
        of_true = df[df["true_class"] == true]
        sel = of_true[of_true["predicted_class"] == predicted]
        means = " ".join(f"{c[:1]} {sel[f'p_{c}'].mean():.2f}" for c in classes)
        distinct = sel.drop_duplicates("sha256")
        print(f"{true} called {predicted}: {len(sel)} of {len(of_true)} "
              f"({sel['needs_review'].sum()} flagged; {len(distinct)} distinct images); "
              f"mean probabilities {means}")
        rows.append((f"{true}\ncalled {predicted}\n{len(sel)} of {len(of_true)}",
                     pair_tiles(distinct, pre, args.per) if len(sel) else []))
    if args.reference:
        for label in filter(None, args.reference_classes.split(",")):
            rows.append((f"{args.reference_lab}\n{label}\n(reference)",
                         reference_tiles(args.reference, args.reference_lab, label, args.per)))
    pictures.save_rows(rows, args.out, args.per, TILE, label_width=190)
    print(f"picture: {args.out}")


if __name__ == "__main__":
    main()
