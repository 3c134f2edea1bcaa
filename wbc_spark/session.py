"""Helpers the jobs use to start Spark and logging (library code never starts Spark itself)."""

from __future__ import annotations

import json
import logging
import os
import sys

from wbc_spark.config import Config


def setup_logging(level: str = "INFO") -> None:
    logging.basicConfig(level=level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("py4j", "petastorm", "pyspark"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def log_config(config: Config) -> None:
    logging.getLogger("wbc_spark").info("resolved config: %s", json.dumps(config.to_dict()))


def spark_builder(config: Config):
    """A SparkSession builder from the config: master only when spark-submit gave none."""
    from pyspark.sql import SparkSession

    builder = SparkSession.builder.appName(config.spark.app_name)
    # spark-submit --master wins over the file; the file's master applies to plain python.
    if "spark.master" not in os.environ.get("PYSPARK_SUBMIT_ARGS", "") and \
            not os.environ.get("SPARK_MASTER_FROM_SUBMIT"):
        builder = builder.config("spark.master", config.spark.master)
    builder = (builder
               .config("spark.sql.execution.arrow.pyspark.enabled", "true")
               .config("spark.sql.session.timeZone", "UTC")
               .config("spark.ui.showConsoleProgress", "false"))
    for key, value in config.spark.conf.items():
        builder = builder.config(key, str(value))
    return builder
