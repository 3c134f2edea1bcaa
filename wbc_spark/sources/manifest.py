"""A CSV manifest: ``path`` and optional ``label``, ``group``, ``slide``, ``mask`` columns."""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

from wbc_spark.sources import CATALOG_COLUMNS


class ManifestError(ValueError):
    """The manifest is malformed."""


def catalog(path: str | os.PathLike, classes: list[str] | tuple[str, ...]) -> pd.DataFrame:
    """Catalog rows from a manifest; relative paths are relative to the manifest's folder."""
    path = Path(path)
    df = pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8-sig")
    df.columns = [c.strip().lower() for c in df.columns]
    if "path" not in df.columns:
        raise ManifestError(f"{path}: no 'path' column (columns: {', '.join(df.columns)})")
    allowed = {"path", "label", "group", "slide", "mask"}
    extra = set(df.columns) - allowed
    if extra:
        raise ManifestError(f"{path}: unknown columns {sorted(extra)}; allowed: "
                            f"{sorted(allowed)}")
    canonical = {c.lower(): c for c in classes}
    base = path.resolve().parent

    def absolute(p: str) -> str | None:
        return str((base / p).resolve()) if p else None

    rows = []
    for i, r in enumerate(df.to_dict("records"), start=2):
        label = (r.get("label") or "").strip()
        if label and label.lower() not in canonical:
            raise ManifestError(f"{path}:{i}: label {label!r} is not one of "
                                f"{', '.join(classes)}")
        file = absolute(r["path"].strip())
        if file is None:
            raise ManifestError(f"{path}:{i}: empty path")
        rows.append({
            "image_id": os.path.relpath(file, base),
            "path": file,
            "label": canonical.get(label.lower()) if label else None,
            "group": r.get("group") or None,
            "slide": r.get("slide") or None,
            "mask_path": absolute((r.get("mask") or "").strip()),
            "source": "manifest",
        })
    return pd.DataFrame(rows, columns=list(CATALOG_COLUMNS))
