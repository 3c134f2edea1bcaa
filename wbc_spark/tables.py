"""Append-only Parquet tables with atomic commits, on any Hadoop file system.

A table is a folder holding one sub-folder per committed run, ``<table>/<kind>=<run_id>/``.
A run writes into ``<table>/_staging/<run_id>/`` (Spark ignores paths starting with ``_``) and
then renames that folder into place: one rename, so a run is either wholly in the table or not
at all. A job killed before the rename leaves only staging debris, which the next run clears;
re-running never duplicates rows because each job first removes what the table already holds.

One writer at a time: a job holds ``writer_lock`` on its tables while it runs; a second job
refuses with a message naming the holder (a holder whose process is gone is taken over).
Small summary tables are replaced whole (``replace``): on a local file system the table's path
is a symbolic link swapped in one ``rename`` to a new version folder, so a reader sees the old
or the new table, never none.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import stat
import uuid
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
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

    Spark's file sources silently skip empty files; ingest and scoring list them here so
    that they are recorded instead of vanishing. On a local file system the lake is walked
    in Python, one ``stat`` per file; elsewhere Hadoop's listing is iterated through py4j,
    a few calls per file (3.7 s for 1,000 files here when it was used for local lakes too).
    """
    fs, jpath = _fs(spark, root)
    if not fs.exists(jpath):
        return []
    local = local_path(spark, root)
    return _local_empty_files(local) if local is not None else _hadoop_empty_files(fs, jpath)


def _hadoop_empty_files(fs, jpath) -> list[tuple[str, datetime]]:
    out = []
    it = fs.listFiles(jpath, True)
    while it.hasNext():
        status = it.next()
        name = status.getPath().getName()
        if status.getLen() == 0 and not name.startswith(("_", ".")):
            out.append((status.getPath().toString(), _utc(status.getModificationTime())))
    return sorted(out)


def _utc(millis: int) -> datetime:
    return datetime.fromtimestamp(millis / 1000, timezone.utc).replace(tzinfo=None)


def _local_empty_files(root: Path) -> list[tuple[str, datetime]]:
    """``empty_files`` for a local folder, paths written as Hadoop writes them ("file:" and
    the absolute path); links are followed as Hadoop's local listing follows them, and names
    that are not UTF-8 are left to ``sources.folder.unlistable``."""
    out = []
    for folder, _, names in os.walk(root, followlinks=True):
        for name in names:
            if name.startswith(("_", ".")):
                continue
            full = os.path.join(folder, name)
            try:
                st = os.stat(full)
                full.encode("utf-8")
            except (OSError, UnicodeEncodeError):  # vanished, a broken link, a bad name
                continue
            if st.st_size == 0 and stat.S_ISREG(st.st_mode):
                out.append((f"file:{full}", _utc(st.st_mtime_ns // 1_000_000)))
    return sorted(out)


def read(spark: SparkSession, table: str, schema: StructType) -> DataFrame:
    """The table's committed rows with ``schema``, or an empty frame when it has none.

    The empty frame is a local relation that Spark knows to be empty, so a join against it
    is planned away: a first run does not shuffle its images to compare them with nothing
    (``createDataFrame([])`` would be an RDD of unknown size, joined by a full shuffle).
    """
    if not has_data(spark, table):
        return spark.range(0).select(*(F.lit(None).cast(f.dataType).alias(f.name)
                                       for f in schema.fields))
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


def local_path(spark: SparkSession, path: str) -> Path | None:
    """``path`` as a local path when it lives on the local file system, else None."""
    fs, jpath = _fs(spark, path)
    if fs.getScheme() != "file":
        return None
    return Path(fs.makeQualified(jpath).toUri().getPath())


def replace(df: DataFrame, table: str, run_id: str, keep: int = 2) -> None:
    """Replace a whole small table (e.g. a summary) with ``df``.

    Local file system: ``df`` is written to ``<table>_versions/<run_id>`` and ``<table>``, a
    symbolic link, is swapped to it by one ``rename``: readers see the old or the new table.
    The ``keep`` newest versions stay (a reader still on the previous one can finish).
    Elsewhere (HDFS, object stores): the old table is renamed away and the new one into
    place, so for that moment the table is absent (see docs/DEPLOY.md).
    """
    spark = df.sparkSession
    local = local_path(spark, table)
    if local is None:
        staging = f"{table}.{run_id}.tmp"
        df.write.mode("overwrite").parquet(staging)
        old = f"{table}.{run_id}.old"
        if exists(spark, table):
            rename(spark, table, old)
        rename(spark, staging, table)
        delete(spark, old)
        return
    versions = local.parent / f"{local.name}_versions"
    df.write.mode("overwrite").parquet(str(versions / run_id))
    if local.exists() and not local.is_symlink():  # a table from before versions: moved in
        local.rename(versions / f"{run_id}.before")
    link = local.parent / f".{local.name}.{run_id}.link"
    link.symlink_to(Path(versions.name) / run_id)
    os.replace(link, local)
    for old in sorted(versions.iterdir(), key=lambda p: p.stat().st_mtime)[:-keep]:
        delete(spark, str(old))


def clear_staging(spark: SparkSession, table: str) -> None:
    """Remove what interrupted runs left behind (never committed, so never visible). Call it
    only while holding ``writer_lock``: another run's staging is its work in progress."""
    delete(spark, f"{table}/{STAGING}")


class TableBusy(RuntimeError):
    """Another job is writing the table."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextmanager
def writer_lock(spark: SparkSession, table: str, run_id: str, job: str):
    """Hold ``<table>/_lock`` for the body: created atomically (``O_EXCL`` on a local file
    system, a non-overwriting create elsewhere: atomic on HDFS, not on every object store),
    it names the run, host and process. A second job refuses with ``TableBusy``; a lock whose
    process is gone (same host) is stale and taken over, with a warning."""
    lock = f"{table}/_lock"
    fs, jpath = _fs(spark, lock)
    fs.mkdirs(jpath.getParent())
    me = {"run_id": run_id, "job": job, "host": socket.gethostname(), "pid": os.getpid(),
          "started": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    for attempt in range(2):
        if _create_exclusive(spark, lock, json.dumps(me).encode()):
            break
        holder = _read_lock(spark, lock)
        stale = (holder.get("host") == me["host"] and isinstance(holder.get("pid"), int)
                 and not _alive(holder["pid"]))
        if stale and attempt == 0:
            log.warning("taking over %s: its run %s (pid %s) is no longer running", lock,
                        holder.get("run_id"), holder.get("pid"))
            fs.delete(jpath, False)
            continue
        raise TableBusy(
            f"{table}: another {holder.get('job', 'job')} (run {holder.get('run_id')}, pid "
            f"{holder.get('pid')} on {holder.get('host')}, since {holder.get('started')}) is "
            f"writing it; run again when it has finished (if it died on another machine, "
            f"delete {lock})")
    try:
        yield
    finally:
        if _read_lock(spark, lock).get("run_id") == run_id:
            fs.delete(jpath, False)


def _create_exclusive(spark: SparkSession, path: str, data: bytes) -> bool:
    """Create ``path`` holding ``data`` unless it exists; whether this call created it."""
    local = local_path(spark, path)
    if local is not None:
        try:
            fd = os.open(local, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        return True
    fs, jpath = _fs(spark, path)
    try:
        out = fs.create(jpath, False)
    except Exception as exc:  # py4j: FileAlreadyExistsException
        if "FileAlreadyExists" in str(exc):
            return False
        raise
    out.write(bytearray(data))
    out.close()
    return True


def _read_lock(spark: SparkSession, lock: str) -> dict:
    try:
        local = local_path(spark, lock)
        text = (local.read_text() if local is not None
                else "".join(spark.sparkContext.textFile(lock).collect()))
        return json.loads(text or "{}")
    except Exception:  # gone meanwhile, or half-written: no holder to name
        return {}
