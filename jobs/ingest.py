"""Ingest an image lake into the wbc_spark Parquet dataset.

    spark-submit jobs/ingest.py --config conf/local.yaml [section.key=value ...]
"""

import argparse
import logging
import sys

from wbc_spark.config import load_config
from wbc_spark.ingest import run_ingest
from wbc_spark.session import log_config, setup_logging, spark_builder


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="conf/local.yaml")
    parser.add_argument("overrides", nargs="*", help="section.key=value, e.g. data.lake=/x")
    args = parser.parse_args(argv)
    setup_logging()
    config = load_config(args.config, args.overrides)
    log_config(config)
    spark = spark_builder(config).getOrCreate()
    try:
        summary = run_ingest(spark, config)
    finally:
        spark.stop()
    print(summary.line())
    print(f"dataset: {config.data.dataset}  quarantine: {config.data.quarantine}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Exception as exc:  # one clear line for the user; the traceback is in the log
        logging.getLogger("wbc_spark").debug("failed", exc_info=True)
        print(f"ingest failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        sys.exit(1)
