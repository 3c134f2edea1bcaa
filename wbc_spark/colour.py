"""RGB <-> HSV and RGB <-> CIELAB on numpy arrays, for the stain standardisation and the
colour augmentation."""

from __future__ import annotations

import numpy as np


def rgb_to_hsv(rgb: np.ndarray) -> np.ndarray:
    """float RGB in 0..1 (... x 3) -> HSV in 0..1."""
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    # Element-wise over the three planes: the same values as rgb.max(-1), but numpy reduces
    # a length-3 inner axis about 7x slower (this runs on every crop at ingest and scoring).
    maxc = np.maximum(np.maximum(r, g), b)
    minc = np.minimum(np.minimum(r, g), b)
    v = maxc
    delta = maxc - minc
    s = np.where(maxc > 0, delta / np.maximum(maxc, 1e-8), 0)
    safe = np.maximum(delta, 1e-8)
    rc, gc, bc = (maxc - r) / safe, (maxc - g) / safe, (maxc - b) / safe
    h = np.where(r == maxc, bc - gc, np.where(g == maxc, 2.0 + rc - bc, 4.0 + gc - rc))
    h = np.where(delta > 0, (h / 6.0) % 1.0, 0.0)
    return np.stack([h, s, v], -1)


def hsv_to_rgb(hsv: np.ndarray) -> np.ndarray:
    h, s, v = hsv[..., 0], hsv[..., 1], hsv[..., 2]
    i = np.floor(h * 6.0)
    f = h * 6.0 - i
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    i = i.astype(np.int32) % 6
    conds = [i == k for k in range(6)]
    r = np.select(conds, [v, q, p, p, t, v])
    g = np.select(conds, [t, v, v, q, p, p])
    b = np.select(conds, [p, p, t, v, v, q])
    return np.stack([r, g, b], -1)


# sRGB (D65) <-> CIE XYZ, and the D65 white point, as IEC 61966-2-1 and CIE 15 give them.
_RGB_TO_XYZ = np.array([[0.412453, 0.357580, 0.180423],
                        [0.212671, 0.715160, 0.072169],
                        [0.019334, 0.119193, 0.950227]])
_XYZ_TO_RGB = np.linalg.inv(_RGB_TO_XYZ)
_WHITE = np.array([0.950456, 1.0, 1.088754])
_EPSILON = (6 / 29) ** 3


def _decode(rgb: np.ndarray) -> np.ndarray:
    """sRGB in 0..1 -> linear light."""
    return np.where(rgb > 0.04045, ((rgb + 0.055) / 1.055) ** 2.4, rgb / 12.92)


def _encode(linear: np.ndarray) -> np.ndarray:
    """Linear light in 0..1 -> sRGB."""
    return np.where(linear > 0.0031308, 1.055 * linear ** (1 / 2.4) - 0.055, 12.92 * linear)


def _linear_to_lab(linear: np.ndarray) -> np.ndarray:
    xyz = linear @ (_RGB_TO_XYZ.T / _WHITE).astype(linear.dtype)
    # exp(log / 3) rather than np.cbrt: the same to float32's precision, about 4x faster.
    cube_root = np.exp(np.log(np.maximum(xyz, _EPSILON)) / 3)
    f = np.where(xyz > _EPSILON, cube_root, xyz / (3 * (6 / 29) ** 2) + 4 / 29)
    return np.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]),
                     200 * (f[..., 1] - f[..., 2])], -1)


def _lab_to_linear(lab: np.ndarray) -> np.ndarray:
    """CIELAB -> linear light, clipped to 0..1."""
    fy = (lab[..., 0] + 16) / 116
    f = np.stack([fy + lab[..., 1] / 500, fy, fy - lab[..., 2] / 200], -1)
    xyz = np.where(f > 6 / 29, f ** 3, 3 * (6 / 29) ** 2 * (f - 4 / 29))
    return np.clip(xyz @ (_XYZ_TO_RGB * _WHITE).T.astype(lab.dtype), 0, 1)


def rgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """float sRGB in 0..1 (... x 3) -> CIELAB (L in 0..100, a and b about -100..100)."""
    return _linear_to_lab(_decode(rgb))


def lab_to_rgb(lab: np.ndarray) -> np.ndarray:
    """CIELAB -> float sRGB, clipped to 0..1 (colours outside the gamut are clipped)."""
    return _encode(_lab_to_linear(lab))


# The uint8 paths below do the same in float32, with the sRGB curves as tables: 256 inputs
# one way; 65,536 steps of linear light the other (at most 0.05 of a level between steps, so
# a pixel differs from the float64 path by at most one level). About 3x faster: the curves'
# powers were most of the time of the stain modes that work in CIELAB.
_DECODE_U8 = _decode(np.arange(256) / 255.0).astype(np.float32)
_ENCODE_STEPS = 65535
_ENCODE_U8 = np.clip(_encode(np.arange(_ENCODE_STEPS + 1) / _ENCODE_STEPS) * 255 + 0.5,
                     0, 255).astype(np.uint8)


def u8_to_lab(rgb: np.ndarray) -> np.ndarray:
    """uint8 sRGB (... x 3) -> float32 CIELAB."""
    return _linear_to_lab(_DECODE_U8[rgb])


def lab_to_u8(lab: np.ndarray) -> np.ndarray:
    """float32 CIELAB -> uint8 sRGB (colours outside the gamut clipped)."""
    linear = _lab_to_linear(lab.astype(np.float32, copy=False))
    return _ENCODE_U8[(linear * _ENCODE_STEPS + 0.5).astype(np.int32)]
