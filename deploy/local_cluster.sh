#!/usr/bin/env bash
# A Spark standalone cluster on this machine: one master and two one-core workers, all on
# 127.0.0.1, from the pyspark package alone.
#   deploy/local_cluster.sh start|stop|status
# Then submit with: deploy/submit.sh JOB --master spark://127.0.0.1:7077 --config conf/cluster.yaml
# Environment: WBC_SPARK_CLUSTER_DIR (pids and logs; default runs/cluster), SPARK_MASTER_PORT
# (7077), WORKERS (2), WORKER_CORES (1), WORKER_MEMORY (2g).
# ISOLATE=1 starts the daemons as a cluster node without the project's Python would be: from a
# copy of the Spark installation (in $WBC_SPARK_CLUSTER_DIR/spark), with a clean environment
# (env -i: no PYSPARK_PYTHON, no virtual environment on PATH), and, where unshare(1) may make a
# mount namespace (root), with the folders in HIDE (default: the repo's .venv) mounted over by
# an empty folder. Jobs must then bring their Python: deploy/submit.sh with
# WBC_SPARK_ENV_ARCHIVE (make pack).
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${WBC_SPARK_VENV:-$repo/.venv}"
dir="${WBC_SPARK_CLUSTER_DIR:-$repo/runs/cluster}"
port="${SPARK_MASTER_PORT:-7077}"
workers="${WORKERS:-2}"
export PYSPARK_PYTHON="${PYSPARK_PYTHON:-$venv/bin/python}"
export SPARK_LOCAL_IP=127.0.0.1
spark_class="$venv/bin/spark-class"
mkdir -p "$dir"
launch=()
if [ -n "${ISOLATE:-}" ]; then
  spark_home="$dir/spark"
  if [ ! -x "$spark_home/bin/spark-class" ]; then
    src="$("$venv/bin/python" -c 'import os, pyspark; print(os.path.dirname(pyspark.__file__))')"
    rm -rf "$spark_home.tmp" && cp -r "$src" "$spark_home.tmp" && mv "$spark_home.tmp" "$spark_home"
  fi
  spark_class="$spark_home/bin/spark-class"
  java_home="${JAVA_HOME:-$(dirname "$(dirname "$(readlink -f "$(command -v java)")")")}"
  launch=(env -i "PATH=/usr/local/bin:/usr/bin:/bin" "HOME=${HOME:-/root}" "JAVA_HOME=$java_home"
          "SPARK_HOME=$spark_home" "SPARK_LOCAL_IP=127.0.0.1")
  hide="${HIDE:-$repo/.venv}"
  if [ "$(id -u)" = 0 ] && unshare -m true 2>/dev/null; then
    mkdir -p "$dir/empty"
    # In a private mount namespace, cover each hidden folder with an empty one, then run.
    launch+=("HIDE_PATHS=$hide" "EMPTY=$dir/empty" unshare -m bash -c
             'for p in $HIDE_PATHS; do [ -e "$p" ] && mount --bind "$EMPTY" "$p"; done; exec "$@"' _)
  else
    echo "local_cluster: not root or no unshare: $hide stays visible to the daemons" >&2
  fi
fi

wait_for() {  # wait_for FILE PATTERN SECONDS
  for _ in $(seq 1 "$3"); do grep -q "$2" "$1" 2>/dev/null && return 0; sleep 1; done
  echo "local_cluster: '$2' not seen in $1 after $3 s" >&2; tail -5 "$1" >&2; return 1
}

start() {
  if [ -f "$dir/master.pid" ] && kill -0 "$(cat "$dir/master.pid")" 2>/dev/null; then
    echo "local_cluster: already running (spark://127.0.0.1:$port)"; return 0
  fi
  setsid "${launch[@]}" "$spark_class" org.apache.spark.deploy.master.Master --host 127.0.0.1 --port "$port" \
    --webui-port 8080 >"$dir/master.log" 2>&1 < /dev/null &
  echo $! >"$dir/master.pid"
  wait_for "$dir/master.log" "I have been elected leader" 60
  for i in $(seq 1 "$workers"); do
    setsid "${launch[@]}" "$spark_class" org.apache.spark.deploy.worker.Worker "spark://127.0.0.1:$port" \
      --host 127.0.0.1 --cores "${WORKER_CORES:-1}" --memory "${WORKER_MEMORY:-2g}" \
      --webui-port $((8080 + i)) --work-dir "$dir/work$i" >"$dir/worker$i.log" 2>&1 < /dev/null &
    echo $! >"$dir/worker$i.pid"
  done
  for i in $(seq 1 "$workers"); do wait_for "$dir/worker$i.log" "Successfully registered with master" 60; done
  echo "local_cluster: master spark://127.0.0.1:$port with $workers workers (logs in $dir)"
}

stop() {
  for f in "$dir"/worker*.pid "$dir"/master.pid; do
    [ -f "$f" ] || continue
    pid="$(cat "$f")"
    # setsid made each daemon a process-group leader: stop the group (spark-class and its JVM).
    kill -- "-$pid" 2>/dev/null || kill "$pid" 2>/dev/null || true
    for _ in $(seq 1 20); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
    kill -9 -- "-$pid" 2>/dev/null || true
    rm -f "$f"
  done
  echo "local_cluster: stopped"
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) for f in "$dir"/*.pid; do [ -f "$f" ] && { kill -0 "$(cat "$f")" 2>/dev/null && echo "$(basename "$f" .pid) running" || echo "$(basename "$f" .pid) dead"; }; done ;;
  *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
