"""Training augmentation on cell crops (uint8 RGB), chosen for what differs between labs.

* the eight flips and rotations (a cell has no up);
* cell scale jitter of +-12% (locators and microscopes differ);
* stain density jitter: the crop as if stained more or less deeply (how darkly a lab stains
  its cells against their red cells tells the lab, and KRD-WBC's basophil session);
* stain colour jitter: hue, saturation, brightness and contrast shifts of the size seen
  between Wright-Giemsa labs, so the model cannot key on one lab's background tint;
* per-stain jitter (optional, ``hed``): the haematoxylin, eosin and residual stain
  concentrations each scaled on their own, so the ratio of the stains inside the cell (a
  lab's recipe: KRD-WBC's magenta nuclei against PBC-dev's navy ones) changes, not only
  its overall depth or tint;
* grey views (optional, ``grey``): some views without colour, so shape and texture must
  carry the class when colour differs between labs;
* simulated frame edges: with ``data.framing=reflect`` a crop whose cell lies near the edge of
  its field reaches outside the frame, filled by reflection. In KRD-WBC that happened to 85%
  of the basophils (imaged at a higher zoom) and to 6-28% of the other classes, so the
  reflected border itself told basophils apart. Giving every class such borders at random
  takes that cue away. The default ``fit`` crops have no such borders, and the edges still
  lifted both lab-held-out directions (docs/RESULTS.md, "Session 48"), so they stay on.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from wbc_spark.colour import hsv_to_rgb, rgb_to_hsv
from wbc_spark.stain import surround_mean


@dataclass(frozen=True)
class AugmentSettings:
    scale: float = 0.12
    hue: float = 0.04  # fraction of the hue circle (0.04 ~ 14 degrees)
    saturation: float = 0.3
    brightness: float = 0.15
    contrast: float = 0.15
    frame_edge: float = 0.5  # probability that a view gets simulated frame edges
    #: Largest share of the crop's side that a simulated edge fills by reflection.
    frame_edge_width: float = 0.3
    frame_edge_sides: int = 4  # a view with edges gets 1..frame_edge_sides of them
    #: Probability that a view is resampled through a lower resolution (down to
    #: ``min_resolution`` of the side, log-uniform) and back: labs image a cell with anything
    #: from ~90 (KRD-WBC) to ~220 (PBC) pixels across its crop, so sharpness says the lab.
    resolution: float = 0.7
    min_resolution: float = 0.35
    #: Stain density: optical density times exp(+-density), see ``stain_density``; 0: off.
    density: float = 0.0
    #: Per-stain jitter: each stain's concentration times exp(+-hed), see ``hed_jitter``;
    #: 0: off.
    hed: float = 0.0
    #: Probability that a view is turned grey (luminance in all three channels); 0: off.
    grey: float = 0.0


#: Stain vectors in optical density (rows: haematoxylin, eosin, residual), after Ruifrok and
#: Johnston (2001), each of unit length.
RGB_FROM_HED = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]],
                        np.float32)
RGB_FROM_HED /= np.linalg.norm(RGB_FROM_HED, axis=1, keepdims=True)
HED_FROM_RGB = np.linalg.inv(RGB_FROM_HED)
LUMINANCE = np.array([0.299, 0.587, 0.114], np.float32)


def stain_shift(image: np.ndarray, hue: float, saturation: float, brightness: float,
                contrast: float) -> np.ndarray:
    """Shift one uint8 RGB image's stain colour: hue by ``hue`` (circle fraction), scale
    saturation, brightness and contrast by the given factors."""
    hsv = rgb_to_hsv(image.astype(np.float32) / 255.0)
    hsv[..., 0] = (hsv[..., 0] + hue) % 1.0
    hsv[..., 1] = np.clip(hsv[..., 1] * saturation, 0, 1)
    rgb = hsv_to_rgb(hsv) * brightness
    mean = rgb.mean()
    rgb = (rgb - mean) * contrast + mean
    return np.clip(rgb * 255.0 + 0.5, 0, 255).astype(np.uint8)


def stain_density(image: np.ndarray, factor: float) -> np.ndarray:
    """As if the smear had taken up ``factor`` times the stain: each pixel's optical density
    (Beer-Lambert, -log of the light passed, per channel) times ``factor``; then each channel
    scaled so the crop's surroundings keep their mean colour (``stain.surround_balance``), so
    what changes is how dark the cell is against its red cells, not the crop's tint."""
    passed = (image.astype(np.float32) + 1.0) / 256.0
    return with_surround_of(image, 256.0 * passed ** factor - 1.0)


def with_surround_of(image: np.ndarray, out: np.ndarray) -> np.ndarray:
    """``out`` (float RGB, a restained copy of uint8 ``image``) with each channel scaled so
    its surroundings keep ``image``'s mean colour, as uint8."""
    out = out * (surround_mean(image) / np.maximum(surround_mean(np.clip(out, 0, 255)), 1.0))
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


def hed_jitter(image: np.ndarray, rng: np.random.Generator, scale: float,
               shift: float = 0.05) -> np.ndarray:
    """Each stain on its own: the optical density split into haematoxylin, eosin and residual
    concentrations (``HED_FROM_RGB``), each times exp(+-``scale``) plus +-``shift``,
    recombined; then the surroundings' mean colour restored (``with_surround_of``), so the
    stains' ratio inside the cell changes, not the crop's tint."""
    density = -np.log((image.astype(np.float32) + 1.0) / 256.0)
    conc = density @ HED_FROM_RGB
    conc = conc * np.exp(rng.uniform(-scale, scale, 3)).astype(np.float32) \
        + rng.uniform(-shift, shift, 3).astype(np.float32)
    return with_surround_of(image, 256.0 * np.exp(-np.maximum(conc @ RGB_FROM_HED, 0)) - 1.0)


def grey(image: np.ndarray) -> np.ndarray:
    """Luminance (ITU-R BT.601 weights) in all three channels."""
    g = np.clip(image.astype(np.float32) @ LUMINANCE + 0.5, 0, 255).astype(np.uint8)
    return np.repeat(g[..., None], 3, -1)


def rescale(image: np.ndarray, factor: float) -> np.ndarray:
    """Zoom a square crop by ``factor`` about its centre, keeping its size (reflect pad)."""
    size = image.shape[0]
    if abs(factor - 1) < 1e-3:
        return image
    src = size / factor  # side of the source square that maps onto the output
    if src <= size:
        off = (size - src) / 2
        box = (off, off, off + src, off + src)
        return np.asarray(Image.fromarray(image).resize((size, size), Image.BILINEAR, box=box))
    pad = int(np.ceil((src - size) / 2))
    padded = np.pad(image, ((pad, pad), (pad, pad), (0, 0)), mode="reflect")
    off = pad - (src - size) / 2
    box = (off, off, off + src, off + src)
    return np.asarray(Image.fromarray(padded).resize((size, size), Image.BILINEAR, box=box))


def reflect_beyond(image: np.ndarray, side: int, width: int) -> np.ndarray:
    """Replace the outer ``width`` pixels on one side of an H x W x C crop (side 0 right,
    1 top, 2 left, 3 bottom) by the reflection of what lies inside them, as if the frame
    ended there and ``crop_box`` had padded beyond it."""
    turned = np.rot90(image, side)
    w = turned.shape[1]
    if not 0 < width < w // 2:
        raise ValueError(f"frame edge width {width} must lie in 1..{w // 2 - 1}")
    cut = np.pad(turned[:, :w - width], ((0, 0), (0, width), (0, 0)), mode="reflect")
    return np.ascontiguousarray(np.rot90(cut, -side))


def frame_edges(image: np.ndarray, rng: np.random.Generator, width: float,
                max_sides: int) -> np.ndarray:
    """1..``max_sides`` simulated frame edges on random sides, each filling 5%..``width`` of
    the crop's side."""
    sides = rng.choice(4, size=int(rng.integers(1, max_sides + 1)), replace=False)
    for side in sides:
        image = reflect_beyond(image, int(side),
                               max(1, int(rng.uniform(0.05, width) * image.shape[0])))
    return image


def resample(image: np.ndarray, factor: float, down: int = Image.BILINEAR) -> np.ndarray:
    """Down to ``factor`` of the side (filter ``down``) and back up (bilinear): the same crop,
    less sharp."""
    size = image.shape[0]
    small = max(8, int(round(size * factor)))
    low = Image.fromarray(image).resize((small, small), down)
    return np.asarray(low.resize((size, size), Image.BILINEAR))


def augment(image: np.ndarray, rng: np.random.Generator,
            settings: AugmentSettings = AugmentSettings()) -> np.ndarray:
    """One random training view of a uint8 RGB crop."""
    # Drawn only when enabled, so frame_edge=0 reproduces the views of earlier versions.
    if settings.frame_edge > 0 and rng.random() < settings.frame_edge:
        image = frame_edges(image, rng, settings.frame_edge_width, settings.frame_edge_sides)
    if settings.resolution > 0 and rng.random() < settings.resolution:
        image = resample(image, float(np.exp(rng.uniform(np.log(settings.min_resolution), 0))))
    if settings.density > 0:
        image = stain_density(image, float(np.exp(rng.uniform(-settings.density,
                                                              settings.density))))
    k = int(rng.integers(8))
    out = np.rot90(image, k % 4)
    if k >= 4:
        out = out[:, ::-1]
    out = np.ascontiguousarray(out)
    out = rescale(out, float(np.exp(rng.uniform(-settings.scale, settings.scale))))
    out = stain_shift(
        out,
        hue=float(rng.uniform(-settings.hue, settings.hue)),
        saturation=float(np.exp(rng.uniform(-settings.saturation, settings.saturation))),
        brightness=float(np.exp(rng.uniform(-settings.brightness, settings.brightness))),
        contrast=float(np.exp(rng.uniform(-settings.contrast, settings.contrast))),
    )
    # Drawn only when enabled, so views without them stay those of earlier versions.
    if settings.hed > 0:
        out = hed_jitter(out, rng, settings.hed)
    if settings.grey > 0 and rng.random() < settings.grey:
        out = grey(out)
    return out
