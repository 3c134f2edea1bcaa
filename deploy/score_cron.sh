#!/usr/bin/env bash
# Scheduled scoring: run from cron. Only images the model has not scored yet are classified,
# so each run picks up what arrived since the last one; an interrupted run is simply re-run.
# flock keeps two runs from overlapping. Example crontab line (every 30 minutes):
#   */30 * * * * cd /opt/wbc_spark && WBC_SPARK_SCORE_INPUT=/data/lake deploy/score_cron.sh >> runs/score_cron.log 2>&1
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
input="${WBC_SPARK_SCORE_INPUT:?set WBC_SPARK_SCORE_INPUT to the image lake to score}"
conf="${WBC_SPARK_CONF:-$repo/conf/local.yaml}"
mkdir -p "$repo/runs"
exec 9>"$repo/runs/.score.lock"
if ! flock -n 9; then echo "$(date -u +%FT%TZ) score_cron: previous run still going; skipping"; exit 0; fi
echo "$(date -u +%FT%TZ) score_cron: scoring $input"
"$repo/deploy/submit.sh" score --config "$conf" score.input="$input" "$@"
