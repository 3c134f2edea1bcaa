"""Stain standardisation: bring each field's stain colour to one reference before the crop.

Labs differ in stain batch, staining time, lamp and camera white balance. On a Wright-Giemsa
field that shows mostly as a global change of hue, of saturation and of brightness/contrast.
The red cells and plasma fill most of the field (the white cell covers 3-7% of a KRD-WBC
image, 19% for its basophils), so the field's own colour statistics measure the lab, not
the white cell. ``field_stain`` measures them on the small copy the cell locator already
makes; ``standardise`` maps an image (the field, or a crop of it) so that they match
``REFERENCE``. The cell's colours relative to its field (an eosinophil's orange granules
against the red cells) are kept; the field's tint, which in KRD-WBC also tells basophils
apart (their session had a pinker background), is removed.

What it cannot undo: changes that are not global, such as one lab's granules taking up more
stain than another's. The training augmentation's colour jitter is there for those.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from wbc_spark.colour import hsv_to_rgb, lab_to_u8, rgb_to_hsv, u8_to_lab
from wbc_spark.config import STAIN_MODES as MODES

#: Largest corrections applied. Lab-to-lab stain differences are well inside them; a field
#: that asks for more (a cell filling the field, KRD-WBC's purple-tinted basophil session)
#: is measuring something else than the stain, and fully "correcting" it would turn a purple
#: nucleus orange. Such corrections are capped, not trusted.
MAX_HUE_SHIFT = 0.08  # of the hue circle (29 degrees)
SATURATION_FACTORS = (0.5, 2.0)
BRIGHTNESS_GAINS = (0.67, 1.5)


@dataclass(frozen=True)
class FieldStain:
    """A field's stain: saturation-weighted circular mean hue (0..1), mean saturation, and
    the 2nd and 98th percentiles of its HSV value (brightness)."""

    hue: float
    saturation: float
    v_low: float
    v_high: float


#: Median of ``field_stain`` over the 600 KRD-WBC fields (``python -m wbc_spark.stain``).
REFERENCE = FieldStain(hue=0.111, saturation=0.131, v_low=0.459, v_high=0.882)


def field_stain(rgb: np.ndarray, cell: np.ndarray | None = None) -> FieldStain:
    """Measure the stain of a uint8 RGB field (a small copy is enough), leaving out the
    pixels where ``cell`` (a boolean mask of the same height and width) is set: the white
    cell must not measure its own colour away."""
    keep = np.ones(rgb.shape[:2], bool) if cell is None else ~cell
    if keep.sum() < 0.1 * keep.size:  # the cell fills the field: measure everything
        keep[:] = True
    hsv = rgb_to_hsv(rgb[keep].astype(np.float32) / 255.0)
    h, s, v = hsv[:, 0], hsv[:, 1], hsv[:, 2]
    # Every pixel votes for the hue with its saturation: grey background has no say.
    angle = 2 * np.pi * h
    x, y = (s * np.cos(angle)).sum(), (s * np.sin(angle)).sum()
    hue = float(np.arctan2(y, x) / (2 * np.pi) % 1.0) if np.hypot(x, y) > 1e-6 else \
        REFERENCE.hue
    v_low, v_high = np.percentile(v, [2, 98])
    return FieldStain(hue, max(float(s.mean()), 1e-3), float(v_low),
                      float(max(v_high, v_low + 1e-3)))


def standardise(rgb: np.ndarray, stain: FieldStain, reference: FieldStain = REFERENCE
                ) -> np.ndarray:
    """Map a uint8 RGB image from ``stain`` towards ``reference``: rotate hue, scale
    saturation, stretch brightness linearly between the percentiles (each correction capped,
    see ``MAX_HUE_SHIFT``)."""
    hsv = rgb_to_hsv(rgb.astype(np.float32) / 255.0)
    shift = (reference.hue - stain.hue + 0.5) % 1.0 - 0.5
    hsv[..., 0] = (hsv[..., 0] + np.clip(shift, -MAX_HUE_SHIFT, MAX_HUE_SHIFT)) % 1.0
    factor = np.clip(reference.saturation / stain.saturation, *SATURATION_FACTORS)
    hsv[..., 1] = np.clip(hsv[..., 1] * factor, 0, 1)
    gain = np.clip((reference.v_high - reference.v_low) / (stain.v_high - stain.v_low),
                   *BRIGHTNESS_GAINS)
    mid = (stain.v_low + stain.v_high) / 2
    hsv[..., 2] = np.clip((hsv[..., 2] - mid) * gain + (reference.v_low + reference.v_high) / 2,
                          0, 1)
    return np.clip(hsv_to_rgb(hsv) * 255.0 + 0.5, 0, 255).astype(np.uint8)


#: Where ``white_balance`` puts a field's background (plasma between the cells): a neutral
#: light grey, as a well white-balanced brightfield camera records an empty slide.
WHITE = 235.0
#: Percentile of each channel taken as the background's level: the plasma and the pale
#: centres of red cells are the field's brightest parts in every Romanowsky-stained smear.
BACKGROUND_PERCENTILE = 95


def background_white(rgb: np.ndarray) -> np.ndarray:
    """The field's background colour (per-channel ``BACKGROUND_PERCENTILE``), float32 x 3."""
    flat = rgb.reshape(-1, 3).astype(np.float32)
    return np.maximum(np.percentile(flat, BACKGROUND_PERCENTILE, axis=0), 1.0)


def white_balance(rgb: np.ndarray, background: np.ndarray) -> np.ndarray:
    """Scale each channel so that ``background`` becomes neutral ``WHITE`` (von Kries).

    This removes what the lamp, the camera's white balance and its exposure add to every
    pixel, the largest part of a lab's colour cast, while the stain's own colours (purple
    nucleus, pink red cells, orange granules) keep their relations to the background.
    """
    gain = WHITE / np.asarray(background, np.float32)
    return np.clip(rgb.astype(np.float32) * gain + 0.5, 0, 255).astype(np.uint8)


#: Mean RGB that ``surround_balance`` gives a crop's surroundings (red cells and plasma around
#: the white cell): about the two labs' white-balanced mean, a pale lilac-grey.
SURROUND = np.array([200.0, 185.0, 200.0], np.float32)
#: The crop's surroundings: outside a centred disc of this radius (share of the side). With
#: the default context of 1.5 the located cell spans the central two thirds.
SURROUND_RADIUS = 0.36


@functools.lru_cache(maxsize=8)
def _surround(side: int) -> np.ndarray:
    """The pixels of a side x side square outside its central disc (read-only)."""
    yy, xx = np.mgrid[:side, :side]
    ring = (yy - side / 2) ** 2 + (xx - side / 2) ** 2 > (SURROUND_RADIUS * side) ** 2
    ring.setflags(write=False)
    return ring


def surround_mean(crop: np.ndarray) -> np.ndarray:
    """Mean RGB of a square crop outside its central disc (the cell's surroundings)."""
    return np.maximum(crop[_surround(crop.shape[0])].astype(np.float32).mean(0), 1.0)


def surround_balance(crop: np.ndarray) -> np.ndarray:
    """Scale each channel so that the crop's surroundings average ``SURROUND`` (grey world on
    the red cells and plasma next to the white cell).

    Stronger than ``white_balance``: besides the lamp and camera it takes out the colour the
    stain gives the red cells, which differs between labs and sessions (KRD-WBC's basophil
    session is bluer than its other fields, PBC's red cells are pinker) and was the cue that
    sent other labs' cells to Basophil. The white cell keeps its colour relative to them.
    """
    out = crop.astype(np.float32)
    out *= SURROUND / surround_mean(crop)  # in place: the same float32 steps, fewer copies
    out += 0.5
    return np.clip(out, 0, 255, out=out).astype(np.uint8)


#: CIELAB mean and standard deviation per channel that ``reinhard`` gives every crop: the
#: medians over KRD-WBC's 600 unstandardised crops (``python -m wbc_spark.transforms``).
REINHARD_MEAN = np.array([61.5, 5.6, 1.6])
REINHARD_STD = np.array([16.1, 11.6, 12.9])
#: Largest factor by which ``reinhard`` stretches or shrinks a channel's spread: a nearly
#: uniform crop (no cell found, an empty corner of plasma) would otherwise be blown up.
REINHARD_FACTORS = (0.5, 2.0)


def crop_lab(crop: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """CIELAB mean and standard deviation per channel of a uint8 RGB crop."""
    lab = u8_to_lab(crop).reshape(-1, 3)
    return lab.mean(0, dtype=np.float64), lab.std(0, dtype=np.float64)


def lab_transfer(crop: np.ndarray, mean: np.ndarray, std: np.ndarray,
                 channels: tuple[int, ...] = (0, 1, 2)) -> np.ndarray:
    """Shift and scale the CIELAB ``channels`` of a uint8 RGB crop so that their mean and
    standard deviation over the crop are ``mean`` and ``std`` (indexed like the channels,
    spread factor capped at ``REINHARD_FACTORS``); the other channels are kept."""
    lab = u8_to_lab(crop)
    for c in channels:
        plane = lab[..., c]
        factor = float(np.clip(std[c] / max(float(plane.std(dtype=np.float64)), 1e-6),
                               *REINHARD_FACTORS))
        lab[..., c] = (plane - float(plane.mean(dtype=np.float64))) * factor + float(mean[c])
    return lab_to_u8(lab)


def reinhard(crop: np.ndarray) -> np.ndarray:
    """Reinhard's colour transfer, in CIELAB: shift and scale each channel of the crop so
    that its mean and standard deviation are ``REINHARD_MEAN`` and ``REINHARD_STD``.

    Beyond ``surround_balance`` (a gain per RGB channel from the surroundings' mean) it also
    matches the spread, a lab's contrast and saturation. Measured on the whole crop, cell
    included: the crops are cut at a fixed cell scale, so the cell covers about the same share
    of every crop whatever its class. Measured on the surroundings alone, the spread is that
    of the red cells against the plasma (KRD-WBC's contrast much more than PBC-dev's), and
    matching it turned PBC-dev's nuclei black.
    """
    return lab_transfer(crop, REINHARD_MEAN, REINHARD_STD)


#: CIELAB lightness mean and standard deviation that ``lightness`` gives every
#: surround-balanced crop: the medians over KRD-WBC's 600 surround-balanced crops (``python
#: -m wbc_spark.transforms``). Indexed like Lab; only L is used.
LIGHTNESS_MEAN = np.array([70.1, 14.5, -12.6])
LIGHTNESS_STD = np.array([17.4, 12.3, 13.2])


def lightness(crop: np.ndarray) -> np.ndarray:
    """``surround_balance``, then the crop's CIELAB lightness (L) mean and spread matched to
    KRD-WBC's; a and b (the hues, an eosinophil's orange granules among them) keep the
    surround balance's colours.

    ``reinhard`` on all three channels took KRD-WBC's darker basophil session away (better
    from KRD-WBC to PBC-dev) but turned PBC-dev's orange granules grey-brown (worse the other
    way): this keeps the first and not the second.
    """
    return lab_transfer(surround_balance(crop), LIGHTNESS_MEAN, LIGHTNESS_STD, channels=(0,))


#: The stain modes that work on the crop alone, with what they do to it (the others measure
#: the field first: see ``transforms.cell_crop``).
CROP_STAINS = {"surround": surround_balance, "reinhard": reinhard, "lightness": lightness}
