#!/usr/bin/env bash
# spark-submit wrapper: deploy/submit.sh JOB [--master URL] [--config FILE] [key=value ...]
#   JOB is ingest, train_distributed, score or report. Uses the project's virtual environment for the
#   driver and the Python workers, ships the wbc_spark package to executors as a zip, and
#   keeps Spark's own logging at WARN.
# Environment: WBC_SPARK_VENV (default: .venv in the repo), SPARK_MASTER (default: from the
# config file), SPARK_SUBMIT_OPTS_EXTRA (more spark-submit options), WBC_SPARK_ENV_ARCHIVE (a
# packed environment, `make pack`: shipped to the executors with --archives, whose Python
# workers then run ./env/bin/python from it; the driver keeps WBC_SPARK_VENV's Python).
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${WBC_SPARK_VENV:-$repo/.venv}"
job="${1:?usage: deploy/submit.sh ingest|train_distributed|score|report [options]}"; shift
[ -f "$repo/jobs/$job.py" ] || { echo "submit: no job '$job' (choose ingest, train_distributed, score, report)" >&2; exit 2; }
export PYSPARK_DRIVER_PYTHON="${PYSPARK_DRIVER_PYTHON:-$venv/bin/python}"
ship=()
if [ -n "${WBC_SPARK_ENV_ARCHIVE:-}" ]; then
  [ -f "$WBC_SPARK_ENV_ARCHIVE" ] || { echo "submit: WBC_SPARK_ENV_ARCHIVE=$WBC_SPARK_ENV_ARCHIVE: no such file (build it with make pack)" >&2; exit 2; }
  # Spark's documented way: unpacked as ./env in each executor's working directory.
  ship=(--archives "$WBC_SPARK_ENV_ARCHIVE#env")
  export PYSPARK_PYTHON=./env/bin/python
else
  export PYSPARK_PYTHON="${PYSPARK_PYTHON:-$venv/bin/python}"
fi
master=()
args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --master) master=(--master "$2"); shift 2 ;;
    *) args+=("$1"); shift ;;
  esac
done
if [ ${#master[@]} -eq 0 ] && [ -n "${SPARK_MASTER:-}" ]; then master=(--master "$SPARK_MASTER"); fi
# Executors on other machines need the library: ship it as a zip (rebuilt each time, small).
mkdir -p "$repo/runs"
zip_path="$repo/runs/wbc_spark.zip"
(cd "$repo" && "$PYSPARK_DRIVER_PYTHON" - "$zip_path" <<'PY'
import os, sys, zipfile, pathlib
# A temporary name of this process's own: jobs submitted at once each build their zip and
# rename it into place (same code, same zip; the rename is atomic).
tmp = pathlib.Path(f"{sys.argv[1]}.{os.getpid()}.tmp")
with zipfile.ZipFile(tmp, "w") as z:
    for p in sorted(pathlib.Path("wbc_spark").rglob("*.py")):
        z.write(p)
tmp.replace(sys.argv[1])
PY
)
cd "$repo"
exec "$venv/bin/spark-submit" "${master[@]}" \
  --driver-java-options "-Dlog4j2.configurationFile=file:$repo/conf/log4j2.properties" \
  --conf "spark.executor.extraJavaOptions=-Dlog4j2.configurationFile=file:$repo/conf/log4j2.properties" \
  --py-files "$zip_path" "${ship[@]}" ${SPARK_SUBMIT_OPTS_EXTRA:-} \
  "jobs/$job.py" "${args[@]}"
