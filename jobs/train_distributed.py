"""Fine-tune ImageNet GoogLeNet on the ingested dataset with TorchDistributor.

    spark-submit jobs/train_distributed.py --config conf/local.yaml [section.key=value ...]
"""

import argparse
import logging
import sys

from wbc_spark.config import load_config
from wbc_spark.session import log_config, setup_logging, spark_builder
from wbc_spark.training_job import run_training


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="conf/local.yaml")
    parser.add_argument("overrides", nargs="*", help="section.key=value, e.g. train.epochs=3")
    args = parser.parse_args(argv)
    setup_logging()
    config = load_config(args.config, args.overrides)
    log_config(config)
    spark = spark_builder(config).getOrCreate()
    try:
        summary = run_training(spark, config)
    finally:
        spark.stop()
    print(summary["report_text"])
    print(f"model: {config.train.output}/model.pt (model_id {summary['model_id']}), "
          f"evaluation: {config.train.output}/evaluation.json, confusion.png")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Exception as exc:
        logging.getLogger("wbc_spark").debug("failed", exc_info=True)
        print(f"train_distributed failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        sys.exit(1)
