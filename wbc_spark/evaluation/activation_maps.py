"""Where the model looks, measured: the share of each class activation map's mass on the
located cell (against the cell's share of the crop), and a picture of crops with their maps.
Used by the benchmarks (``benchmarks/accuracy.py``), not by the pipeline."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageDraw

from wbc_spark.explain import heat_overlay, upsample


def crop_mask(mask_png: bytes, box: list[int], size: int) -> np.ndarray:
    """The ground-truth mask cut with the crop's box (outside the frame: not cell)."""
    mask = np.asarray(Image.open(io.BytesIO(mask_png)).convert("L")) > 127
    left, top, side = box
    canvas = np.zeros((side, side), bool)
    h, w = mask.shape
    y0, x0 = max(0, top), max(0, left)
    y1, x1 = min(h, top + side), min(w, left + side)
    if y1 > y0 and x1 > x0:
        canvas[y0 - top:y1 - top, x0 - left:x1 - left] = mask[y0:y1, x0:x1]
    img = Image.fromarray(canvas.astype(np.uint8) * 255).resize((size, size), Image.BILINEAR)
    return np.asarray(img) > 127


def mass_on_cell(maps: np.ndarray, masks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per image: fraction of the map's mass on the cell, and whether its peak is on it."""
    up = upsample(maps, masks.shape[-1]).clip(min=0)
    total = up.sum((1, 2))
    inside = (up * masks).sum((1, 2))
    frac = np.where(total > 0, inside / np.maximum(total, 1e-12), np.nan)
    flat = up.reshape(len(up), -1).argmax(1)
    hit = masks.reshape(len(masks), -1)[np.arange(len(masks)), flat]
    return frac, hit


def area_on_cell(masks: np.ndarray) -> np.ndarray:
    return masks.mean((1, 2))


def overlay_png(crops: np.ndarray, maps: np.ndarray, masks: np.ndarray, titles: list[str],
                path: str, columns: int = 6) -> None:
    """A grid of crops with their map in red and the true cell outline in green."""
    size = crops.shape[1]
    up = upsample(maps, size)
    rows = -(-len(crops) // columns)
    sheet = Image.new("RGB", (columns * (size + 4), rows * (size + 18)), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (crop, m, mask, title) in enumerate(zip(crops, up, masks, titles)):
        rgb = heat_overlay(crop, m)
        edge = mask ^ np.pad(mask, 1)[2:, 1:-1] | mask ^ np.pad(mask, 1)[1:-1, 2:]
        rgb[edge] = (0, 220, 0)
        x, y = (i % columns) * (size + 4), (i // columns) * (size + 18)
        sheet.paste(Image.fromarray(rgb.clip(0, 255).astype(np.uint8)), (x, y + 16))
        draw.text((x + 2, y + 2), title, fill="black")
    sheet.save(path)
