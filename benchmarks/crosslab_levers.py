"""Cross-lab levers that are not part of the recipe, measured with ``benchmarks/crosslab.py``.

    .venv/bin/python benchmarks/crosslab_levers.py LEVER[,LEVER...] [crosslab.py arguments]

Runs ``benchmarks/crosslab.py`` unchanged except for what the named levers do to the crops
the model is fed (training views and test crops alike) or to the training views only:

* ``densnorm``: every crop's stain depth brought to one value: its optical density scaled
  (``augment.stain_density``) so that the cell's density against its surroundings (90th
  percentile over the central disc, as ``crosslab.py`` measures it) becomes ``--density-ref``;
* ``gray``: every crop turned to luminance (three equal channels);
* ``randgray``: half of the training views turned to luminance, test crops left in colour;
* ``jpeg``: half of the training views re-encoded as JPEG at a random quality of 20-90;
* ``noise``: half of the training views with Gaussian noise (sigma 1-6 grey levels);
* ``hed``: every training view's stains jittered one by one: optical density split into
  Ruifrok and Johnston's haematoxylin, eosin and residual vectors, each concentration times
  e^+-0.6 plus +-0.05, recombined, then the surroundings' mean colour restored (as
  ``augment.stain_density`` does), so the stains' ratio inside the cell changes, not the
  crop's tint.

For example, the lab-held-out part with grey crops:
``benchmarks/crosslab_levers.py gray --dataset runs/dataset --only heldout``.
A lever that helps in both directions belongs in ``wbc_spark`` (ingest or ``augment``), not
here.
"""

from __future__ import annotations

import io
import runpy
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from wbc_spark import augment as aug
from wbc_spark.evaluation import crossval

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from crosslab import cell_density  # noqa: E402
LEVERS = ("densnorm", "gray", "randgray", "jpeg", "noise", "hed")
#: Stain vectors in optical density (rows: haematoxylin, eosin, residual), Ruifrok & Johnston.
RGB_FROM_HED = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]],
                        np.float32)
RGB_FROM_HED /= np.linalg.norm(RGB_FROM_HED, axis=1, keepdims=True)
HED_FROM_RGB = np.linalg.inv(RGB_FROM_HED)
LUMINANCE = np.array([0.299, 0.587, 0.114], np.float32)


def density_normalised(crop: np.ndarray, reference: float) -> np.ndarray:
    factor = reference / max(cell_density(crop), 0.05)
    return aug.stain_density(crop, float(np.clip(factor, 0.25, 4.0)))


def gray(image: np.ndarray) -> np.ndarray:
    g = np.clip(image.astype(np.float32) @ LUMINANCE + 0.5, 0, 255).astype(np.uint8)
    return np.repeat(g[..., None], 3, -1)


def jpeg(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, "JPEG", quality=int(rng.integers(20, 91)))
    return np.asarray(Image.open(buf).convert("RGB"))


def hed_jitter(image: np.ndarray, rng: np.random.Generator, scale: float = 0.6,
               shift: float = 0.05) -> np.ndarray:
    od = -np.log((image.astype(np.float32) + 1.0) / 256.0)
    conc = od @ HED_FROM_RGB
    conc = conc * np.exp(rng.uniform(-scale, scale, 3)).astype(np.float32) \
        + rng.uniform(-shift, shift, 3).astype(np.float32)
    return aug.with_surround_of(image, 256.0 * np.exp(-np.maximum(conc @ RGB_FROM_HED, 0)) - 1.0)


def install(levers: set[str], density_ref: float) -> None:
    """Wrap ``crossval.crops_of`` (every crop) and ``crossval.augment`` (training views)."""
    crops_of, augment = crossval.crops_of, crossval.augment

    def lever_crops(df):
        crops = crops_of(df)
        if "densnorm" in levers:
            crops = np.stack([density_normalised(c, density_ref) for c in crops])
        if "gray" in levers:
            crops = np.stack([gray(c) for c in crops])
        return crops

    def lever_augment(image, rng, settings=aug.AugmentSettings()):
        out = augment(image, rng, settings)
        if "jpeg" in levers and rng.random() < 0.5:
            out = jpeg(out, rng)
        if "noise" in levers and rng.random() < 0.5:
            noisy = out + rng.normal(0, rng.uniform(1, 6), out.shape)
            out = np.clip(noisy, 0, 255).astype(np.uint8)
        if "hed" in levers:
            out = hed_jitter(out, rng)
        if "randgray" in levers and rng.random() < 0.5:
            out = gray(out)
        return out

    crossval.crops_of, crossval.augment = lever_crops, lever_augment


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1].startswith("-"):
        raise SystemExit(__doc__)
    levers = set(sys.argv[1].split(","))
    unknown = levers - set(LEVERS)
    if unknown:
        raise SystemExit(f"unknown lever(s) {', '.join(sorted(unknown))}; choose from "
                         f"{', '.join(LEVERS)}")
    rest = sys.argv[2:]
    density_ref = 0.8
    if "--density-ref" in rest:
        i = rest.index("--density-ref")
        density_ref = float(rest[i + 1])
        del rest[i:i + 2]
    install(levers, density_ref)
    print(f"levers: {', '.join(sorted(levers))}" + (f" (density reference {density_ref})"
                                                     if "densnorm" in levers else ""))
    sys.argv = [str(REPO / "benchmarks" / "crosslab.py"), *rest]
    runpy.run_path(sys.argv[0], run_name="__main__")


if __name__ == "__main__":
    main()
