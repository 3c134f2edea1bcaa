"""Pictures of what the model is fed: rows of originals, each beside the crop made from it."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw


def pair_tile(image: bytes, crop: np.ndarray, tile: int) -> np.ndarray:
    """An encoded original and its crop (RGB array), each ``tile`` square, then a white gap."""
    original = Image.open(io.BytesIO(image)).convert("RGB").resize((tile, tile))
    small = Image.fromarray(crop).resize((tile, tile))
    return np.concatenate([np.asarray(original), np.asarray(small),
                           np.full((tile, 4, 3), 255, np.uint8)], 1)


def save_rows(rows: list[tuple[str, list[np.ndarray]]], path: str | Path, per_row: int,
              tile: int, label_width: int = 150) -> None:
    """One row per (label, pair tiles), padded to ``per_row`` tiles, saved at ``path``."""
    blank = np.full((tile, 2 * tile + 4, 3), 255, np.uint8)
    strips = [np.concatenate([np.full((tile, label_width, 3), 255, np.uint8)] + tiles
                             + [blank] * (per_row - len(tiles)), 1) for _, tiles in rows]
    canvas = Image.fromarray(np.concatenate(strips, 0))
    pen = ImageDraw.Draw(canvas)
    for i, (text, _) in enumerate(rows):
        lines = text.count("\n") + 1
        pen.multiline_text((6, i * tile + tile // 2 - 6 * lines), text, fill=(0, 0, 0))
    pen.text((6, 4), "original | crop", fill=(0, 0, 0))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
