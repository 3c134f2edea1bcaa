"""Append-only Parquet tables with atomic commits, on any Hadoop file system.

A table is a folder holding one sub-folder per committed run, ``<table>/<kind>=<run_id>/``.
A run writes into ``<table>/_staging/<run_id>/`` (Spark ignores paths starting with ``_``) and
then renames that folder into place: one rename, so a run is either wholly in the table or not
at all. A job killed before the rename leaves only staging debris, which the next run clears;
re-running never duplicates rows because each job first removes what the table already holds.
"""

from __future__ import annotations

import logging
import uuid
from datetime import datetime, timezone

from pyspark.sql import DataFrame, SparkSession
from pyspark.sql.types import StructType

log = logging.getLogger(__name__)

STAGING = "_staging"


def new_run_id() -> str:
    """Sortable, unique run ID: UTC time plus a random suffix."""
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:6]


def _fs(spark: SparkSession, path: str):
    jvm = spark.sparkContext._jvm
    jpath = jvm.org.apache.hadoop.fs.Path(path)
    return jpath.getFileSystem(spark.sparkContext._jsc.hadoopConfiguration()), jpath


def exists(spark: SparkSession, path: str) -> bool:
    fs, jpath = _fs(spark, path)
    return bool(fs.exists(jpath))


def has_data(spark: SparkSession, table: str) -> bool:
    """Whether the table holds at least one committed run."""
    fs, jpath = _fs(spark, table)
    if not fs.exists(jpath):
        return False
    return any(not s.getPath().getName().startswith(("_", ".")) for s in fs.listStatus(jpath))


def delete(spark: SparkSession, path: str) -> None:
    fs, jpath = _fs(spark, path)
    if fs.exists(jpath):
        fs.delete(jpath, True)


def rename(spark: SparkSession, src: str, dst: str) -> None:
    fs, jsrc = _fs(spark, src)
    jdst = spark.sparkContext._jvm.org.apache.hadoop.fs.Path(dst)
    fs.mkdirs(jdst.getParent())
    if not fs.rename(jsrc, jdst):
        raise OSError(f"could not rename {src} to {dst}")


def empty_files(spark: SparkSession, root: str) -> list[tuple[str, datetime]]:
    """Zero-length files under ``root`` (recursive), as (path, modification time).

    Spark's file sources silently skip empty files; ingest lists them here so that they reach
    the quarantine table instead of vanishing.
    """
    fs, jpath = _fs(spark, root)
    if not fs.exists(jpath):
        return []
    out = []
    it = fs.listFiles(jpath, True)
    while it.hasNext():
        status = it.next()
        name = status.getPath().getName()
        if status.getLen() == 0 and not name.startswith(("_", ".")):
            mtime = datetime.fromtimestamp(status.getModificationTime() / 1000, timezone.utc)
            out.append((status.getPath().toString(), mtime.replace(tzinfo=None)))
    return out


def read(spark: SparkSession, table: str, schema: StructType) -> DataFrame:
    """The table's committed rows with ``schema``, or an empty frame when it has none."""
    if not has_data(spark, table):
        return spark.createDataFrame([], schema)
    return spark.read.schema(schema).parquet(table)


def append(df: DataFrame, table: str, run_id: str, *, kind: str = "run",
           partitions: int | None = None) -> int:
    """Write ``df`` as one atomically committed run of ``table``; return its row count.

    ``df`` is computed once (the write); the count is read back from the written files. An
    empty run is not committed.
    """
    spark = df.sparkSession
    staging = f"{table}/{STAGING}/{run_id}"
    final = f"{table}/{kind}={run_id}"
    if partitions:
        df = df.coalesce(partitions)
    df.write.mode("overwrite").parquet(staging)
    rows = spark.read.schema(df.schema).parquet(staging).count()
    if rows:
        rename(spark, staging, final)
        log.info("committed %s (%d rows)", final, rows)
    else:
        delete(spark, staging)
    return rows


def replace(df: DataFrame, table: str, run_id: str) -> None:
    """Replace a whole small table (e.g. a summary) with ``df``; readers see old or new."""
    spark = df.sparkSession
    staging = f"{table}.{run_id}.tmp"
    df.write.mode("overwrite").parquet(staging)
    old = f"{table}.{run_id}.old"
    if exists(spark, table):
        rename(spark, table, old)
    rename(spark, staging, table)
    delete(spark, old)


def clear_staging(spark: SparkSession, table: str) -> None:
    """Remove what interrupted runs left behind (never committed, so never visible)."""
    delete(spark, f"{table}/{STAGING}")
