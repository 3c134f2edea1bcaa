"""Score an image lake (or an ingested dataset) with a wbc_spark model artifact.

    spark-submit jobs/score.py --config conf/local.yaml score.input=PATH [section.key=value ...]

Incremental: images this model already scored are skipped, so it can run from cron.
"""

import argparse
import logging
import sys

from wbc_spark.config import load_config
from wbc_spark.score import run_scoring
from wbc_spark.session import log_config, setup_logging, spark_builder


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="conf/local.yaml")
    parser.add_argument("overrides", nargs="*", help="section.key=value, e.g. score.input=/x")
    args = parser.parse_args(argv)
    setup_logging()
    config = load_config(args.config, args.overrides)
    log_config(config)
    spark = spark_builder(config).getOrCreate()
    try:
        result = run_scoring(spark, config)
    finally:
        spark.stop()
    print(f"score: model {result['model_id']}, scored {result['scored']} new images "
          f"({result['errors']} with errors), run {result['run_id']}")
    summary = result["summary"]
    overall = summary[summary["slide"].isna()]
    if len(overall):
        print("per-class results over every image this model scored:")
        for r in overall.to_dict("records"):
            print(f"  {r['class']:<11} {r['count']:>6}  {r['fraction']:6.1%}  "
                  f"[{r['ci_low']:.1%}, {r['ci_high']:.1%}]  ({r['errors']} unreadable)")
    print(f"tables: {result['results']} (per image), {result['per_class']} (per class)")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Exception as exc:
        logging.getLogger("wbc_spark").debug("failed", exc_info=True)
        print(f"score failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        sys.exit(1)
