"""Helpers the jobs use to start Spark and logging (library code never starts Spark itself)."""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import time

import wbc_spark
from wbc_spark.config import Config, load_config


def setup_logging(level: str = "INFO") -> None:
    logging.basicConfig(level=level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("py4j", "petastorm", "pyspark"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def log_config(config: Config) -> None:
    logging.getLogger("wbc_spark").info("resolved config: %s", json.dumps(config.to_dict()))
    logging.getLogger("wbc_spark").info("pyarrow_hotfix active: %s", wbc_spark.hotfix_active())


def submitted_master() -> str | None:
    """The master spark-submit was given, or None when it only has its default (local[*]).

    spark-submit always sets spark.master (local[*] when no --master is given), and a master
    set in code would override it; so the config's master applies only when spark-submit's
    is its default.
    """
    from pyspark import SparkConf
    from pyspark.context import SparkContext

    if "PYSPARK_GATEWAY_PORT" not in os.environ:
        return None  # plain `python`: no spark-submit, the config decides
    SparkContext._ensure_initialized()  # attaches to spark-submit's JVM
    master = SparkConf().get("spark.master", None)
    return None if master in (None, "local[*]") else master


def spark_builder(config: Config):
    """A SparkSession builder from the config: ``--master`` given to spark-submit wins over
    the config file's ``spark.master``."""
    from pyspark.sql import SparkSession

    builder = SparkSession.builder.appName(config.spark.app_name)
    if submitted_master() is None:
        builder = builder.config("spark.master", config.spark.master)
    builder = (builder
               .config("spark.sql.execution.arrow.pyspark.enabled", "true")
               .config("spark.sql.session.timeZone", "UTC")
               .config("spark.ui.showConsoleProgress", "false")
               # Dataset rows carry 150 KB crops and the original images: Spark's default of
               # 4,096 rows per vectorized-reader batch asks for gigabytes of contiguous heap
               # and fails with OutOfMemoryError on a few thousand images.
               .config("spark.sql.parquet.columnarReaderBatchSize", "64"))
    for key, value in config.spark.conf.items():
        builder = builder.config(key, str(value))
    return builder


def _worker_python(_rows):
    yield (f"{sys.executable} (Python {sys.version.split()[0]}, prefix {sys.prefix}; "
           f"pyarrow_hotfix active: {wbc_spark.hotfix_active()})")


def executor_python(spark) -> str:
    """Which Python the executors' workers run, asked of one of them with one tiny task: on a
    cluster, where it and the driver's can differ (a shipped environment, PYSPARK_PYTHON)."""
    return spark.sparkContext.parallelize([0], 1).mapPartitions(_worker_python).first()


def one_line(exc: BaseException) -> str:
    """The failure in one line. An error from the JVM (Py4J) is reported by its root cause,
    which is where Spark names the file (``file:/.../part-0.parquet is not a Parquet file``)."""
    java = getattr(exc, "java_exception", None)
    if java is not None:
        try:
            while java.getCause() is not None:
                java = java.getCause()
            text = str(java.toString())
        except Exception:  # the gateway is gone: fall back to Python's message
            text = str(exc)
    else:
        text = f"{type(exc).__name__}: {exc}"
    raised = _python_worker_error(text)
    if raised:
        return raised
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[0] if lines else type(exc).__name__


# The line a Python traceback ends with: "SomeError: message" (unindented).
_RAISED = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Exit)(: |$)")


def _python_worker_error(text: str) -> str | None:
    """What a Python worker raised, where ``text`` carries its traceback (Spark passes the
    worker's traceback up as a PythonException): the traceback's last "SomeError: message"
    line, before the JVM's frames. None where there is no traceback."""
    _, found, rest = text.partition("Traceback (most recent call last):")
    if not found:
        return None
    raised = None
    for line in rest.splitlines():
        if line.startswith("\tat "):  # the JVM's stack: the worker's traceback is over
            break
        if _RAISED.match(line):
            raised = line.strip()
    return raised


def run_job(name: str, doc: str, body, argv: list[str] | None = None) -> int:
    """The shared shape of every job: flags, config, Spark session, body, one-line errors.

    ``body(spark, config)`` returns the lines to print for the user. Any failure prints one
    line naming the problem (the traceback goes to the log at DEBUG) and exits 1.
    """
    import argparse

    parser = argparse.ArgumentParser(prog=f"{name}.py", description=doc.splitlines()[0])
    parser.add_argument("--config", default="conf/local.yaml")
    parser.add_argument("overrides", nargs="*", help="section.key=value, e.g. train.epochs=3")
    args = parser.parse_args(argv)
    setup_logging()
    try:
        config = load_config(args.config, args.overrides)
        log_config(config)
        spark = spark_builder(config).getOrCreate()
        master = spark.sparkContext.master
        logging.getLogger("wbc_spark").info("Spark master: %s", master)
        if not master.startswith("local"):
            logging.getLogger("wbc_spark").info("executors' Python: %s", executor_python(spark))
        try:
            start = time.perf_counter()
            lines = body(spark, config)
            # The job's own time, after the session is up: what benchmarks compare.
            lines.append(f"{name}: job body took {time.perf_counter() - start:.1f} s")
        finally:
            spark.stop()
    except Exception as exc:
        logging.getLogger("wbc_spark").debug("failed", exc_info=True)
        print(f"{name} failed: {one_line(exc)}", file=sys.stderr)
        return 1
    for line in lines:
        print(line)
    return 0
