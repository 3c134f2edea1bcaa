"""KRD-WBC in its published layout, with the quirks listed in its PROVENANCE.md handled.

* ``class labels.csv`` starts with a UTF-8 byte-order mark and its header is
  ``Image ID,Categoriy`` (sic);
* IDs are ``ImageN``, sometimes ``imageN``, and three are misspelt ``ImaegN``: match on N;
* masks are JPEGs with a compression halo: threshold above 127 (done at ingest);
* known duplicates (same field or same cell) share a group so that splits keep them together.
"""

from __future__ import annotations

import csv
import os
import re
from pathlib import Path

import pandas as pd

from wbc_spark.config import shared_dir
from wbc_spark.sources import CATALOG_COLUMNS

ENV_KRD_WBC = "WBC_SPARK_KRD_WBC"
LABEL_FILE = "class labels.csv"

#: Pairs of image numbers that show the same content (PROVENANCE.md): 200 and 202 are
#: byte-identical, 91/394 and 69/310 are one field photographed twice, 111/113 are probably
#: one cell flipped.
KNOWN_DUPLICATES: tuple[tuple[int, ...], ...] = ((200, 202), (91, 394), (69, 310), (111, 113))

_ID = re.compile(r"^\s*[A-Za-z]+\s*(\d+)\s*$")


class LabelFileError(ValueError):
    """The label file cannot be read unambiguously."""


def default_root() -> Path:
    """KRD-WBC's folder: $WBC_SPARK_KRD_WBC, else ../shared/data/KRD-WBC beside the repo."""

    if os.environ.get(ENV_KRD_WBC):
        return Path(os.environ[ENV_KRD_WBC])
    shared = shared_dir()
    if shared is None:
        raise FileNotFoundError(f"KRD-WBC not found: set data.lake or {ENV_KRD_WBC} to its "
                                "folder (see README 'Data')")
    return shared / "data" / "KRD-WBC"


def read_labels(path: str | os.PathLike, classes: list[str] | tuple[str, ...]) -> dict[int, str]:
    """Image number -> class name from KRD-WBC's quirky label file.

    Raises:
        LabelFileError: unknown header, an ID without a number, an unknown class, or one number
            listed twice with two different labels.
    """
    path = Path(path)
    canonical = {c.lower(): c for c in classes}
    with open(path, encoding="utf-8-sig", newline="") as f:  # utf-8-sig drops the BOM
        rows = list(csv.reader(f))
    if not rows:
        raise LabelFileError(f"{path}: empty label file")
    header = [h.strip().lower() for h in rows[0]]
    if len(header) < 2 or header[0] != "image id" or header[1] not in ("category", "categoriy"):
        raise LabelFileError(f"{path}: header {rows[0]!r}, expected 'Image ID,Categoriy'")
    labels: dict[int, str] = {}
    for line_no, row in enumerate(rows[1:], start=2):
        if not row or not "".join(row).strip():
            continue
        match = _ID.match(row[0])
        if not match:
            raise LabelFileError(f"{path}:{line_no}: image ID {row[0]!r} has no number")
        label = canonical.get(row[1].strip().lower())
        if label is None:
            raise LabelFileError(f"{path}:{line_no}: class {row[1]!r} is not one of "
                                 f"{', '.join(classes)}")
        number = int(match.group(1))
        if labels.get(number, label) != label:
            raise LabelFileError(f"{path}:{line_no}: image {number} labelled both "
                                 f"{labels[number]} and {label}")
        labels[number] = label
    return labels


def catalog(root: str | os.PathLike, classes: list[str] | tuple[str, ...]) -> pd.DataFrame:
    """One row per labelled KRD-WBC image (missing files are kept: ingest quarantines them)."""
    root = Path(root)
    label_file = root / LABEL_FILE
    if not label_file.is_file():
        raise FileNotFoundError(f"{label_file}: KRD-WBC label file not found; set data.lake or "
                                f"{ENV_KRD_WBC} to the dataset's folder")
    labels = read_labels(label_file, classes)
    group_of = {n: f"krd-dup-{'-'.join(map(str, pair))}" for pair in KNOWN_DUPLICATES
                for n in pair}
    rows = []
    for number, label in sorted(labels.items()):
        rows.append({
            "image_id": f"krd-wbc/image{number}",
            "path": str((root / "Dataset" / "image" / f"image{number}.jpg").resolve()),
            "label": label,
            "group": group_of.get(number, f"krd-wbc/image{number}"),
            # No slide IDs are published; the acquisition is the only slide-like grouping.
            "slide": None,
            "mask_path": str((root / "Dataset" / "mask" / f"mask{number}.jpg").resolve()),
            "source": "krd_wbc",
        })
    return pd.DataFrame(rows, columns=list(CATALOG_COLUMNS))
