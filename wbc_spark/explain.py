"""Where the model looks: class activation maps of the trained head, scored against the masks.

The trainable part ends with global average pooling and one linear layer, so Grad-CAM at the
last Inception block reduces to the class activation map (Zhou et al. 2016): the block's
1024 feature maps weighted by the predicted class's row of ``fc``. It is computed from the
cached frozen-part outputs, so it costs one pass through the trained blocks.

``mass_on_cell`` is the fraction of a map's positive mass that falls on the white cell (its
KRD-WBC mask, cut with the same box as the crop); ``area_on_cell`` is the fraction of the
crop the cell covers, which is what a map that ignores the cell would score.
"""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch.nn import functional as F


@torch.no_grad()
def class_activation_maps(model, frozen_out: torch.Tensor, batch: int = 64
                          ) -> tuple[np.ndarray, np.ndarray]:
    """(N x h x w maps of the predicted class, clipped at 0; predicted classes)."""
    model.eval()
    blocks = model.trainable[:-1]  # everything before the global average pooling
    maps, preds = [], []
    for i in range(0, len(frozen_out), batch):
        a = blocks(frozen_out[i:i + batch].float())  # N x 1024 x h x w
        logits = model.fc(a.mean((2, 3)))
        k = logits.argmax(1)
        cam = torch.einsum("nchw,nc->nhw", a, model.fc.weight[k])
        maps.append(cam.clamp(min=0))
        preds.append(k)
    return torch.cat(maps).numpy(), torch.cat(preds).numpy()


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


def upsample(maps: np.ndarray, size: int) -> np.ndarray:
    t = torch.from_numpy(maps).float()[:, None]
    return F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False)[:, 0].numpy()


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


def heat_overlay(crop: np.ndarray, upsampled_map: np.ndarray, strength: float = 0.6
                 ) -> np.ndarray:
    """The crop (float RGB) with a map of its size laid over it in red, scaled to its peak."""
    m = upsampled_map
    heat = m / m.max() if m.max() > 0 else m
    rgb = crop.astype(np.float32)
    rgb[..., 0] = rgb[..., 0] * (1 - strength * heat) + 255 * strength * heat
    rgb[..., 1:] *= (1 - strength * heat)[..., None]
    return rgb


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
