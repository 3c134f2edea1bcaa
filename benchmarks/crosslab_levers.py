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
* ``align``: beside every plain training, a second one on the same features, seeds and
  rows, with every lab's frozen-layer outputs mapped channel by channel to the mean and
  spread that the training images' outputs have (each lab's own mean and spread measured on
  all of its unaugmented crops, labels unused): unsupervised alignment of a new lab's
  features, as a scoring job could measure it on a lab's unlabelled images. Printed as the
  variant ``[aligned]`` under each plain line of parts 1 and 2, so the pair shares one
  frozen pass.

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
import torch
from PIL import Image

from wbc_spark import augment as aug
from wbc_spark.evaluation import crossval
from wbc_spark.align import LabAlignment, Moments

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from crosslab import cell_density  # noqa: E402

LEVERS = ("align", "densnorm", "gray", "jpeg", "lowpass", "noise")


def density_normalised(crop: np.ndarray, reference: float) -> np.ndarray:
    factor = reference / max(cell_density(crop), 0.05)
    return aug.stain_density(crop, float(np.clip(factor, 0.25, 4.0)))


def low_passed(crop: np.ndarray) -> np.ndarray:
    return aug.resample(crop, 0.5, down=Image.BOX)


def jpeg(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, "JPEG", quality=int(rng.integers(20, 91)))
    return np.asarray(Image.open(buf).convert("RGB"))


def lab_aligned(view_feats: torch.Tensor, eval_feats: dict, labels: np.ndarray,
                labs: np.ndarray, tr: np.ndarray, va: np.ndarray, te: np.ndarray):
    """``train_and_test``'s inputs restricted to rows ``tr``, ``va`` and ``te`` (renumbered in
    that order), with each lab's features mapped channel by channel
    (``wbc_spark.align``) to the moments of the training rows' unaugmented
    features. A lab's own moments come from all of its rows' unaugmented features."""
    rows = np.concatenate([tr, va, te])
    original = eval_feats["original"]
    labs = np.asarray(labs).astype(str)
    alignment = LabAlignment(
        Moments.of(original[tr]),
        {lab: Moments.of(original[np.flatnonzero(labs == lab)]) for lab in np.unique(labs[rows])})

    def mapped(feats: torch.Tensor, index: np.ndarray) -> torch.Tensor:  # (V x) N x C x H x W
        picked = feats.index_select(-4, torch.from_numpy(index))  # a copy
        return alignment.apply(picked, labs[index], inplace=True)

    n_tr, n_va = len(tr), len(va)
    return (mapped(view_feats, tr), {k: mapped(v, rows) for k, v in eval_feats.items()},
            labels[rows], labs[rows], np.arange(n_tr), n_tr + np.arange(n_va),
            n_tr + n_va + np.arange(len(te)))


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
        return out

    def aligned_train_and_test(model, view_feats, eval_feats, labels, tr, va, te, recipe,
                               num_classes, run=0, labs=None, inspect=None):
        if labs is None:
            raise ValueError("align needs the lab of every image")
        probs, result, maps = train_and_test(model, view_feats, eval_feats, labels, tr, va,
                                             te, recipe, num_classes, run=run, labs=labs,
                                             inspect=inspect)
        v, e, y, lab, tr2, va2, te2 = lab_aligned(view_feats, eval_feats, labels,
                                                  np.asarray(labs), tr, va, te)
        aligned, _, _ = train_and_test(model, v, e, y, tr2, va2, te2, recipe, num_classes,
                                       run=run, labs=lab)
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
