#!/usr/bin/env bash
# The main job, end to end on this machine: ingest KRD-WBC, fine-tune GoogLeNet with
# TorchDistributor, score a folder of images, print the scores and where the tables are.
# Extra arguments (key=value) go to every job, e.g. `bash deploy/demo.sh train.epochs=4`.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
conf="${WBC_SPARK_CONF:-conf/local.yaml}"
start=$(date +%s)
echo "== 1/3 ingest KRD-WBC -> runs/dataset"
deploy/submit.sh ingest --config "$conf" "$@"
echo "== 2/3 distributed fine-tuning (TorchDistributor) -> runs/model"
deploy/submit.sh train_distributed --config "$conf" "$@"
lake="${WBC_SPARK_SCORE_INPUT:-$("$repo/.venv/bin/python" -c 'from wbc_spark.sources.krd_wbc import default_root; print(default_root() / "Dataset" / "image")')}"
echo "== 3/3 score the folder $lake -> runs/results"
deploy/submit.sh score --config "$conf" score.input="$lake" "$@"
echo "== done in $(( $(date +%s) - start )) s"
echo "held-out test fold scores: runs/model/evaluation.json, runs/model/confusion.txt, runs/model/confusion.png"
echo "results tables: runs/results (per image), runs/results_per_class (per class)"
