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
             f"({result['errors']} with errors), run {result['run_id']}",
             f"review: {result['flagged']} of them flagged for review (needs_review)"]
    score_, alarm = result["run_shift"]
    if alarm:
        lines.append(f"SHIFT ALARM: this run's images: {score_:.0%} lie beyond the range of the "
                     "labs the model was trained on; check the results before use")
    for a in result["alarms"]:
        lines.append(f"SHIFT ALARM: slide {a['slide'] or '(every image)'}: "
                     f"{a['shift_score']:.0%} of {a['shift_cells']} cells beyond the "
                     "training labs' range")
    summary = result["summary"]
    overall = summary[summary["slide"].isna()]
    if len(overall):
        first = overall.iloc[0]
        lines.append(f"differential over every image this model scored ({first['counted_total']}"
                     f" cells counted, {first['excluded']} without a cell found, "
                     f"{first['errors']} unreadable; corrected with the confusion of "
                     f"{first['confusion_lab']}): corrected share [95% interval] | raw top "
                     "predictions")
        for r in overall.to_dict("records"):
            lines.append(f"  {r['class']:<11} {r['corrected_fraction']:6.1%} "
                         f"[{r['corrected_low']:.1%}, {r['corrected_high']:.1%}] | "
                         f"{r['count']:>6}  {r['fraction']:6.1%}  ({r['flagged']} flagged)")
    lines.append(f"tables: {result['results']} (per image), {result['per_class']} (per class)")
    return lines


if __name__ == "__main__":
    sys.exit(run_job("score", __doc__, score))
