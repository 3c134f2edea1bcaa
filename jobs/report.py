"""Write the per-slide HTML reports of a model's scoring results (after jobs/score.py).

    spark-submit jobs/report.py --config conf/local.yaml [report.output=DIR] [section.key=value ...]

Reads score.results and its per-class table for score.model's model; writes report.output/
index.html and one self-contained page per slide (wbc_spark/report.py).
"""

import sys

from wbc_spark.report import run_report
from wbc_spark.session import run_job


def report(spark, config):
    result = run_report(spark, config)
    lines = [f"report: model {result['model_id']}, {result['pages']} pages, "
             f"{result['cells_shown']} cells shown ({result['not_shown']} could not be shown)"]
    if result["alarms"]:
        lines.append(f"SHIFT ALARM on {result['alarms']} of the pages: see the index")
    lines.append(f"index: {result['index']}")
    return lines


if __name__ == "__main__":
    sys.exit(run_job("report", __doc__, report))
