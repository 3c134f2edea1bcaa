"""Image lake -> validated Parquet dataset (plus a quarantine table for files that fail).

Spark lists and reads the files in parallel (``binaryFile``); ``process_batch`` decodes and
checks each one, hashes it, locates the white cell and stores its crop at the network's input
size, so training and scoring never decode a full frame again.

Dataset schema (``DATASET_SCHEMA``), one row per good image:

==============  =========  ================================================================
column          type       meaning
==============  =========  ================================================================
image_id        string     stable ID (``krd-wbc/image12``, or the path relative to the lake)
path            string     the file's path as Spark lists it (``file:/...``)
source          string     the lab (``data.lab``: KRD-WBC, PBC-dev, ...)
sha256          string     SHA-256 of the file's bytes
width, height   int        of the original image
label           string     class name (or one of ``other_labels``), null when unlabelled
group           string     images that must stay on one side of a split share it
slide           string     slide or session, null when unknown
mask            binary     ground-truth cell mask as PNG (thresholded > 127), or null
image           binary     the original file's bytes
crop            binary     cell crop, crop_size x crop_size x 3 uint8 RGB, row-major
crop_size       int        side of ``crop``
context         double     crop side / located cell's larger side (wbc_spark.preprocessing)
stain           string     stain standardisation applied to ``crop`` (``data.stain``)
framing         string     how the crop was kept inside the image (``data.framing``)
crop_box        array<int> left, top, side of the crop in the original image (as framed)
cell_found      boolean    false when no stained cell stood out (centre crop used)
cell_iou        double     IoU of the located cell with the true mask (null without mask)
file_length     long       bytes, as listed
file_mtime      timestamp  modification time, as listed
ingested_at     timestamp  when this run processed it
==============  =========  ================================================================

Quarantine schema (``QUARANTINE_SCHEMA``): path, image_id, source, label, reason, file_length,
file_mtime, ingested_at.

The tables are append-only. Read the dataset with ``read_dataset``: when a file's content
changed and it was ingested again, its latest row supersedes the earlier one.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd
from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql import types as T

from wbc_spark import images, tables
from wbc_spark.config import Config
from wbc_spark.preprocessing import Preprocessing
from wbc_spark.sources import CATALOG_COLUMNS, folder, krd_wbc, manifest
from wbc_spark.transforms import mask_iou

log = logging.getLogger(__name__)

DATASET_SCHEMA = T.StructType([
    T.StructField("image_id", T.StringType()),
    T.StructField("path", T.StringType()),
    T.StructField("source", T.StringType()),
    T.StructField("sha256", T.StringType()),
    T.StructField("width", T.IntegerType()),
    T.StructField("height", T.IntegerType()),
    T.StructField("label", T.StringType()),
    T.StructField("group", T.StringType()),
    T.StructField("slide", T.StringType()),
    T.StructField("mask", T.BinaryType()),
    T.StructField("image", T.BinaryType()),
    T.StructField("crop", T.BinaryType()),
    T.StructField("crop_size", T.IntegerType()),
    T.StructField("context", T.DoubleType()),
    T.StructField("stain", T.StringType()),
    T.StructField("framing", T.StringType()),
    T.StructField("crop_box", T.ArrayType(T.IntegerType())),
    T.StructField("cell_found", T.BooleanType()),
    T.StructField("cell_iou", T.DoubleType()),
    T.StructField("file_length", T.LongType()),
    T.StructField("file_mtime", T.TimestampType()),
    T.StructField("ingested_at", T.TimestampType()),
])
QUARANTINE_SCHEMA = T.StructType([
    T.StructField("path", T.StringType()),
    T.StructField("image_id", T.StringType()),
    T.StructField("source", T.StringType()),
    T.StructField("label", T.StringType()),
    T.StructField("reason", T.StringType()),
    T.StructField("file_length", T.LongType()),
    T.StructField("file_mtime", T.TimestampType()),
    T.StructField("ingested_at", T.TimestampType()),
])
# What process_batch emits: the dataset columns plus the reason (null when the file is good).
PROCESSED_SCHEMA = T.StructType(DATASET_SCHEMA.fields + [T.StructField("reason", T.StringType())])


# Images per processing task and per file of the dataset (a file of ~60 MB).
IMAGES_PER_TASK = 256


class DuplicateLabelError(ValueError):
    """One file content carries two different labels."""


@dataclass(frozen=True)
class IngestSettings:
    preprocessing: Preprocessing = Preprocessing(224, 1.5, "none", "fit")
    min_side: int = 32
    max_pixels: int = 40_000_000

    @classmethod
    def from_config(cls, config: Config) -> IngestSettings:
        d = config.data
        return cls(Preprocessing.from_config(config), d.min_side, d.max_pixels)


def process_row(row: dict, settings: IngestSettings) -> dict:
    """Decode, check and crop one file; on failure the row carries ``reason``."""
    out = {name: row.get(name) for name in PROCESSED_SCHEMA.fieldNames()}
    content = row.get("content")
    out.update(image=None, crop=None, mask=None, **settings.preprocessing.to_dict(),
               reason=None)
    if content is None and folder.name_problem(row.get("path") or ""):
        out["reason"] = folder.name_problem(row["path"])
        return out
    if content is None and row.get("outside"):
        out["reason"] = row["outside"]
        return out
    if content is None:
        local = folder.local_path(row.get("path") or "")
        exists = os.path.isfile(local)
        out["reason"] = "empty file" if exists and os.path.getsize(local) == 0 else \
            "file listed but not found"
        return out
    out["sha256"] = images.sha256(content)
    try:
        img = images.decode(content, min_side=settings.min_side, max_pixels=settings.max_pixels)
        out["width"], out["height"] = img.size
        crop, box, estimate = settings.preprocessing.crop_image(img)
        if row.get("mask_content") is not None:
            truth = images.decode_mask(row["mask_content"], img.size)
            out["mask"] = images.encode_png(truth)
            out["cell_iou"] = mask_iou(estimate, truth)
        elif row.get("mask_path"):
            raise images.BadImage(f"mask {row['mask_path']} not found")
    except images.BadImage as exc:
        out["reason"] = str(exc)
        return out
    except Exception as exc:  # a bad file must never stop the batch: record and go on
        out["reason"] = f"unexpected {type(exc).__name__}: {exc}"
        return out
    out.update(image=content, crop=crop.tobytes(), crop_box=[box.left, box.top, box.side],
               cell_found=box.found)
    return out


def process_batch(frames, settings: IngestSettings):
    """``mapInPandas`` body: each input frame of files -> frame of ``PROCESSED_SCHEMA`` rows."""
    names = PROCESSED_SCHEMA.fieldNames()
    for pdf in frames:
        now = pd.Timestamp(datetime.now(timezone.utc)).tz_localize(None)
        rows = [process_row(r, settings) for r in pdf.to_dict("records")]
        out = pd.DataFrame(rows, columns=names)
        out["ingested_at"] = now
        for col in ("width", "height", "crop_size"):
            out[col] = out[col].astype("Int32")
        yield out


def withhold_outside(files: DataFrame, lake: str, setting: str, policy: str) -> DataFrame:
    """A listing of a folder lake (Spark's ``binaryFile`` columns) with an ``outside`` column:
    why a file reached through a symbolic link leading outside the lake is not read (its
    content is dropped), null for the rest. With ``policy`` "follow" they are read and a
    warning names how many there are."""
    links = folder.outside_links(lake)
    if links and policy == "follow":
        log.warning("%d symbolic link(s) under %s lead outside it (e.g. %s -> %s); following "
                    "them (%s=follow)", len(links), lake, *next(iter(links.items())), setting)
    if not links or policy == "follow":
        return files.withColumn("outside", F.lit(None).cast("string"))
    log.warning("%d symbolic link(s) under %s lead outside it (e.g. %s -> %s); what they reach "
                "is recorded as not read (%s=follow reads it)", len(links), lake,
                *next(iter(links.items())), setting)

    @F.udf("string")
    def problem(path):
        return folder.outside_problem(path, links, setting)

    files = files.withColumn("outside", problem("path"))
    return files.withColumn("content", F.when(F.col("outside").isNull(), F.col("content")))


def path_columns(path: Column, lake_root: str, classes: list[str]) -> dict[str, Column]:
    """``folder.path_metadata`` (image_id, label, group, slide) as Spark expressions. As a
    Python UDF it made the scoring job's file scan cost 7.1 s of CPU per 1,000 images instead
    of 1.9 s (a row or a pandas UDF alike). Spark reports local paths as ``file:`` URIs with
    escapes; ``url_decode`` is form decoding, so a literal ``+`` is protected first."""
    root = folder.local_path(lake_root).rstrip("/") + "/"
    local = F.regexp_replace(_strip_scheme(path), r"\+", "%2B")
    decoded = F.when(path.startswith("file:"), F.url_decode(local)).otherwise(path)
    rel = F.when(decoded.startswith(root), decoded.substr(len(root) + 1, 1 << 30)).otherwise(
        F.regexp_extract(decoded, r"[^/]*$", 0))
    parent = F.regexp_extract(rel, r"^(.*)/[^/]*$", 1)
    top = F.lower(F.split(parent, "/").getItem(0))
    canonical = {c.lower(): c for c in classes}
    label = F.create_map(*[F.lit(x) for kv in canonical.items() for x in kv])[top]
    none = F.lit(None).cast("string")
    slide = F.when((parent == "") | top.isin(list(canonical)), none).otherwise(parent)
    return {"image_id": rel, "label": label, "group": rel, "slide": slide}


def _strip_scheme(col):
    return F.regexp_replace(col, r"^file:(//)?", "")


def lab_name(config: Config) -> str:
    """The lab written into the ``source`` column: ``data.lab``, else KRD-WBC for its reader,
    else the lake folder's name (a manifest's: the folder it lies in)."""
    d = config.data
    if d.lab:
        return d.lab
    if d.source == "krd_wbc":
        return "KRD-WBC"
    lake = Path(folder.local_path(d.lake.rstrip("/")))
    return (lake.parent if d.source == "manifest" else lake).name or "lab"


def _catalog(spark: SparkSession, config: Config) -> tuple[DataFrame, str]:
    """The lake's catalog joined with its files' bytes; returns (frame, lake description).

    Folder and manifest image IDs are prefixed with the lab, so two labs' ``Neutrophil/1.jpg``
    stay apart."""
    d = config.data
    lab = lab_name(config)
    labels = list(config.classes) + list(config.other_labels)
    if d.source == "folder":
        if not d.lake:
            raise ValueError("data.lake must name the image folder for data.source=folder")
        lake = str(Path(d.lake).resolve()) if "://" not in d.lake else d.lake
        files = (spark.read.format("binaryFile").option("recursiveFileLookup", "true")
                 .load(lake))
        empties = tables.empty_files(spark, lake)
        if empties:
            files = files.unionByName(spark.createDataFrame(
                [(p, t, 0, b"") for p, t in empties], files.schema))
        unnamed = folder.unlistable(lake)  # names Spark cannot list: recorded, not lost
        if unnamed:
            files = files.unionByName(spark.createDataFrame(
                [(p, None, 0, None) for p in unnamed], files.schema))
        files = withhold_outside(files, lake, "data.outside_links", d.outside_links)
        m = path_columns(F.col("path"), lake, labels)
        df = files.select(
            F.concat(F.lit(f"{lab}/"), m["image_id"]).alias("image_id"), "path",
            F.lit(lab).alias("source"), m["label"].alias("label"), m["group"].alias("group"),
            m["slide"].alias("slide"), F.lit(None).cast("string").alias("mask_path"),
            F.lit(None).cast("binary").alias("mask_content"), "content",
            F.col("length").alias("file_length"), F.col("modificationTime").alias("file_mtime"),
            "outside",
        )
        return df, lake
    if d.source == "krd_wbc":
        root = Path(d.lake) if d.lake else krd_wbc.default_root()
        cat = krd_wbc.catalog(root, config.classes)
        lake = str(root)
    else:
        cat = manifest.catalog(d.lake, labels)
        cat["image_id"] = lab + "/" + cat["image_id"]
        lake = d.lake
    cat["source"] = lab
    schema = T.StructType([T.StructField(c, T.StringType()) for c in CATALOG_COLUMNS])
    cat_df = spark.createDataFrame(cat.astype(object).where(cat.notna(), None), schema)
    image_dirs = sorted({str(Path(p).parent) for p in cat["path"]})
    files = (spark.read.format("binaryFile").load(image_dirs)
             .withColumn("_local", _strip_scheme(F.col("path"))))
    df = cat_df.join(files.select("_local", F.col("path").alias("uri"), "content",
                                  F.col("length").alias("file_length"),
                                  F.col("modificationTime").alias("file_mtime")),
                     cat_df.path == F.col("_local"), "left")
    mask_paths = [p for p in cat["mask_path"].dropna()]
    if mask_paths:
        mask_dirs = sorted({str(Path(p).parent) for p in mask_paths})
        masks = (spark.read.format("binaryFile").load(mask_dirs)
                 .select(_strip_scheme(F.col("path")).alias("_mask_local"),
                         F.col("content").alias("mask_content")))
        df = df.join(masks, df.mask_path == F.col("_mask_local"), "left")
    else:
        df = df.withColumn("mask_content", F.lit(None).cast("binary"))
    df = df.select(
        "image_id", F.coalesce("uri", F.concat(F.lit("file:"), cat_df.path)).alias("path"),
        "source", "label", "group", "slide", "mask_path", "mask_content", "content",
        "file_length", "file_mtime",
    )
    return df, lake


@dataclass
class IngestSummary:
    read: int
    written: int
    quarantined: int
    duplicates: int
    skipped_known: int
    run_id: str

    def line(self) -> str:
        return (f"ingest: read {self.read}, written {self.written}, quarantined "
                f"{self.quarantined}, duplicates {self.duplicates}, already ingested "
                f"{self.skipped_known} (run {self.run_id})")


def read_dataset(spark: SparkSession, table: str) -> DataFrame:
    """The dataset as it stands: for each path, the row of its latest ingest (a file whose
    content changed is ingested again and its new row supersedes the old one)."""
    rows = tables.read(spark, table, DATASET_SCHEMA)
    # Find the superseded rows from two small columns, then drop them with a broadcast
    # anti-join: the image bytes are never shuffled, and usually nothing is superseded.
    latest = rows.groupBy("path").agg(F.max("ingested_at").alias("latest"))
    superseded = (rows.select("path", "ingested_at").join(latest, "path")
                  .where(F.col("ingested_at") < F.col("latest")).select("path", "ingested_at"))
    return rows.join(F.broadcast(superseded), ["path", "ingested_at"], "left_anti")


def duplicate_report(df: DataFrame) -> pd.DataFrame:
    """Contents present more than once: sha256, paths and labels (small: aggregates only)."""
    groups = (df.groupBy("sha256")
              .agg(F.count("*").alias("n"), F.sort_array(F.collect_list("path")).alias("paths"),
                   F.collect_set("label").alias("labels"))
              .where("n > 1"))
    return groups.toPandas()


def check_duplicate_labels(report: pd.DataFrame) -> None:
    """Refuse one content with two labels, naming the files."""
    for row in report.itertuples():
        labels = sorted(set(row.labels))
        if len(labels) > 1:
            raise DuplicateLabelError(
                f"same image content (sha256 {row.sha256[:12]}) labelled {' and '.join(labels)}"
                f": {' and '.join(row.paths)}; fix the labels in the lake and run ingest again"
            )


def listed_estimate(files: DataFrame) -> int:
    """About how many files a catalog frame lists, from Spark's listing (no job): to size
    the processing tasks, never reported."""
    return max(1, len(files.inputFiles()))


def run_ingest(spark: SparkSession, config: Config) -> IngestSummary:
    """Ingest the configured lake; idempotent (files already ingested or quarantined skip)."""
    run_id = tables.new_run_id()
    # One ingest per dataset at a time (its lock covers the quarantine table too).
    with tables.writer_lock(spark, config.data.dataset, run_id, "ingest"):
        return _ingest_locked(spark, config, run_id)


def _ingest_locked(spark: SparkSession, config: Config, run_id: str) -> IngestSummary:
    settings = IngestSettings.from_config(config)
    dataset, quarantine = config.data.dataset, config.data.quarantine
    for table in (dataset, quarantine):
        tables.clear_staging(spark, table)
    files, lake = _catalog(spark, config)
    log.info("ingesting %s (%s, lab %s) into %s", lake, config.data.source, lab_name(config),
             dataset)

    # Skip what an earlier run already handled (same path, size and time) without reading it;
    # a file listed with a new size or time is read again and kept only if its content (or,
    # for a bad file, its problem) changed: a copied or touched lake adds nothing.
    key = ["path", "file_length", "file_mtime"]
    has_rows = {t: tables.has_data(spark, t) for t in (dataset, quarantine)}
    known = (tables.read(spark, dataset, DATASET_SCHEMA).select(*key)
             .unionByName(tables.read(spark, quarantine, QUARANTINE_SCHEMA).select(*key)))
    # Tasks of about IMAGES_PER_TASK images, and at least one per core: the listing's own
    # partitions hold ~30 small files each, and each Python task has a fixed cost (2,000
    # images in 63 tasks took 24-26 s to process, in 8 tasks 18 s).
    tasks = max(spark.sparkContext.defaultParallelism,
                -(-listed_estimate(files) // IMAGES_PER_TASK))
    fresh = files.join(known, key, "left_anti").coalesce(tasks)

    processed = fresh.mapInPandas(lambda it: process_batch(it, settings), PROCESSED_SCHEMA)
    processed = processed.persist()
    try:
        existing = read_dataset(spark, dataset).select("sha256", "path", "label")
        good = (processed.where(F.col("reason").isNull()).drop("reason")
                .join(existing.select("path", "sha256"), ["path", "sha256"], "left_anti"))
        bad = (processed.where(F.col("reason").isNotNull())
               .join(tables.read(spark, quarantine, QUARANTINE_SCHEMA).select("path", "reason"),
                     ["path", "reason"], "left_anti")
               .select(*QUARANTINE_SCHEMA.fieldNames()))
        # The counts come from the cached rows in one job; the anti-joins against the tables
        # are counted only when there is a table to compare with (a first run has none), and
        # the files skipped unread only when there were earlier runs.
        ok = {r["ok"]: r["n"] for r in processed.groupBy(F.col("reason").isNull().alias("ok"))
              .agg(F.count("*").alias("n")).collect()}
        n_good = good.count() if has_rows[dataset] else ok.get(True, 0)
        n_bad = bad.count() if has_rows[quarantine] else ok.get(False, 0)
        unread = files.join(known, key, "left_semi").count() if any(has_rows.values()) else 0
        listed = sum(ok.values()) + unread
        report = duplicate_report(good.select("sha256", "path", "label").unionByName(existing))
        check_duplicate_labels(report)
        for row in report.itertuples():
            log.warning("duplicate content %s: %s", row.sha256[:12], ", ".join(row.paths))
        if n_good:
            tables.append(good, dataset, run_id, kind="batch",
                          partitions=-(-n_good // IMAGES_PER_TASK))
        if n_bad:
            tables.append(bad, quarantine, run_id, kind="batch", partitions=1)
            for r in bad.select("path", "reason").limit(20).toLocalIterator():
                log.warning("quarantined %s: %s", r.path, r.reason)
    finally:
        processed.unpersist()
    return IngestSummary(read=listed, written=n_good, quarantined=n_bad,
                         duplicates=int(sum(report["n"] - 1)) if len(report) else 0,
                         skipped_known=listed - n_good - n_bad, run_id=run_id)
