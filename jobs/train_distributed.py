"""Fine-tune ImageNet GoogLeNet on the ingested dataset with TorchDistributor.

    spark-submit jobs/train_distributed.py --config conf/local.yaml [section.key=value ...]
"""

import sys

from wbc_spark.session import run_job
from wbc_spark.training_job import run_training


def train(spark, config):
    summary = run_training(spark, config)
    out = config.train.output
    run = summary["run"]
    where = "on the driver" if run["local_mode"] else "as barrier tasks on the executors"
    epochs = run["epoch_seconds"]
    return [f"trained by {run['processes']} process(es) {where} (Python {run['python']}): "
            f"frozen pass {run['frozen_pass_seconds']:.1f} s, epochs "
            f"{sum(epochs) / max(1, len(epochs)):.2f} s each",
            f"held-out test fold {config.train.test_fold} of {config.train.folds}:",
            summary["report_text"],
            f"model: {out}/model.pt (model_id {summary['model_id']}), evaluation: "
            f"{out}/evaluation.json, {out}/confusion.png"]


if __name__ == "__main__":
    sys.exit(run_job("train_distributed", __doc__, train))
