"""Ingest an image lake into the wbc_spark Parquet dataset.

    spark-submit jobs/ingest.py --config conf/local.yaml [section.key=value ...]
"""

import sys

from wbc_spark.ingest import run_ingest
from wbc_spark.session import run_job


def ingest(spark, config):
    summary = run_ingest(spark, config)
    return [summary.line(),
            f"dataset: {config.data.dataset}  quarantine: {config.data.quarantine}"]


if __name__ == "__main__":
    sys.exit(run_job("ingest", __doc__, ingest))
