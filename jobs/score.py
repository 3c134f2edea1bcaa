"""Score an image lake (or an ingested dataset) with a wbc_spark model artifact.

    spark-submit jobs/score.py --config conf/local.yaml score.input=PATH [section.key=value ...]

Incremental: images this model already scored are skipped, so it can run from cron.
"""

import sys

from wbc_spark.score import run_scoring
from wbc_spark.session import run_job


def score(spark, config):
    result = run_scoring(spark, config)
    lines = [f"score: model {result['model_id']}, scored {result['scored']} new images "
             f"({result['errors']} with errors), run {result['run_id']}"]
    summary = result["summary"]
    overall = summary[summary["slide"].isna()]
    if len(overall):
        lines.append("per-class results over every image this model scored:")
        for r in overall.to_dict("records"):
            lines.append(f"  {r['class']:<11} {r['count']:>6}  {r['fraction']:6.1%}  "
                         f"[{r['ci_low']:.1%}, {r['ci_high']:.1%}]  ({r['errors']} unreadable)")
    lines.append(f"tables: {result['results']} (per image), {result['per_class']} (per class)")
    return lines


if __name__ == "__main__":
    sys.exit(run_job("score", __doc__, score))
