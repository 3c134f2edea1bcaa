"""Cross-validation of the training recipe in one process (for ``benchmarks/accuracy.py``).

It runs the same recipe as the distributed job (``wbc_spark.train``: the same augmentation,
frozen-layer caching, ``fit``, temperature scaling) without Spark: the frozen layers never
change, so every image view passes through them once and all folds and seeds reuse the cache.
Model selection and calibration use only an inner validation split of the training folds.
"""

from __future__ import annotations

import io
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pyarrow.dataset as pads
import torch
from PIL import Image

from wbc_spark import metrics, preprocessing
from wbc_spark.align import LAB_SAMPLE, LabAlignment, Moments
from wbc_spark.augment import AugmentSettings, augment, stain_shift
from wbc_spark.evaluation.activation_maps import area_on_cell, crop_mask, mass_on_cell
from wbc_spark.explain import class_activation_maps
from wbc_spark.preprocessing import Preprocessing
from wbc_spark.splits import train_val_test
from wbc_spark.train import (HeadOnly, Recipe, feature_batches, fit, fit_temperature,
                             frozen_features, head_logits, predict_probs)
from wbc_spark.transforms import locate_cell

log = logging.getLogger(__name__)


def benchmark_process(threads: int) -> None:
    """Set up a benchmark's process: timed INFO logs without each epoch's, ``threads`` torch
    threads."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    for noisy in ("wbc_spark.train", "wbc_spark.model.transfer"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    torch.set_num_threads(threads)


def load_dataset(path: str, classes: list[str], wanted: Preprocessing | None = None
                 ) -> pd.DataFrame:
    """The labelled rows of an ingested dataset (read with pyarrow, sorted by image_id);
    with ``wanted``, refuse a dataset whose crops were made another way
    (``wbc_spark.preprocessing.check``)."""
    data = pads.dataset(path, format="parquet", partitioning="hive")
    columns = ["image_id", "path", "source", "label", "group", "sha256", "crop", "crop_size",
               "context", "stain", "framing", "cell_found",
               "image", "mask", "crop_box", "width", "height", "ingested_at"]
    df = data.to_table(columns=[c for c in columns if c in data.schema.names]).to_pandas()
    # A dataset made before a column was stored reads it as nulls, as Spark does (the
    # contract check then refuses it).
    for column in set(columns) - set(df.columns):
        df[column] = None
    # As wbc_spark.ingest.read_dataset: each path's latest ingest supersedes earlier ones.
    df = df.sort_values("ingested_at").drop_duplicates("path", keep="last")
    df = df[df.label.isin(classes)].sort_values("image_id").reset_index(drop=True)
    if wanted is not None:
        made = preprocessing.of_dataset(
            df[["crop_size", "context", "stain", "framing"]].itertuples(index=False), path)
        preprocessing.check(made, wanted, path, "ingest again into a new data.dataset")
    return df


def outside_frame(df: pd.DataFrame) -> pd.DataFrame:
    """Per class: the share of crops whose box reaches outside the image (filled by
    reflection in ``crop_box``) and the mean share of the crop's side that lies outside."""
    box = np.stack(df.crop_box.to_numpy())
    left, top, side = box[:, 0], box[:, 1], box[:, 2]
    w, h = df.width.to_numpy(), df.height.to_numpy()
    beyond = np.maximum.reduce([-left, -top, left + side - w, top + side - h, 0 * side])
    frame = pd.DataFrame({"label": df.label.to_numpy(), "outside": beyond > 0,
                          "share": beyond / side})
    return frame.groupby("label").agg(images=("outside", "size"), outside=("outside", "mean"),
                                      mean_share=("share", "mean"))


def crops_of(df: pd.DataFrame) -> np.ndarray:
    size = int(df.crop_size.iloc[0])
    return np.stack([np.frombuffer(b, np.uint8).reshape(size, size, 3) for b in df.crop])


# Shifts standing in for other labs: the whole field rescaled (another magnification), the
# stain's colour shifted (another staining protocol or camera), or the field cut so the cell
# touches its edge (common in any smear). With data.framing=reflect the crop then reaches
# outside the frame and is reflected there (in KRD-WBC mostly the basophils' crops did, so this
# shows whether the model learnt the reflected border as a basophil cue); with fit the crop is
# moved inside the cut frame and the cell sits off its centre.
SHIFTS = {
    "rescale_0.75": {"scale": 0.75},
    "rescale_1.33": {"scale": 1.33},
    "stain_shift": {"hue": 0.05, "saturation": 0.7, "brightness": 1.08, "contrast": 0.9},
    "cell_at_edge": {"edge": 1 / 3},
    # The control for cell_at_edge: the field cut as closely, but just outside the crop, so
    # the crop's box stays inside the field; what it costs is the smaller field (stain
    # measure, locator).
    "field_cut": {"edge": 0.55},
}


def cut_at_cell(image: Image.Image, side: int, reach: float, *, context: float,
                stain: str = "none") -> Image.Image:
    """The field cut ``reach`` crop sides from the located cell's centre on one side (0 right,
    1 top, 2 left, 3 bottom); with the default context of 1.5 a reach of 1/3 puts the frame's
    edge where the cell ends, and the crop's box then reaches a sixth of its side outside the
    frame (reflected there with data.framing=reflect, moved inside with fit)."""
    box, _, _ = locate_cell(image, context=context, stain=stain)
    if not box.found:
        return image
    w, h = image.size
    cx, cy = box.left + box.side / 2, box.top + box.side / 2
    d = reach * box.side
    left, top, right, bottom = [(0, 0, min(w, cx + d), h), (0, max(0, cy - d), w, h),
                                (max(0, cx - d), 0, w, h), (0, 0, w, min(h, cy + d))][side]
    return image.crop(tuple(int(round(v)) for v in (left, top, right, bottom)))


def shifted_crops(df: pd.DataFrame, shift: dict, pre: Preprocessing) -> np.ndarray:
    """Apply a shift to each original image, then locate and crop as the scoring job does."""
    out = []
    for i, data in enumerate(df.image):
        img = Image.open(io.BytesIO(data)).convert("RGB")
        if "edge" in shift:
            img = cut_at_cell(img, i % 4, shift["edge"], context=pre.context, stain=pre.stain)
        elif "scale" in shift:
            w, h = img.size
            img = img.resize((round(w * shift["scale"]), round(h * shift["scale"])),
                             Image.BILINEAR)
        else:
            img = Image.fromarray(stain_shift(np.asarray(img), shift["hue"], shift["saturation"],
                                              shift["brightness"], shift["contrast"]))
        out.append(pre.crop_image(img)[0])
    return np.stack(out)


def features_of(model, images: np.ndarray, precision: str = "fp32", batch: int = 50
                ) -> torch.Tensor:
    feats, _ = frozen_features(model, ((torch.from_numpy(images[i:i + batch]),
                                        torch.zeros(len(images[i:i + batch])))
                                       for i in range(0, len(images), batch)), precision)
    return feats


def augmented_view_features(model, crops: np.ndarray, views: int, seed: int,
                            settings: AugmentSettings = AugmentSettings(),
                            precision: str = "fp32") -> torch.Tensor:
    """(views, N, ...) frozen features of random training views of every crop."""
    out = []
    for v in range(views):
        rng = np.random.default_rng([seed, v])
        out.append(features_of(model, np.stack([augment(c, rng, settings) for c in crops]),
                               precision))
        log.info("cached augmented view %d/%d", v + 1, views)
    return torch.stack(out)


@dataclass
class FoldResult:
    seed: int
    fold: int
    test_index: np.ndarray
    probs: dict  # variant name -> (n_test, classes) calibrated probabilities
    best_epoch: int
    temperature: float
    seconds: float
    n_train: int
    maps: np.ndarray  # class activation maps of the test images (see wbc_spark.explain)


def run_fold(model, view_feats: torch.Tensor, eval_feats: dict, labels: np.ndarray,
             meta: pd.DataFrame, recipe: Recipe, *, folds: int, fold: int,
             val_fraction: float, num_classes: int) -> FoldResult:
    """Train on one outer fold's training part (inner validation for selection), test on it.
    ``meta``'s ``source`` column, where it has one, gives each image's lab (for
    ``sampling=lab_class`` and the lab-stratified split)."""
    start = time.perf_counter()
    roles = train_val_test(meta, folds=folds, test_fold=fold, val_fraction=val_fraction,
                           seed=recipe.seed)
    tr, va, te = (np.flatnonzero(roles == r) for r in ("train", "val", "test"))
    labs = meta["source"].to_numpy() if "source" in meta else None
    probs, result, maps = train_and_test(model, view_feats, eval_feats, labels, tr, va, te,
                                         recipe, num_classes, run=fold, labs=labs)
    return FoldResult(recipe.seed, fold, te, probs, result.best_epoch, result.temperature,
                      time.perf_counter() - start, len(tr), maps)


def lab_sample(rows: np.ndarray, keys: np.ndarray, per_lab: int = LAB_SAMPLE) -> np.ndarray:
    """Up to ``per_lab`` of ``rows`` with distinct ``keys`` (the SHA-256), smallest key first:
    the images a lab's moments are measured on (a duplicate counts once)."""
    _, first = np.unique(keys[rows], return_index=True)  # sorted by key
    return rows[first[:per_lab]]


def lab_alignment(original: torch.Tensor, labs: np.ndarray, keys: np.ndarray,
                  tr: np.ndarray, te: np.ndarray, per_lab: int = LAB_SAMPLE) -> LabAlignment:
    """The alignment the jobs use with ``train.align`` (``wbc_spark.align``), on cached
    unaugmented outputs ``original``: each training lab's moments from up to ``per_lab`` of
    its rows in ``tr`` (the training job's ``LabSampler``), the reference their sum; a lab of
    ``te`` that is not in training gets its moments from up to ``per_lab`` of its rows in
    ``te``, as the scoring job's lab profile does (distinct images, smallest ``keys``, the
    SHA-256, first)."""
    labs, keys = np.asarray(labs).astype(str), np.asarray(keys).astype(str)

    def moments(index: np.ndarray, lab: str) -> Moments:
        mine = lab_sample(index[labs[index] == lab], keys, per_lab)
        return Moments.of(original[torch.from_numpy(mine)])

    alignment = LabAlignment.of_labs({lab: moments(tr, lab) for lab in np.unique(labs[tr])})
    for lab in np.unique(labs[te]):
        alignment.labs.setdefault(lab, moments(te, lab))
    return alignment


def train_and_test(model, view_feats: torch.Tensor, eval_feats: dict, labels: np.ndarray,
                   tr: np.ndarray, va: np.ndarray, te: np.ndarray, recipe: Recipe,
                   num_classes: int, run: int = 0, labs: np.ndarray | None = None,
                   inspect: Callable | None = None, align: bool = False,
                   keys: np.ndarray | None = None) -> tuple[dict, object, np.ndarray]:
    """Train from the pretrained weights on rows ``tr`` (all their cached views), choose the
    epoch and temperature on ``va``, and return the calibrated probabilities of ``te`` for
    every evaluation variant, the fit result and the test images' activation maps. The model
    is reset to the pretrained weights afterwards; ``inspect(model, result, train_feats,
    train_labels)`` is called on the trained model before that. ``align``: every row's
    outputs mapped by its lab's moments (``lab_alignment``; needs ``labs`` and ``keys``, the
    images' SHA-256), as a model trained with ``train.align``. The same (recipe, run) on
    the same features gives the same model in any process on the same CPU (the head is
    drawn from the seed)."""
    torch.manual_seed(recipe.seed * 100 + run)
    fresh = {k: v.clone() for k, v in model.state_dict().items()}
    # The head's starting weights come from this seed too, not from whatever state the
    # global generator had when the model was built: otherwise two processes running the
    # same (seed, run) start from different heads and end at different models.
    model.init_head()
    alignment = None
    if align:
        if labs is None or keys is None:
            raise ValueError("align needs the lab and the SHA-256 of every image")
        alignment = lab_alignment(eval_feats["original"], labs, keys, tr, te)

    def rows(feats: torch.Tensor, index: np.ndarray) -> torch.Tensor:
        """``feats``' images ``index`` (a copy; N x ... or views x N x ...), aligned."""
        picked = feats[:, index] if feats.dim() == 5 else feats[index]
        if alignment is None:
            return picked
        return alignment.apply(picked, np.asarray(labs)[index], inplace=True)

    train_feats = rows(view_feats, tr).reshape(-1, *view_feats.shape[2:])
    train_labels = np.tile(labels[tr], view_feats.shape[0])
    train_labs = None if labs is None else np.tile(np.asarray(labs)[tr], view_feats.shape[0])
    rng = np.random.default_rng([recipe.seed, run])
    steps = max(1, len(tr) // recipe.batch_size)
    counts = [int((labels[tr] == c).sum()) for c in range(num_classes)]
    result = fit(model, HeadOnly(model),
                 lambda e: feature_batches(train_feats, train_labels, recipe.batch_size, steps,
                                           rng, recipe.sampling, train_labs),
                 steps, (rows(eval_feats["original"], va), labels[va]), recipe, num_classes,
                 counts, val_labs=None if labs is None else np.asarray(labs)[va])
    probs = {}
    for name, f in eval_feats.items():
        test = rows(f, te)
        if name == "original":
            original_test = test  # kept for the activation maps
        if f.dim() == 5:  # views x images x ...: average the views' calibrated probabilities,
            # at a temperature fitted on the validation images' views: their mean is softer
            # than any one view, so one view's temperature would leave it underconfident
            t = fit_temperature(np.stack([head_logits(model, v) for v in rows(f, va)]),
                                labels[va])
            probs[name] = metrics.mean_probs(np.stack([head_logits(model, v) for v in test]), t)
        else:
            probs[name] = predict_probs(model, test, result.temperature)
    maps, _ = class_activation_maps(model, original_test)
    if inspect is not None:
        inspect(model, result, train_feats, train_labels)
    model.load_state_dict(fresh)  # the next run starts from the pretrained weights again
    return probs, result, maps


def mean_interval(values: list[float]) -> tuple[float, float, float]:
    """Mean and 95% t-interval over runs."""
    v = np.asarray(values, dtype=float)
    v = v[~np.isnan(v)]
    if len(v) < 2:
        return (float(v.mean()) if len(v) else math.nan, math.nan, math.nan)
    from scipy import stats

    half = stats.t.ppf(0.975, len(v) - 1) * v.std(ddof=1) / math.sqrt(len(v))
    return float(v.mean()), float(v.mean() - half), float(v.mean() + half)


def summarise(results: list[FoldResult], labels: np.ndarray, classes: list[str]) -> dict:
    """Per-run means with intervals and pooled out-of-fold reports, for every variant."""
    out = {}
    for variant in results[0].probs:
        runs = {"accuracy": [], "balanced_accuracy": [], "macro_f1": [], "ece": []}
        per_class_recall = {c: [] for c in classes}
        pooled = {}  # seed -> full out-of-fold probabilities
        for r in results:
            p = r.probs[variant]
            y = labels[r.test_index]
            rep = metrics.classification_report(y, p.argmax(1), classes, p)
            for k in runs:
                runs[k].append(rep[k])
            for c in classes:
                per_class_recall[c].append(rep["per_class"][c]["recall"])
            pooled.setdefault(r.seed, np.zeros((len(labels), len(classes))))[r.test_index] = p
        reports = [metrics.classification_report(labels, p.argmax(1), classes, p)
                   for p in pooled.values()]
        # How often images of the other classes are called this class: a shortcut (a border,
        # a zoom) that the shift adds or removes shows here first.
        called = {c: float(np.mean([(p.argmax(1)[labels != k] == k).mean()
                                    for p in pooled.values()]))
                  for k, c in enumerate(classes)}
        out[variant] = {
            "runs": {k: mean_interval(v) for k, v in runs.items()},
            "runs_recall": {c: mean_interval(v) for c, v in per_class_recall.items()},
            "pooled_by_seed": reports,
            "others_called": called,
        }
    return out


def format_summary(summary: dict, classes: list[str]) -> str:
    lines = []
    for variant, s in summary.items():
        lines.append(f"== {variant}")
        lines.append("  over runs (mean [95% CI]): " + "  ".join(
            f"{k} {m:.3f} [{lo:.3f}, {hi:.3f}]" for k, (m, lo, hi) in s["runs"].items()))
        lines.append("  recall per class over runs: " + "  ".join(
            f"{c} {m:.3f} [{lo:.3f}, {hi:.3f}]" for c, (m, lo, hi) in s["runs_recall"].items()))
        lines.append("  other classes' images called this class (pooled, mean of seeds): "
                     + "  ".join(f"{c} {v:.1%}" for c, v in s["others_called"].items()))
        for i, rep in enumerate(s["pooled_by_seed"]):
            lines.append(f"  pooled out-of-fold, seed {i}:")
            lines.extend("    " + ln for ln in metrics.format_report(rep).splitlines())
    return "\n".join(lines)


def where_it_looks(results: list[FoldResult], df: pd.DataFrame, classes: list[str],
                   labels: np.ndarray) -> dict | None:
    """Out-of-fold class activation maps of the first seed against the KRD-WBC masks."""
    if df["mask"].isna().any():
        return None
    seed = results[0].seed
    size = int(df.crop_size.iloc[0])
    index = np.concatenate([r.test_index for r in results if r.seed == seed])
    maps = np.concatenate([r.maps for r in results if r.seed == seed])
    masks = np.stack([crop_mask(df["mask"].iloc[i], list(df.crop_box.iloc[i]), size)
                      for i in index])
    frac, hit = mass_on_cell(maps, masks)
    area = area_on_cell(masks)
    per_class = {c: (float(np.nanmean(frac[labels[index] == k])),
                     float(area[labels[index] == k].mean()),
                     float(hit[labels[index] == k].mean()))
                 for k, c in enumerate(classes) if (labels[index] == k).any()}
    return {"mass_on_cell": float(np.nanmean(frac)), "area_on_cell": float(area.mean()),
            "peak_on_cell": float(hit.mean()), "per_class": per_class,
            "index": index, "maps": maps, "masks": masks, "mass": frac}


def format_where_it_looks(look: dict) -> str:
    lines = [f"class activation maps (predicted class, out of fold, first seed): "
             f"{look['mass_on_cell']:.1%} of the map's mass lies on the white cell, which "
             f"covers {look['area_on_cell']:.1%} of the crop; the map's peak is on the cell "
             f"in {look['peak_on_cell']:.1%} of images"]
    for c, (mass, area, peak) in look["per_class"].items():
        lines.append(f"  {c:<11} mass on cell {mass:.1%} (cell area {area:.1%}), "
                     f"peak on cell {peak:.1%}")
    return "\n".join(lines)
