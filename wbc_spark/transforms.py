"""Preprocessing: find the white cell from its stain and crop it at a fixed cell scale.

The same ``cell_crop`` runs at ingest (training data) and at scoring time (new images come
without masks), so the model is trained on exactly what it will see. Cropping at a fixed cell
scale also removes KRD-WBC's zoom shortcut: its basophils were imaged at a higher zoom, and a
model fed whole frames can tell them by the size of the cell instead of by the cell.

The locator: in a Wright-Giemsa smear the white cell's nucleus is the most saturated purple in
the field, and red cells are pale pink. ``purple_score`` measures how far a pixel is from grey
towards purple (red and blue above green), Otsu's threshold separates it, and the largest
connected blob is taken as the cell's nucleus, grown to cover the cytoplasm.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image
from scipy import ndimage

from wbc_spark.config import FRAMINGS, STAIN_MODES
from wbc_spark.images import as_rgb
from wbc_spark.sources.krd_wbc import default_root
from wbc_spark.stain import (
    CROP_STAINS,
    FieldStain,
    background_white,
    crop_lab,
    field_stain,
    standardise,
    surround_balance,
    white_balance,
)

#: Side of the square the locator works on; small enough to be cheap, large enough to be exact.
LOCATE_SIZE = 128
#: Purple score below which a pixel is never nucleus (red cells and background stay under ~20).
MIN_PURPLE = 30.0
#: Cytoplasm margin around the nucleus, as a fraction of the nucleus' equivalent side.
GROW = 0.15
#: Smallest blob, as a share of the chosen nuclear blob, taken in as another lobe of it.
MIN_LOBE = 0.15


@dataclass(frozen=True)
class CellBox:
    """A located cell: square crop box in the original image's pixels, and how it was found."""

    left: int
    top: int
    side: int
    found: bool  # False when no purple blob was found and the centre crop was used

    def as_tuple(self) -> tuple[int, int, int, int]:
        return (self.left, self.top, self.left + self.side, self.top + self.side)


def purple_score(rgb: np.ndarray) -> np.ndarray:
    """How purple each pixel is: (R + B) / 2 - G, in 0..255 units (float32, H x W)."""
    rgb = rgb.astype(np.float32)
    return (rgb[..., 0] + rgb[..., 2]) * 0.5 - rgb[..., 1]


def _otsu(values: np.ndarray) -> float:
    hist, edges = np.histogram(values, bins=128)
    centres = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * centres)
    mu0 = m0 / np.maximum(w0, 1)
    mu1 = (m0[-1] - m0) / np.maximum(w1, 1)
    between = w0 * w1 * (mu0 - mu1) ** 2
    return float(centres[int(np.argmax(between))])


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """``ndimage.binary_fill_holes`` by one labelling: the holes are the background's
    4-connected parts that do not touch the border (``binary_fill_holes`` dilates the border's
    background again and again until nothing changes, 4x slower on the locator's grid)."""
    background, n = ndimage.label(~mask)
    edges = np.concatenate([background[0], background[-1], background[:, 0], background[:, -1]])
    filled = np.ones(n + 1, bool)
    filled[edges] = False
    filled[0] = True  # the mask itself
    return filled[background]


def cell_mask(rgb_small: np.ndarray) -> np.ndarray | None:
    """Estimate the white cell's mask on a small RGB image; None when nothing stands out."""
    score = ndimage.uniform_filter(purple_score(rgb_small), size=3)
    threshold = max(_otsu(score), MIN_PURPLE)
    # A field without a stained cell has no bimodal purple: refuse rather than crop noise.
    if score.max() - np.median(score) < 25:
        return None
    # Neutrophil lobes are separate blobs at this threshold: close the gaps between them.
    nuclear = ndimage.binary_closing(score > threshold, iterations=3)
    blobs, n = ndimage.label(nuclear)
    if n == 0:
        return None
    # Each blob's size and centre from three counts (ndimage's per-label sums and centres of
    # mass give the same values, exact sums of integers, at a few times the cost).
    flat = blobs.ravel()
    sizes = np.bincount(flat, minlength=n + 1)[1:]
    # Prefer large blobs near the centre: a cut-off cell at the edge is rarely the subject.
    h, w = score.shape
    yy, xx = np.indices((h, w))
    cy = np.bincount(flat, weights=yy.ravel(), minlength=n + 1)[1:] / sizes
    cx = np.bincount(flat, weights=xx.ravel(), minlength=n + 1)[1:] / sizes
    dist = np.hypot((cy - h / 2) / h, (cx - w / 2) / w)
    best = int(np.argmax(sizes * (1.2 - dist))) + 1
    # At a high zoom (PBC's single-cell images) a neutrophil's lobes stay separate blobs even
    # after the closing: take in every nuclear blob within half the chosen blob's equivalent
    # side, so the cell's whole nucleus, not one lobe, sets the crop's scale.
    # Only blobs of a lobe's size join: platelets, specks and red-cell rims next to the cell
    # (under a tenth of the chosen blob in 373 of 374 such merges over 300 PBC-dev images)
    # would stretch the box, and the cell would sit smaller in its crop than in another lab's.
    chosen = blobs == best
    reach = max(1, int(round(0.5 * np.sqrt(chosen.sum()))))
    near = np.unique(blobs[ndimage.binary_dilation(chosen, iterations=reach) & (blobs > 0)])
    near = near[sizes[near - 1] >= MIN_LOBE * sizes[best - 1]]
    nucleus = fill_holes(np.isin(blobs, near))
    # Grow the nucleus by a margin proportional to its size to cover the cytoplasm.
    radius = max(1, int(round(GROW * np.sqrt(nucleus.sum()))))
    grown = ndimage.binary_dilation(nucleus, iterations=radius)
    return fill_holes(grown)


def field_stain_around(small: np.ndarray, mask: np.ndarray | None) -> FieldStain:
    """The stain of a small field, measured around its white cell (``mask`` from
    ``cell_mask``, widened by a few pixels; None: no cell found, the whole field counts)."""
    cell = ndimage.binary_dilation(mask, iterations=3) if mask is not None else None
    return field_stain(small, cell)


def locate_cell(image: Image.Image, *, context: float = 1.5, stain: str = "none"
                ) -> tuple[CellBox, np.ndarray | None, FieldStain | None]:
    """Square box around the white cell, ``context`` times the cell's larger side.

    Returns the box, the estimated cell mask on a LOCATE_SIZE x LOCATE_SIZE grid (None when
    no cell stood out and the centre square was used instead) and, with ``stain="field"``,
    the field's measured stain (see ``wbc_spark.stain``); the cell is then located again on
    the standardised field, so the locator sees the same colours whatever the lab.
    """
    w, h = image.size
    small = np.asarray(as_rgb(image).resize((LOCATE_SIZE, LOCATE_SIZE), Image.BILINEAR))
    mask = cell_mask(small)
    measured = None
    if stain == "field":
        measured = field_stain_around(small, mask)
        # Locate again in the standardised colours; keep the first answer if nothing stands
        # out there.
        again = cell_mask(standardise(small, measured))
        mask = again if again is not None else mask
    elif stain == "white":
        measured = background_white(small)
    elif stain not in STAIN_MODES:  # the other modes need nothing measured on the field
        raise ValueError(f"stain={stain!r}; choose one of {', '.join(STAIN_MODES)}")
    if mask is None or not mask.any():
        side = min(w, h)
        return CellBox((w - side) // 2, (h - side) // 2, side, found=False), None, measured
    ys, xs = np.nonzero(mask)
    sx, sy = w / LOCATE_SIZE, h / LOCATE_SIZE
    cx = (xs.min() + xs.max() + 1) / 2 * sx
    cy = (ys.min() + ys.max() + 1) / 2 * sy
    extent = max((xs.max() - xs.min() + 1) * sx, (ys.max() - ys.min() + 1) * sy)
    side = int(round(max(extent * context, 32)))
    box = CellBox(int(round(cx - side / 2)), int(round(cy - side / 2)), side, found=True)
    return box, mask, measured


def mask_iou(estimate: np.ndarray | None, truth: np.ndarray) -> float:
    """IoU of the locator's cell mask with a ground-truth mask (resized to the same grid)."""
    if estimate is None:
        return 0.0
    gt = np.asarray(Image.fromarray(truth.astype(np.uint8) * 255)
                    .resize(estimate.shape[::-1], Image.BILINEAR)) > 127
    union = (gt | estimate).sum()
    return float((gt & estimate).sum() / union) if union else 0.0


def crop_box(image: Image.Image, box: CellBox, size: int) -> np.ndarray:
    """Crop ``box`` (padding outside the frame with the image's edge colour) to size x size."""
    # PIL pads out-of-frame areas with black; a black border would itself be a cue, so pad by
    # reflecting instead.
    w, h = image.size
    left, top, right, bottom = box.as_tuple()
    if left >= 0 and top >= 0 and right <= w and bottom <= h:
        return np.asarray(image.resize((size, size), Image.BILINEAR, box=box.as_tuple()))
    arr = np.asarray(image)
    pad = max(0, -left, -top, right - w, bottom - h)
    pad = min(pad, min(w, h) - 1)
    padded = np.pad(arr, ((pad, pad), (pad, pad), (0, 0)), mode="reflect")
    img = Image.fromarray(padded)
    shifted = (left + pad, top + pad, right + pad, bottom + pad)
    return np.asarray(img.resize((size, size), Image.BILINEAR, box=shifted))


def frame_box(box: CellBox, width: int, height: int, framing: str) -> CellBox:
    """The box a crop takes where ``box`` reaches outside a width x height image.

    ``"fit"``: moved inside the frame, and where its side exceeds the image's shorter side
    shrunk to that side (the cell then takes more of the crop), its centre kept as near the
    cell's as the frame allows; nothing is made up. ``"reflect"``: unchanged, ``crop_box``
    fills the outside by reflection (how crops were made before this choice existed).
    """
    if framing == "reflect":
        return box
    if framing != "fit":
        raise ValueError(f"framing={framing!r}; choose one of {', '.join(FRAMINGS)}")
    side = min(box.side, width, height)
    shrink = (box.side - side) // 2
    left = min(max(box.left + shrink, 0), width - side)
    top = min(max(box.top + shrink, 0), height - side)
    return CellBox(left, top, side, found=box.found)


def cell_crop(image: Image.Image, size: int = 224, *, context: float = 1.5,
              stain: str = "none", framing: str = "fit"
              ) -> tuple[np.ndarray, CellBox, np.ndarray | None]:
    """Locate the white cell; return its crop (size x size x 3 uint8 RGB), box (as framed:
    ``frame_box``) and mask.

    ``stain="field"`` standardises the crop's colours by its field's stain first.
    """
    image = as_rgb(image)
    box, mask, measured = locate_cell(image, context=context, stain=stain)
    box = frame_box(box, *image.size, framing)
    crop = crop_box(image, box, size)
    if isinstance(measured, FieldStain):
        crop = standardise(crop, measured)
    elif measured is not None:
        crop = white_balance(crop, measured)
    elif stain in CROP_STAINS:
        crop = CROP_STAINS[stain](crop)
    return crop, box, mask


def dihedral(images: np.ndarray, k: int) -> np.ndarray:
    """The k-th of the eight flips/rotations (k in 0..7) of N x H x W x C images."""
    out = np.rot90(images, k % 4, axes=(1, 2))
    if k >= 4:
        out = out[:, :, ::-1]
    return np.ascontiguousarray(out)


def reference_from_krd_wbc() -> FieldStain:
    """Median field stain over KRD-WBC (how ``REFERENCE`` was set)."""
    stains = []
    for path in sorted((default_root() / "Dataset" / "image").glob("image*.jpg")):
        small = Image.open(path).convert("RGB").resize((LOCATE_SIZE, LOCATE_SIZE),
                                                       Image.BILINEAR)
        small = np.asarray(small)
        stains.append(field_stain_around(small, cell_mask(small)))
    hues = np.array([s.hue for s in stains])
    # Circular median is overkill here: KRD-WBC's field hues sit in one narrow arc.
    centre = np.angle(np.exp(2j * np.pi * hues).mean()) / (2 * np.pi) % 1.0
    offset = (hues - centre + 0.5) % 1.0 - 0.5
    return FieldStain(float((centre + np.median(offset)) % 1.0),
                      float(np.median([s.saturation for s in stains])),
                      float(np.median([s.v_low for s in stains])),
                      float(np.median([s.v_high for s in stains])))


def reinhard_reference_from_krd_wbc() -> tuple[np.ndarray, np.ndarray]:
    """Median CIELAB mean and standard deviation of KRD-WBC's unstandardised crops (how
    ``REINHARD_MEAN`` and ``REINHARD_STD`` were set)."""
    return _median_lab("none")


def lightness_reference_from_krd_wbc() -> tuple[np.ndarray, np.ndarray]:
    """The same over KRD-WBC's surround-balanced crops (how ``LIGHTNESS_MEAN`` and
    ``LIGHTNESS_STD`` were set; their L entries are used)."""
    return _median_lab("surround")


def _median_lab(stain: str) -> tuple[np.ndarray, np.ndarray]:
    stats = [crop_lab(cell_crop(Image.open(path), 224, stain=stain)[0])
             for path in sorted((default_root() / "Dataset" / "image").glob("image*.jpg"))]
    return (np.median([m for m, _ in stats], 0).round(1),
            np.median([s for _, s in stats], 0).round(1))


if __name__ == "__main__":
    print(reference_from_krd_wbc())
    print("Reinhard mean, std:", *reinhard_reference_from_krd_wbc())
    print("lightness mean, std:", *lightness_reference_from_krd_wbc())
