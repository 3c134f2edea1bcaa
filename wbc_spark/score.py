"""Batch scoring: a pandas UDF (iterator form) classifies images; results go to two tables.

Per-image table (``<score.results>``), one row per file and model:

=================  =========  ==========================================================
column             type       meaning
=================  =========  ==========================================================
path               string     the file (``file:/...``)
image_id           string     from the dataset, or the file name for a raw lake
slide              string     slide (folder relative to the lake, or from the dataset)
sha256             string     of the file's bytes: the image's identity (see ``latest``)
file_length        long       as listed
file_mtime         timestamp
predicted_class    string     null when ``error`` is set
confidence         double     calibrated probability of ``predicted_class``
p_<Class>          double     calibrated probability of each class
cell_found         boolean    whether the stain locator found a cell
nearest_lab        string     the training lab whose cells this one lies nearest to
model_id           string     the artifact's ID (digest of its weights)
scored_at          timestamp
error              string     why the file could not be classified, else null
run                string     partition: the scoring run that wrote the row
=================  =========  ==========================================================

Per-class table (``<score.results>_per_class``), one row per model, scope and class, rebuilt
for the run's model from the latest result of each image (``latest``); rows of other models
are kept as their own runs wrote them. ``slide`` is the scope (null: every image that model
scored).

=====================  ======  ============================================================
column                 type    meaning
=====================  ======  ============================================================
model_id, slide,       string
class
corrected_fraction     double  **the share to read**: estimated share of the class among the
                               scope's white cells, corrected for the model's held-out
                               confusion (``wbc_spark.differential``)
corrected_low/_high    double  its 95% interval (sampling of cells and uncertainty of the
                               correction)
counted                long    cells counted in the differential and predicted as the class
counted_total          long    cells counted in the scope (classified, a cell found)
excluded               long    classified cells left out of the differential
                               (no_cell_found: the locator found no cell in the image)
confusion_lab          string  the training lab whose held-out confusion corrected the
                               scope (most of its cells lie nearest to it), or "pooled"
count                  long    top predictions of the class, flagged cells included
classified             long    cells with a prediction in the scope
fraction, ci_low,      double  raw share of top predictions (count / classified), 95% Wilson
ci_high                        interval on the sampling of cells only
errors                 long    files that could not be classified
flagged                long    cells predicted as the class that need review (any reason)
shift_cells,           long,   cells with a lab distance; share beyond the training labs'
shift_score,           double, range; whether the shift alarm fires
shift_alarm            bool
updated_at             time
=====================  ======  ============================================================
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
from collections.abc import Iterator
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from pyspark.sql import DataFrame, SparkSession, Window
from pyspark.sql import functions as F
from pyspark.sql import types as T

from wbc_spark import artifact, differential, images, preprocessing, review, tables
from wbc_spark.align import ChannelMap, LabAlignment, Moments
from wbc_spark.config import LAB_PROFILE_MIN, Config, ConfigError
from wbc_spark.ingest import path_columns, read_dataset, withhold_outside
from wbc_spark.metrics import mean_probs, wilson
from wbc_spark.model.inference import frozen_pass, require_int8
from wbc_spark.model.transfer import resolve_device, resolve_precision
from wbc_spark.preprocessing import Preprocessing
from wbc_spark.sources import folder
from wbc_spark.transforms import dihedral

log = logging.getLogger(__name__)

KEY = ["path", "file_length", "file_mtime"]
# An image is its bytes: one result per (model, sha256). A file touched, copied or moved is
# not scored again; a changed file is a new image whose result supersedes its path's old one.


def prediction_schema(classes: list[str]) -> T.StructType:
    """What the UDF returns for each image."""
    return T.StructType([
        T.StructField("sha256", T.StringType()),
        T.StructField("predicted_class", T.StringType()),
        T.StructField("confidence", T.DoubleType()),
        *[T.StructField(f"p_{c}", T.DoubleType()) for c in classes],
        T.StructField("cell_found", T.BooleanType()),
        T.StructField("cell_distance", T.DoubleType()),
        T.StructField("lab_distance", T.DoubleType()),
        T.StructField("beyond_lab_range", T.BooleanType()),
        T.StructField("nearest_lab", T.StringType()),
        T.StructField("needs_review", T.BooleanType()),
        T.StructField("review_reason", T.StringType()),
        T.StructField("error", T.StringType()),
        # What the frozen layers ran in for this image (fp32, bf16 or int8; "auto" resolved
        # by the worker's own CPU); null where the network did not run.
        T.StructField("precision", T.StringType()),
    ])


def results_schema(classes: list[str]) -> T.StructType:
    pred = prediction_schema(classes)
    return T.StructType([
        T.StructField("path", T.StringType()),
        T.StructField("image_id", T.StringType()),
        T.StructField("slide", T.StringType()),
        pred["sha256"],
        T.StructField("file_length", T.LongType()),
        T.StructField("file_mtime", T.TimestampType()),
        *[f for f in pred.fields if f.name != "sha256"],
        T.StructField("model_id", T.StringType()),
        T.StructField("scored_at", T.TimestampType()),
    ])


PER_CLASS_SCHEMA = T.StructType([
    T.StructField("model_id", T.StringType()),
    T.StructField("slide", T.StringType()),
    T.StructField("class", T.StringType()),
    T.StructField("confusion_lab", T.StringType()),
    T.StructField("corrected_fraction", T.DoubleType()),
    T.StructField("corrected_low", T.DoubleType()),
    T.StructField("corrected_high", T.DoubleType()),
    T.StructField("counted", T.LongType()),
    T.StructField("counted_total", T.LongType()),
    T.StructField("excluded", T.LongType()),
    T.StructField("count", T.LongType()),
    T.StructField("classified", T.LongType()),
    T.StructField("fraction", T.DoubleType()),
    T.StructField("ci_low", T.DoubleType()),
    T.StructField("ci_high", T.DoubleType()),
    T.StructField("errors", T.LongType()),
    T.StructField("flagged", T.LongType()),
    T.StructField("shift_cells", T.LongType()),
    T.StructField("shift_score", T.DoubleType()),
    T.StructField("shift_alarm", T.BooleanType()),
    T.StructField("updated_at", T.TimestampType()),
])


@functools.lru_cache(maxsize=2)
def _cached_model(path: str, mtime: float, threads: int, device: str):
    """One model per Python worker process (keyed by file and time, so a new model reloads),
    on ``device``."""
    torch.set_num_threads(threads)
    model, meta = artifact.load(path)
    return model.to(device), meta


def load_model_once(path: str, threads: int = 1, device: str = "cpu"):
    return _cached_model(path, os.path.getmtime(path), threads, device)


def task_gpu() -> str | None:
    """The address of the GPU Spark assigned the running task (a cluster started with
    ``spark.task.resource.gpu.amount``), or None: outside a task, or no GPU assigned."""
    from pyspark import TaskContext

    context = TaskContext.get()
    gpus = context.resources().get("gpu") if context is not None else None
    return gpus.addresses[0] if gpus is not None and gpus.addresses else None


def worker_device(device: str) -> str:
    """This Python worker's torch device for ``score.device`` (``resolve_device``, with the
    GPU Spark assigned the task)."""
    return resolve_device(device, task_gpu() if device != "cpu" else None)


def _prepare(data: bytes | None, kind: str, meta: dict) -> tuple[np.ndarray, bool]:
    pre = Preprocessing.from_artifact(meta)
    size = pre.crop_size
    if kind == "crop":
        if data is None or len(data) != size * size * 3:
            raise images.BadImage(f"stored crop is not {size}x{size}x3")
        return np.frombuffer(data, dtype=np.uint8).reshape(size, size, 3), True
    crop, box, _ = pre.crop(data)
    return crop, box.found


def review_model(meta: dict, thresholds: dict | None = None) -> review.ReviewModel:
    """The artifact's review detectors, with ``thresholds`` (from ``thresholds_of``) applied."""
    detectors = review.ReviewModel.from_state(meta["review"])
    if thresholds:
        detectors.confidence_threshold = thresholds["confidence_threshold"]
        detectors.cell_threshold = thresholds["cell_threshold"]
        detectors.lab_threshold = thresholds["lab_threshold"]
    return detectors


def thresholds_of(meta: dict, settings) -> dict:
    """The thresholds scoring uses: the model's, each replaced where ``review.*`` sets it."""
    d = review.ReviewModel.from_state(meta["review"]).with_overrides(settings)
    return {"confidence_threshold": d.confidence_threshold, "cell_threshold": d.cell_threshold,
            "lab_threshold": d.lab_threshold}


def view_logits(model, meta: dict, crops: np.ndarray, precision: str, device: str,
                channel_map: ChannelMap | None, trained_precision: str = "fp32") -> np.ndarray:
    """The head's logits of uint8 ``crops`` (one flip or rotation of a batch)."""
    with torch.inference_mode():
        frozen = frozen_pass(model, meta, torch.from_numpy(crops), precision, device)
    if channel_map is not None:
        frozen = channel_map(frozen)
    return review.head(model, frozen, precision=trained_precision)[0]


def classify_frame(data: pd.Series, model, meta: dict, kind: str, precision: str = "fp32",
                   thresholds: dict | None = None, channel_map: ChannelMap | None = None,
                   device: str = "cpu", trained_precision: str = "fp32") -> pd.DataFrame:
    """Classify one batch of encoded images (``kind="image"``) or stored crops (``"crop"``),
    the frozen layers in ``precision`` (see ``inference_precision``), the trained layers in
    ``trained_precision`` (``score.trained_precision``) and the network on ``device`` (the
    model's; images are decoded and cropped on the CPU), and flag the cells that need review
    (``wbc_spark.review``; ``thresholds`` replace the model's). ``channel_map``: the lab's
    alignment of the frozen outputs (a model trained with ``train.align``); the lab detector
    still compares the unaligned outputs.

    A file that cannot be read gets an ``error``, no prediction and the review reason
    ``unreadable``; the batch goes on.
    """
    classes = list(meta["classes"])
    detectors = review_model(meta, thresholds)
    n = len(data)
    out = pd.DataFrame({"sha256": [None] * n, "predicted_class": [None] * n,
                        "confidence": np.full(n, np.nan),
                        **{f"p_{c}": np.full(n, np.nan) for c in classes},
                        "cell_found": [None] * n, "cell_distance": np.full(n, np.nan),
                        "lab_distance": np.full(n, np.nan), "beyond_lab_range": [None] * n,
                        "nearest_lab": [None] * n,
                        "needs_review": [True] * n,
                        "review_reason": ["unreadable"] * n, "error": [None] * n,
                        "precision": [None] * n})
    crops, ok = [], []
    for i, blob in enumerate(data):
        if blob is not None and kind == "image":
            out.at[i, "sha256"] = images.sha256(blob)
        try:
            crop, found = _prepare(blob, kind, meta)
        except images.BadImage as exc:
            out.at[i, "error"] = str(exc)
            continue
        except Exception as exc:  # one bad file never stops the batch
            out.at[i, "error"] = f"unexpected {type(exc).__name__}: {exc}"
            continue
        crops.append(crop)
        ok.append(i)
        out.at[i, "cell_found"] = found
    if crops:
        # "auto" as this worker's CPU (or GPU) decides
        precision = resolve_precision(precision, device=device)
        trained_precision = resolve_precision(trained_precision, device=device)
        stack = np.stack(crops)
        with torch.inference_mode():
            # The frozen layers in ``precision``, the trained layers in ``trained_precision``
            # (fp32: the arithmetic the temperature and thresholds were fitted with; the job's
            # "auto" runs them in bf16 where the CPU has it, which changed no held-out call).
            frozen = frozen_pass(model, meta, torch.from_numpy(stack), precision, device)
        lab_features = None
        if channel_map is not None:
            lab_features = review.pooled(frozen)  # the lab detector's: unaligned
            frozen = channel_map(frozen)
        logits, cell_features, lab_features = review.embed(model, frozen,
                                                           lab_features=lab_features,
                                                           precision=trained_precision)
        # A model with test_views > 1 averages its views' probabilities (temperature fitted
        # on that mean); the detectors compare the image itself.
        views = [logits] + [view_logits(model, meta, dihedral(stack, k), precision, device,
                                        channel_map, trained_precision)
                            for k in range(1, int(meta.get("test_views", 1)))]
        probs = mean_probs(np.stack(views), float(meta["temperature"]))
        cell_d, lab_d, beyond, nearest = detectors.distances(cell_features, lab_features)
        idx = np.asarray(ok)
        for j, c in enumerate(classes):
            out.loc[idx, f"p_{c}"] = probs[:, j]
        out.loc[idx, "confidence"] = probs.max(1)
        out.loc[idx, "predicted_class"] = [classes[k] for k in probs.argmax(1)]
        out.loc[idx, "cell_distance"] = cell_d
        out.loc[idx, "lab_distance"] = lab_d
        out.loc[idx, "beyond_lab_range"] = pd.Series(beyond, index=idx, dtype=object)
        out.loc[idx, "nearest_lab"] = pd.Series(nearest, index=idx, dtype=object)
        reasons = review.flags(probs.max(1), cell_d,
                               out.loc[idx, "cell_found"].to_numpy(bool), detectors)
        out.loc[idx, "review_reason"] = pd.Series(reasons, index=idx, dtype=object)
        out.loc[idx, "needs_review"] = [r is not None for r in reasons]
        out.loc[idx, "precision"] = (precision if trained_precision == "fp32"
                                     else f"{precision}/{trained_precision}")
    return out


def classify_batches(batches: Iterator[pd.Series], model_path: str, kind: str,
                     threads: int = 1, precision: str = "fp32",
                     thresholds: dict | None = None, channel_map: ChannelMap | None = None,
                     device: str = "cpu", trained_precision: str = "fp32"
                     ) -> Iterator[pd.DataFrame]:
    """Body of the iterator pandas UDF: the model is loaded once (on ``device``, as
    ``resolve_device`` takes ``score.device``), then each batch scored."""
    device = worker_device(device)
    model, meta = load_model_once(model_path, threads, device)
    for data in batches:
        yield classify_frame(data.reset_index(drop=True), model, meta, kind, precision,
                             thresholds, channel_map, device, trained_precision)


def make_udf(model_file: str, kind: str, classes: list[str], threads: int,
             precision: str = "fp32", thresholds: dict | None = None,
             channel_map: ChannelMap | None = None, device: str = "cpu",
             trained_precision: str = "fp32"):
    """The Spark pandas UDF; ``model_file`` is the name given to ``SparkContext.addFile``."""
    from pyspark import SparkFiles
    from pyspark.sql.functions import pandas_udf

    @pandas_udf(prediction_schema(classes))
    def classify(batches: Iterator[pd.Series]) -> Iterator[pd.DataFrame]:
        yield from classify_batches(batches, SparkFiles.get(model_file), kind, threads,
                                    precision, thresholds, channel_map, device,
                                    trained_precision)

    return classify


# A lab profile: the moments of a sample of one scored input's images (``wbc_spark.align``),
# one row per model and score.input in <score.results>_lab_profiles; later runs of that input
# (a lake that grows) reuse it, so a cell's class does not depend on which run scored it.
PROFILE_SCHEMA = T.StructType([
    T.StructField("model_id", T.StringType()),
    T.StructField("input", T.StringType()),
    T.StructField("images", T.LongType()),
    T.StructField("moments", T.StringType()),  # Moments.to_state() as JSON
    T.StructField("measured_at", T.TimestampType()),
])
MOMENTS_SCHEMA = T.StructType([
    T.StructField("count", T.LongType()), T.StructField("images", T.LongType()),
    T.StructField("total", T.ArrayType(T.DoubleType())),
    T.StructField("squares", T.ArrayType(T.DoubleType())),
])


def partial_moments(batches: Iterator[pd.DataFrame], model_path: str, kind: str,
                    threads: int = 1, precision: str = "fp32", device: str = "cpu"
                    ) -> Iterator[pd.DataFrame]:
    """Body of the ``mapInPandas`` that measures a lab profile: each batch's readable images
    through the frozen layers (on ``device``, as the scoring pass), summed as ``Moments``
    (unreadable ones are skipped here; the scoring pass records them)."""
    device = worker_device(device)
    model, meta = load_model_once(model_path, threads, device)
    precision = resolve_precision(precision, device=device)
    for batch in batches:
        crops = []
        for blob in batch["data"]:
            try:
                crops.append(_prepare(blob, kind, meta)[0])
            except Exception:  # noqa: BLE001 - recorded with its reason by the scoring pass
                continue
        if not crops:
            continue
        with torch.inference_mode():
            m = Moments.of(frozen_pass(model, meta, torch.from_numpy(np.stack(crops)),
                                       precision, device))
        yield pd.DataFrame({"count": [m.count], "images": [m.images],
                            "total": [m.total.tolist()], "squares": [m.squares.tolist()]})


def one_class_folder(src: str, classes: list[str]) -> tuple[str, str] | None:
    """(class, folder) when a folder input, or a glob's folder, is named after a class, case
    aside: ``.../Lymphocyte`` and ``.../lymphocyte/*.jpg`` give ("Lymphocyte", the folder);
    else None."""
    if any(ch in src for ch in "*?["):
        src = os.path.dirname(re.split(r"[*?\[]", src, maxsplit=1)[0])
    folder = src.rstrip("/")
    name = {c.lower(): c for c in classes}.get(folder.rsplit("/", 1)[-1].lower())
    return (name, folder) if name else None


def lab_channel_map(spark: SparkSession, config: Config, meta: dict, model_file: str,
                    frame: DataFrame, kind: str, run_id: str) -> tuple[ChannelMap | None, str]:
    """The channel map a model trained with ``train.align`` scores by, and where it came
    from: a training lab's stored moments (``score.lab``), else this results table's lab
    profile for the model and ``score.lab_profile`` (default ``score.input``), measured now
    when there is none, on ``score.lab_profile_images`` of its images (the smallest SHA-256s).
    Measuring reads and hashes every image once more than the scoring pass does: a one-off
    cost per model and input. (None, "") for a model trained without."""
    s, model_id = config.score, meta["model_id"]
    state = meta.get("alignment")
    if not state:
        if s.lab:
            raise ConfigError(f"score.lab={s.lab!r}: model {model_id} was trained without "
                              "train.align, so it has no lab moments; leave score.lab empty")
        return None, ""
    alignment = LabAlignment.from_state(state)
    if s.lab:
        return alignment.map_for(s.lab), f"training lab {s.lab}'s stored moments"
    named = None if s.lab_profile else one_class_folder(
        s.input, [*meta["classes"], *config.other_labels])
    if named:
        raise ConfigError(
            f"score.input={s.input}: one class's folder ({named[0]}); a lab profile measured "
            "on one class maps that class onto the lab's mean cell (PBC-dev's lymphocytes "
            "scored alone: recall 0.33, against 0.92 by the profile of PBC-dev's folder; "
            "docs/RESULTS.md). Set score.lab_profile to the lab's whole folder (here perhaps "
            f"{named[1].rsplit('/', 1)[0]}), or score.lab to a training lab")
    source = s.lab_profile or s.input
    table = f"{s.results}_lab_profiles"
    stored = (tables.read(spark, table, PROFILE_SCHEMA)
              .where((F.col("model_id") == model_id) & (F.col("input") == source))
              .orderBy("measured_at").limit(1).collect())
    if stored:
        row = stored[0]
        moments = Moments.from_state(json.loads(row.moments))
        return (alignment.map_for("", moments),
                f"the lab profile of {row.images} images of {row.input} ({table})")
    if source != s.input:
        frame, kind = _input_frame(spark, replace(config, score=replace(s, input=source)), meta,
                                   setting="score.lab_profile")
    sample = (frame.where(F.col("sha256").isNotNull() & F.col("outside").isNull())
              .select("sha256", "data").dropDuplicates(["sha256"]).orderBy("sha256")
              .limit(s.lab_profile_images).repartition(spark.sparkContext.defaultParallelism))
    partial = sample.select("data").mapInPandas(
        lambda batches: partial_moments(batches, _spark_file(model_file), kind,
                                        s.threads_per_worker, s.precision, s.device),
        MOMENTS_SCHEMA).collect()
    parts = [Moments(r["count"], np.asarray(r.total), np.asarray(r.squares), r.images)
             for r in partial]
    images_read = sum(p.images for p in parts)
    if images_read < LAB_PROFILE_MIN:
        raise ValueError(
            f"{source}: {images_read} readable images to measure the lab's moments; model "
            f"{model_id} was trained with train.align and needs at least {LAB_PROFILE_MIN}: "
            "score more of the lab's images at once, or set score.lab to one of its training "
            f"labs ({', '.join(sorted(alignment.labs))})")
    moments = functools.reduce(lambda a, b: a + b, parts)
    profile = spark.createDataFrame(
        [(model_id, source, moments.images, json.dumps(moments.to_state()),
          datetime.now(timezone.utc))], PROFILE_SCHEMA)
    tables.append(profile, table, run_id, partitions=1)
    return (alignment.map_for("", moments),
            f"a new lab profile of {moments.images} images of {source} ({table})")


def _spark_file(name: str) -> str:
    from pyspark import SparkFiles
    return SparkFiles.get(name)


def _is_dataset(spark: SparkSession, path: str) -> bool:
    p = Path(path)
    return p.is_dir() and (any(p.glob("batch=*")) or any(p.glob("*.parquet")))


def _input_frame(spark: SparkSession, config: Config, meta: dict,
                 setting: str = "score.input") -> tuple[DataFrame, str]:
    """(frame with KEY, image_id, slide, data) and the kind of ``data`` ("crop" or "image")
    of ``score.input`` (``setting``: the setting that named it, for the errors)."""
    src = config.score.input
    if not src:
        raise ValueError("score.input is empty: give an image folder, a glob or a dataset")
    if _is_dataset(spark, src):
        df = read_dataset(spark, src).where(F.col("sha256").isNotNull())
        # Stored crops made as the model's were are used as they are; otherwise every image
        # is located and cropped again, as the model's preprocessing says.
        try:
            made = preprocessing.of_dataset(
                df.select("crop_size", "context", "stain", "framing").distinct().collect(),
                src)
            same = made.same_as(Preprocessing.from_artifact(meta))
        except preprocessing.ContractError as exc:
            log.info("%s; cropping the original images again", exc)
            same = False
        column, kind = ("crop", "crop") if same else ("image", "image")
        return df.select(*KEY, "sha256", "image_id", "slide", F.col(column).alias("data"),
                         F.lit(None).cast("string").alias("outside")), kind
    is_glob = any(ch in src for ch in "*?[")
    if not is_glob and not Path(src).exists() and "://" not in src:
        raise FileNotFoundError(f"{src}: {setting} not found")
    root = src if is_glob or "://" in src else str(Path(src).resolve())
    reader = spark.read.format("binaryFile")
    if not is_glob:
        reader = reader.option("recursiveFileLookup", "true")
    files = reader.load(root)
    if not is_glob:
        # What Spark's listing skips is recorded, not lost: empty files (an error row, "empty
        # file") and, on a local lake, names it cannot represent (see ``folder.unlistable``).
        extra = [(p, t, 0, b"") for p, t in tables.empty_files(spark, root)]
        extra += [(p, None, 0, None) for p in folder.unlistable(root)]
        if extra:
            files = files.unionByName(spark.createDataFrame(extra, files.schema))
        files = withhold_outside(files, root, "score.outside_links", config.score.outside_links)
    else:
        files = files.withColumn("outside", F.lit(None).cast("string"))
    base = root if not is_glob else os.path.dirname(root.split("*")[0])
    named = path_columns(F.col("path"), base, list(meta["classes"]))
    return files.select("path", F.col("length").alias("file_length"),
                        F.col("modificationTime").alias("file_mtime"),
                        F.sha2(F.col("content"), 256).alias("sha256"),
                        named["image_id"].alias("image_id"), named["slide"].alias("slide"),
                        F.col("content").alias("data"), "outside"), "image"


def retryable():
    """Rows to score again: errors that the same bytes may not repeat (the file could not be
    read at all, or an unexpected failure); a decoding error of the same bytes stands."""
    return F.col("error").isNotNull() & (F.col("sha256").isNull()
                                         | F.col("error").startswith("unexpected"))


def latest(results: DataFrame) -> DataFrame:
    """The results that count: per model, each path's newest row, then each image (sha256)
    once, under its newest path. Every reader of the per-image table should go through it."""
    newest = F.row_number().over(Window.partitionBy("model_id", "path")
                                 .orderBy(F.col("scored_at").desc(), F.col("run").desc()))
    by_path = results.withColumn("_n", newest).where(F.col("_n") == 1).drop("_n")
    once = F.row_number().over(Window.partitionBy("model_id", F.coalesce("sha256", "path"))
                               .orderBy(F.col("scored_at").desc(), F.col("path")))
    return by_path.withColumn("_n", once).where(F.col("_n") == 1).drop("_n")


def with_scopes(results: DataFrame, column: str, overall: str | None) -> DataFrame:
    """Each row once under its slide (rows with one) and once under ``overall`` (every image),
    the scope in ``column``: what the per-class table and the reports group by."""
    return (results.where(F.col("slide").isNotNull()).withColumn(column, F.col("slide"))
            .unionByName(results.withColumn(column, F.lit(overall).cast("string"))))


def counted_column() -> F.Column:
    """Whether a classified cell enters the differential (``differential.counts_as_cell``)."""
    out = "|".join(differential.COUNTED_OUT)
    return (F.col("predicted_class").isNotNull()
            & ~F.coalesce(F.col("review_reason"), F.lit("")).rlike(f"(^|;)({out})(;|$)"))


def per_class_table(results: DataFrame, classes: list[str], confusion: differential.Confusion,
                    alarm_share: float, min_cells: int = 10) -> DataFrame:
    """One model's rows: per slide and overall, the corrected differential with its interval
    (``wbc_spark.differential``), the raw counts and fractions with 95% Wilson intervals, the
    cells flagged for review per class, the shift score and alarm
    (``wbc_spark.review.shift_alarm``).

    Spark aggregates the counts per scope; the executors turn each scope's counts into its
    rows (``per_class_rows``); nothing passes through the driver.
    """
    confusion.check(classes)
    labs = sorted(confusion.per_lab)
    scoped = with_scopes(latest(results), "scope", None)
    counted = counted_column()
    counts = (scoped.groupBy("model_id", "scope")
              .agg(*[F.sum((F.col("predicted_class") == c).cast("long")).alias(c)
                     for c in classes],
                   *[F.sum(((F.col("predicted_class") == c) & counted).cast("long"))
                     .alias(f"counted_{c}") for c in classes],
                   *[F.sum(((F.col("predicted_class") == c) & F.col("needs_review"))
                           .cast("long")).alias(f"flagged_{c}") for c in classes],
                   F.sum(F.col("beyond_lab_range").isNotNull().cast("long")).alias("n_shift"),
                   F.sum(F.col("beyond_lab_range").cast("long")).alias("n_beyond"),
                   F.sum(F.col("error").isNotNull().cast("long")).alias("n_errors"),
                   *[F.sum((F.col("nearest_lab") == lab).cast("long")).alias(f"lab_{i}")
                     for i, lab in enumerate(labs)]))
    now = pd.Timestamp(datetime.now(timezone.utc)).tz_localize(None)

    def rows(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        for batch in batches:
            yield per_class_rows(batch, classes, confusion, alarm_share, min_cells, now, labs)

    return counts.mapInPandas(rows, PER_CLASS_SCHEMA)


def per_class_rows(counts: pd.DataFrame, classes: list[str],
                   confusion: differential.Confusion, alarm_share: float, min_cells: int,
                   now: pd.Timestamp, labs: list[str] = ()) -> pd.DataFrame:
    """Per-class rows of scopes' counts (columns ``<class>``, ``counted_<class>``,
    ``flagged_<class>``, ``n_shift``, ``n_beyond``, ``n_errors``, and ``lab_<i>``: cells
    nearest to training lab ``labs[i]``). A scope is corrected with the confusion of the lab
    most of its cells lie nearest to (``confusion_lab``; the pooled one without such counts).
    Each scope is estimated on its own, so its numbers depend on its counts only, not on
    which scopes share a batch."""
    out = []
    for d in counts.to_dict("records"):
        tally = np.asarray([_count(d[f"counted_{c}"]) for c in classes])
        lab = differential.scope_lab({name: _count(d.get(f"lab_{i}"))
                                      for i, name in enumerate(labs)})
        corrected = differential.estimate(tally, confusion.for_lab(lab))
        classified = sum(_count(d[c]) for c in classes)
        total = int(tally.sum())
        cells = _count(d["n_shift"])
        score, alarm = review.shift_alarm(_count(d["n_beyond"]), cells, alarm_share,
                                          min_cells)
        for j, c in enumerate(classes):
            k = _count(d[c])
            lo, hi = wilson(k, classified)
            out.append({"model_id": d["model_id"], "slide": d["scope"], "class": c,
                        "confusion_lab": lab or "pooled",
                        "corrected_fraction": float(corrected.share[j]),
                        "corrected_low": float(corrected.low[j]),
                        "corrected_high": float(corrected.high[j]),
                        "counted": int(tally[j]), "counted_total": total,
                        "excluded": classified - total,
                        "count": k, "classified": classified,
                        "fraction": k / classified if classified else float("nan"),
                        "ci_low": lo, "ci_high": hi, "errors": _count(d["n_errors"]),
                        "flagged": _count(d[f"flagged_{c}"]), "shift_cells": cells,
                        "shift_score": score, "shift_alarm": alarm, "updated_at": now})
    return pd.DataFrame(out, columns=PER_CLASS_SCHEMA.fieldNames())


def _count(value) -> int:
    """A count from an aggregate: null (no rows, or a column the batch lacks) is 0."""
    return 0 if value is None or value != value else int(value)


def thread_warning(threads: int, task_cpus: int) -> str | None:
    """Why ``threads`` torch threads per Python worker outrun the ``task_cpus`` cores Spark
    counts for each of its tasks, or None when they do not."""
    if threads <= task_cpus:
        return None
    return (f"score.threads_per_worker={threads} but spark.task.cpus={task_cpus}: Spark runs "
            f"a task on every core, so each core gets {threads / task_cpus:g} torch threads "
            "(measured: 2 workers x 2 threads on 2 cores, 0.58x the images/s of 2 x 1; "
            f"docs/PERFORMANCE.md). Set spark.task.cpus={threads} too, or leave 1 thread")


def run_scoring(spark: SparkSession, config: Config) -> dict:
    """Score what this model has not scored yet; append results; rebuild the per-class table."""
    s = config.score
    model_path = str(Path(s.model).resolve())
    _, meta = artifact.load(model_path, expected_classes=list(config.classes))
    if not meta.get("review"):
        raise artifact.ArtifactError(f"{model_path}: model has no review detectors (trained "
                                     "before review flags existed); train it again")
    if not meta.get("confusion"):
        raise artifact.ArtifactError(f"{model_path}: model has no held-out confusion matrix "
                                     "for the corrected differential (trained before it "
                                     "existed); train it again")
    if s.precision == "int8":
        require_int8(meta, model_path)
    thresholds = thresholds_of(meta, config.review)
    lab = review.LabDetector.from_state(meta["review"]["lab"])
    log.info("review thresholds: %s (lab_threshold 0: per training lab %s); shift alarm above "
             "%.0f%% of cells beyond the labs' range", thresholds,
             dict(zip(lab.labs, lab.thresholds.round(3))), 100 * config.review.alarm_share)
    warning = thread_warning(s.threads_per_worker,
                             int(spark.sparkContext.getConf().get("spark.task.cpus", "1")))
    if warning:
        log.warning(warning)
    spark.sparkContext.addFile(model_path)
    spark.conf.set("spark.sql.execution.arrow.maxRecordsPerBatch", str(s.batch_size))
    table = s.results
    run_id = tables.new_run_id()
    with tables.writer_lock(spark, table, run_id, "scoring run"):
        return _score_locked(spark, config, model_path, meta, thresholds, run_id)


def _score_locked(spark: SparkSession, config: Config, model_path: str, meta: dict,
                  thresholds: dict, run_id: str) -> dict:
    s, table = config.score, config.score.results
    classes, model_id = list(meta["classes"]), meta["model_id"]
    tables.clear_staging(spark, table)
    schema = results_schema(classes)
    frame, kind = _input_frame(spark, config, meta)
    # The "run" column (the partition) is read too: ``latest`` orders by it.
    stored = tables.read(spark, table, T.StructType(
        schema.fields + [T.StructField("run", T.StringType())]))
    done = (stored.where((F.col("model_id") == model_id) & F.col("sha256").isNotNull()
                         & ~retryable())
            .select("sha256").distinct())
    # Copies within this lake are one image: the first path (sorted) is scored.
    first = F.row_number().over(Window.partitionBy(F.coalesce("sha256", "path"))
                                .orderBy("path"))
    # The copies' window shuffles the images; adaptive execution then coalesces its
    # partitions by bytes, which left 3 uneven tasks for 2 cores (one core idle for a third
    # of the run). A round-robin repartition gives equal tasks, a few per core.
    tasks = s.tasks_per_core * spark.sparkContext.defaultParallelism
    todo = (frame.join(done, "sha256", "left_anti")
            .withColumn("_n", first).where(F.col("_n") == 1).drop("_n")
            .repartition(tasks))
    detail = ""
    if s.device != "cpu":
        detail = (" (score.device={}: each Python worker on a GPU where it has one{}; "
                  "\"auto\" precision is fp32 there)").format(
                      s.device, "" if s.device == "auto" else ", refused where it has none")
    elif s.precision == "auto":
        detail = (f" ({resolve_precision('auto')} on the driver's CPU; each Python worker "
                  "chooses by its own)")
    elif s.precision == "int8":
        detail = (f" ({meta['int8']['backend']} quantisation, activation ranges from "
                  f"{meta['int8']['images']} training crops)")
    log.info("scoring with model %s, frozen layers in %s%s, trained layers in %s", model_id,
             s.precision, detail, s.trained_precision)
    channel_map, profile = lab_channel_map(spark, config, meta, Path(model_path).name, frame,
                                           kind, run_id)
    if channel_map is not None:
        log.info("lab alignment (train.align): every image mapped by %s", profile)
    udf = make_udf(Path(model_path).name, kind, classes, s.threads_per_worker, s.precision,
                   thresholds, channel_map, s.device, s.trained_precision)
    predicted = [f.name for f in prediction_schema(classes).fields if f.name != "sha256"]
    unnamed = folder.unlistable(s.input) if kind == "image" else []
    scored = (todo.withColumn("_p", udf("data")).drop("data")
              .select(*KEY, "sha256", "image_id", "slide", "outside",
                      *[F.col(f"_p.{n}").alias(n) for n in predicted])
              .withColumn("error", F.when(F.col("path").isin(unnamed),
                                          F.lit(folder.UNREADABLE_NAME))
                          .otherwise(F.coalesce("outside", "error")))
              .withColumn("model_id", F.lit(model_id))
              .withColumn("scored_at", F.current_timestamp())
              .select(*schema.fieldNames()))
    scored_count = tables.append(scored, table, run_id)
    all_results = tables.read(spark, table, stored.schema)
    confusion = differential.Confusion.from_state(meta["confusion"])
    mine = per_class_table(all_results.where(F.col("model_id") == model_id), classes,
                           confusion, config.review.alarm_share, config.review.alarm_min_cells)
    # Other models' rows stay as the runs that scored with them wrote them (their results do
    # not change); rows from before a column existed read it as null.
    others = (tables.read(spark, f"{table}_per_class", PER_CLASS_SCHEMA)
              .where(F.col("model_id") != model_id))
    tables.replace(mine.unionByName(others), f"{table}_per_class", run_id)
    per_class = tables.read(spark, f"{table}_per_class", PER_CLASS_SCHEMA).where(
        F.col("model_id") == model_id)
    # The driver takes only what it prints: the overall rows and the slides that alarm.
    overall = per_class.where(F.col("slide").isNull()).toPandas()
    overall = overall.iloc[overall["class"].map(classes.index).argsort()].reset_index(drop=True)
    alarms = (per_class.where(F.col("shift_alarm")).select("slide", "shift_cells", "shift_score")
              .distinct().orderBy("slide").toPandas().to_dict("records"))
    errors = flagged = 0
    run_shift = (float("nan"), False)
    if scored_count:
        this_run = spark.read.schema(schema).parquet(f"{table}/run={run_id}")
        counts = this_run.agg(
            F.sum(F.col("error").isNotNull().cast("long")).alias("errors"),
            F.sum(F.col("needs_review").cast("long")).alias("flagged"),
            F.sum(F.col("beyond_lab_range").isNotNull().cast("long")).alias("cells"),
            F.sum(F.col("beyond_lab_range").cast("long")).alias("beyond")).first()
        errors, flagged = int(counts.errors or 0), int(counts.flagged or 0)
        run_shift = review.shift_alarm(int(counts.beyond or 0), int(counts.cells or 0),
                                       config.review.alarm_share,
                                       config.review.alarm_min_cells)
    for a in alarms:
        log.warning("SHIFT ALARM (%s): %.0f%% of %d cells lie beyond the training labs' range",
                    a["slide"] or "every image", 100 * a["shift_score"], a["shift_cells"])
    return {"model_id": model_id, "scored": scored_count, "errors": errors, "run_id": run_id,
            "flagged": flagged, "run_shift": run_shift, "alarms": alarms,
            "results": table, "per_class": f"{table}_per_class", "lab_profile": profile,
            "summary": overall}
