"""Cross-lab levers that are not part of the recipe, measured with ``benchmarks/crosslab.py``.

    .venv/bin/python benchmarks/crosslab_levers.py LEVER[,LEVER...] [crosslab.py arguments]

Runs ``benchmarks/crosslab.py`` unchanged except for what the named levers do to the crops
the model is fed (training views and test crops alike) or to the training views only:

* ``densnorm``: every crop's stain depth brought to one value: its optical density scaled
  (``augment.stain_density``) so that the cell's density against its surroundings (90th
  percentile over the central disc, as ``crosslab.py`` measures it) becomes ``--density-ref``;
* ``gray``: every crop turned to luminance (three equal channels);
* ``lowpass``: every crop low-passed, down to half its side and back (box filter down,
  bilinear up), so that no lab's crops are crisper than another's;
* ``jpeg``: half of the training views re-encoded as JPEG at a random quality of 20-90;
* ``noise``: half of the training views with Gaussian noise (sigma 1-6 grey levels);
* ``randconv``: half of the training views passed through a random convolution (3 to 3
  channels, kernel side 1, 3, 5 or 7, Gaussian weights), each output channel brought to the
  view's own mean and spread, then mixed with the view at a random weight: colour and local
  texture scrambled, shapes kept (random-convolution augmentation for domain generalisation);
* ``randtexture``: the same with one random kernel for all three channels (side 3, 5 or 7),
  its sum kept positive, so local texture and sharpness are scrambled and the colours and
  the dark-on-light polarity kept;
* ``align``: beside every plain training (``train.align=false``), a second one on the same
  features, seeds and rows with the alignment of ``train.align`` (``crossval.lab_alignment``:
  each lab's frozen-layer outputs mapped channel by channel to the training labs' mean and
  spread, a test lab not in training by its own unlabelled images). Printed as the variant
  ``[aligned]`` under each plain line of parts 1 and 2, so the pair shares one frozen pass.
  Until session 27 the lever measured each lab's moments on all of its crops and took the
  training rows' moments as the reference (the figures of sessions 21 and 24).

(The per-stain jitter and grey training views, once levers here, are now the recipe's
``augment.hed`` and ``augment.grey``: ``benchmarks/crosslab.py augment.hed=0.6
augment.grey=0.5``.)

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

LEVERS = ("align", "densnorm", "gray", "jpeg", "lowpass", "noise", "randconv", "randtexture")


def density_normalised(crop: np.ndarray, reference: float) -> np.ndarray:
    factor = reference / max(cell_density(crop), 0.05)
    return aug.stain_density(crop, float(np.clip(factor, 0.25, 4.0)))


def low_passed(crop: np.ndarray) -> np.ndarray:
    return aug.resample(crop, 0.5, down=Image.BOX)


def jpeg(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, "JPEG", quality=int(rng.integers(20, 91)))
    return np.asarray(Image.open(buf).convert("RGB"))


def random_convolution(image: np.ndarray, rng: np.random.Generator,
                       shared: bool = False) -> np.ndarray:
    side = int(rng.choice([3, 5, 7] if shared else [1, 3, 5, 7]))
    if shared:
        kernel = rng.normal(0, 1 / side, (side, side))
        kernel *= np.sign(kernel.sum()) or 1.0  # dark stays dark: no negative image
        weights = np.eye(3)[:, :, None, None] * kernel
    else:
        weights = rng.normal(0, 1 / np.sqrt(3 * side * side), (3, 3, side, side))
    x = image.astype(np.float32)
    pad = side // 2
    padded = np.pad(x, ((pad, pad), (pad, pad), (0, 0)), mode="reflect")
    windows = np.lib.stride_tricks.sliding_window_view(padded, (side, side), axis=(0, 1))
    # windows: H x W x C_in x side x side; weights: C_out x C_in x side x side
    out = np.einsum("hwcij,ocij->hwo", windows, weights.astype(np.float32), optimize=True)
    mean, std = x.mean(axis=(0, 1)), x.std(axis=(0, 1))
    out = (out - out.mean(axis=(0, 1))) / (out.std(axis=(0, 1)) + 1e-6) * std + mean
    alpha = float(rng.uniform(0, 1))
    return np.clip(alpha * x + (1 - alpha) * out, 0, 255).astype(np.uint8)


def install(levers: set[str], density_ref: float) -> None:
    """Wrap ``crossval.crops_of`` (every crop), ``crossval.augment`` (training views) and,
    for ``align``, ``crossval.train_and_test``."""
    crops_of, augment = crossval.crops_of, crossval.augment
    train_and_test = crossval.train_and_test

    def lever_crops(df):
        crops = crops_of(df)
        if "densnorm" in levers:
            crops = np.stack([density_normalised(c, density_ref) for c in crops])
        if "gray" in levers:
            crops = np.stack([aug.grey(c) for c in crops])
        if "lowpass" in levers:
            crops = np.stack([low_passed(c) for c in crops])
        return crops

    def lever_augment(image, rng, settings=aug.AugmentSettings()):
        out = augment(image, rng, settings)
        if "jpeg" in levers and rng.random() < 0.5:
            out = jpeg(out, rng)
        if "noise" in levers and rng.random() < 0.5:
            noisy = out + rng.normal(0, rng.uniform(1, 6), out.shape)
            out = np.clip(noisy, 0, 255).astype(np.uint8)
        if "randconv" in levers and rng.random() < 0.5:
            out = random_convolution(out, rng)
        if "randtexture" in levers and rng.random() < 0.5:
            out = random_convolution(out, rng, shared=True)
        return out

    def aligned_train_and_test(model, view_feats, eval_feats, labels, tr, va, te, recipe,
                               num_classes, run=0, labs=None, inspect=None, align=False,
                               keys=None):
        probs, result, maps = train_and_test(model, view_feats, eval_feats, labels, tr, va,
                                             te, recipe, num_classes, run=run, labs=labs,
                                             inspect=inspect, align=False, keys=keys)
        aligned, _, _ = train_and_test(model, view_feats, eval_feats, labels, tr, va, te,
                                       recipe, num_classes, run=run, labs=labs, align=True,
                                       keys=keys)
        probs.update({"aligned" if k == "original" else f"aligned+{k}": p
                      for k, p in aligned.items()})
        return probs, result, maps

    crossval.crops_of, crossval.augment = lever_crops, lever_augment
    if "align" in levers:
        crossval.train_and_test = aligned_train_and_test


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
