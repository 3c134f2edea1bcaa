#!/usr/bin/env bash
# The main job, end to end on this machine: ingest two labs (KRD-WBC and PBC-dev) into one
# dataset, fine-tune GoogLeNet on both with TorchDistributor, score a folder of images (by
# default KRD-WBC's 600 images arranged into three slide folders), write the per-slide HTML
# reports, print the scores and where the tables and the reports are.
# Extra arguments (key=value) go to every job, e.g. `bash deploy/demo.sh train.epochs=4`.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
conf="${WBC_SPARK_CONF:-conf/local.yaml}"
py="$repo/.venv/bin/python"
start=$(date +%s)
krd="$("$py" -c 'from wbc_spark.sources.krd_wbc import default_root; print(default_root())')"
pbc="$("$py" -c 'from wbc_spark.config import shared_lake; print(shared_lake("PBC-dev", "WBC_SPARK_PBC_DEV"))')"
echo "== 1/5 ingest KRD-WBC ($krd) -> runs/dataset"
deploy/submit.sh ingest --config "$conf" data.source=krd_wbc data.lake="$krd" "$@"
echo "== 2/5 ingest PBC-dev ($pbc/labels.csv) -> runs/dataset"
deploy/submit.sh ingest --config "$conf" data.source=manifest data.lake="$pbc/labels.csv" \
  data.lab=PBC-dev "$@"
echo "== 3/5 distributed fine-tuning on both labs (TorchDistributor) -> runs/model"
deploy/submit.sh train_distributed --config "$conf" "$@"
lake="${WBC_SPARK_SCORE_INPUT:-}"
if [ -z "$lake" ]; then
  lake=runs/demo_slides
  "$py" deploy/demo_slides.py "$krd/Dataset/image" "$lake" --slides 3
fi
echo "== 4/5 score the folder $lake -> runs/results"
deploy/submit.sh score --config "$conf" score.input="$lake" "$@"
echo "== 5/5 per-slide reports -> runs/report"
deploy/submit.sh report --config "$conf" "$@"
echo "== done in $(( $(date +%s) - start )) s"
echo "held-out test fold scores (overall and per lab): runs/model/evaluation.json, runs/model/confusion.txt, runs/model/confusion.png"
echo "results tables: runs/results (per image), runs/results_per_class (per class: read corrected_fraction)"
echo "reports: open $repo/runs/report/index.html in a browser"
