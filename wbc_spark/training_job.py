"""Driver side of distributed training: split, petastorm converters, TorchDistributor."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from wbc_spark import preprocessing, tables
from wbc_spark.augment import AugmentSettings
from wbc_spark.config import Config
from wbc_spark.ingest import read_dataset
from wbc_spark.model.weights import resolve_bvlc_dir
from wbc_spark.preprocessing import Preprocessing
from wbc_spark.splits import train_val_test
from wbc_spark.train import Recipe
from wbc_spark.training_worker import TrainingJob, distributed_worker

log = logging.getLogger(__name__)


def _uri(path: str) -> str:
    return path if "://" in path else Path(path).resolve().as_uri()


def run_training(spark: SparkSession, config: Config) -> dict:
    """Train on the ingested dataset with TorchDistributor; return rank 0's summary."""
    from petastorm.spark import SparkDatasetConverter
    from pyspark.ml.torch.distributor import TorchDistributor

    t = config.train
    classes = list(config.classes)
    # Resolve the weights here, once, so every process (on any executor) gets the same folder
    # and a missing folder fails before Spark starts any training task.
    weights_dir = ""
    if config.model.source == "bvlc":
        weights_dir = str(resolve_bvlc_dir(config.model.weights_dir or None).resolve())
    if not tables.has_data(spark, config.data.dataset):
        raise FileNotFoundError(f"{config.data.dataset}: no ingested dataset; run "
                                "jobs/ingest.py first")
    data = read_dataset(spark, config.data.dataset)
    labelled = data.where(F.col("label").isin(classes))
    outside = {r.label: r["count"] for r in data.where(
        F.col("label").isNotNull() & ~F.col("label").isin(classes)).groupBy("label").count()
        .collect()}
    unknown = sorted(set(outside) - set(config.other_labels))
    if unknown:
        raise ValueError(f"images labelled {unknown} are neither classes {classes} nor "
                         f"other_labels {list(config.other_labels)}; refusing to drop them "
                         "silently (set 'classes' or 'other_labels', or fix the labels)")
    if outside:
        log.info("not trained on (other_labels, not one of the classes): %s", outside)
    contract = preprocessing.of_dataset(
        labelled.select("crop_size", "context", "stain", "framing").distinct().collect(),
        config.data.dataset)
    preprocessing.check(contract, Preprocessing.from_config(config), config.data.dataset,
                        "ingest again into a new data.dataset, or set data.crop_size, "
                        "data.context, data.stain and data.framing to how it was made")
    # Metadata only (no pixels) comes to the driver to compute the grouped split.
    meta = (labelled.select("image_id", "sha256", "label", "group", "source")
            .orderBy("image_id").toPandas())
    roles = train_val_test(meta, folds=t.folds, test_fold=t.test_fold,
                           val_fraction=t.val_fraction, seed=t.seed)
    meta["role"] = roles
    meta["row"] = np.arange(len(meta))
    meta["label_index"] = meta["label"].map({c: i for i, c in enumerate(classes)})
    split_sizes = {r: int((roles == r).sum()) for r in ("train", "val", "test")}
    counts = [int(((roles == "train") & (meta["label"] == c)).sum()) for c in classes]
    trained_on = {str(lab): {c: int(((roles == "train") & (meta["source"] == lab)
                                     & (meta["label"] == c)).sum()) for c in classes}
                  for lab in sorted(meta["source"].fillna("").unique())}
    log.info("split (grouped, stratified by lab and class, test fold %d of %d): %s; train per "
             "lab and class %s", t.test_fold, t.folds, split_sizes, trained_on)
    for c, n in zip(classes, counts):
        if n == 0:
            raise ValueError(f"class {c} has no training images after the split")

    roles_df = spark.createDataFrame(meta[["image_id", "role", "row", "label_index"]])
    joined = labelled.join(roles_df, "image_id").select("crop", "label_index", "row", "role")
    spark.conf.set(SparkDatasetConverter.PARENT_CACHE_DIR_URL_CONF, _uri(t.petastorm_cache))
    world = max(1, t.num_processes)
    converters = {}
    try:
        for role in ("train", "val", "test"):
            converters[role] = _converter(spark, joined.where(F.col("role") == role)
                                          .drop("role"), world)
        job = TrainingJob(
            classes=classes, recipe=Recipe.from_config(t), model_source=config.model.source,
            weights_dir=weights_dir, freeze_until=config.model.freeze_until,
            dropout=config.model.dropout, test_views=config.model.test_views,
            crop_size=contract.crop_size,
            preprocessing=contract.to_dict(), threads_per_process=t.threads_per_process,
            views=t.views, cache_gib=t.cache_gib, frozen_precision=t.frozen_precision,
            int8_calibration=t.int8_calibration, align=t.align,
            augment=AugmentSettings(**config.augment.__dict__),
            local_mode=t.local_mode, review=config.review, n_train=split_sizes["train"],
            class_counts=counts, split_sizes=split_sizes, test_fold=t.test_fold,
            folds=t.folds, image_ids=meta["image_id"].tolist(),
            sources=meta["source"].tolist(), trained_on=trained_on,
            output=str(Path(t.output).resolve()), config=config.to_dict(),
            conv_train=converters["train"], conv_val=converters["val"],
            conv_test=converters["test"])
        distributor = TorchDistributor(num_processes=world, local_mode=t.local_mode,
                                       use_gpu=t.use_gpu)
        summary = distributor.run(distributed_worker, job)
    finally:
        for conv in converters.values():
            conv.delete()
    return summary


# Parquet checks a row group's size only every this many rows (100 by default, about 15 MB
# of crops): without it a 1 MiB row group held 100 crops, a small split's file one row group,
# and one rank's shard could get nearly three times the other's.
_ROW_GROUP_CHECK = "parquet.page.size.row.check.min"


def _converter(spark: SparkSession, part: DataFrame, world: int):
    """A petastorm converter of ``part`` whose shards are the same in every run, and even.

    petastorm shards by row group, in the order of the converter's file list: the rows are
    hash-partitioned by row number and sorted within each file, the row groups kept small
    (about 5 crops: each rank gets many), and the file list sorted (Spark lists the files in
    no fixed order). A round-robin repartition would depend on the order in which a shuffle's
    blocks were fetched.
    """
    from petastorm.spark import make_spark_converter

    part = part.repartition(max(2, 2 * world), "row").sortWithinPartitions("row")
    spark.conf.set(_ROW_GROUP_CHECK, "1")
    try:
        conv = make_spark_converter(part, parquet_row_group_size_bytes=1 << 20)
    finally:
        spark.conf.unset(_ROW_GROUP_CHECK)
    conv.file_urls = sorted(conv.file_urls)
    return conv
