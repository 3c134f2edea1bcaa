"""Training in local mode against cluster mode on the local standalone cluster.

    .venv/bin/python benchmarks/cluster_training.py [--views 4] [--epochs 10] [--port 7187]

Ingests KRD-WBC into runs/bench_cluster/ds (once), then trains the same recipe twice: with
conf/local.yaml (TorchDistributor local_mode: two processes on the driver, local[*]) and with
conf/cluster.yaml on `deploy/local_cluster.sh` (two one-core workers; train.local_mode=false:
two barrier tasks on the executors, the dataset's petastorm cache on the shared disk). Prints
each run's frozen pass (augmented views through the frozen layers), mean epoch time of the
trained layers, the job's wall time and its test macro-F1.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "runs" / "bench_cluster"


def submit(job: str, *args: str, master: str | None = None, env=None) -> str:
    cmd = ["bash", str(REPO / "deploy" / "submit.sh"), job, *(["--master", master] if master
                                                             else []), *args]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        sys.exit(f"{job} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc.stdout


def train(name: str, config: str, views: int, epochs: int, master: str | None) -> dict:
    model = OUT / f"model_{name}"
    start = time.perf_counter()
    out = submit("train_distributed", "--config", config, f"data.dataset={OUT / 'ds'}",
                 f"train.output={model}", f"train.petastorm_cache={OUT / f'cache_{name}'}",
                 f"train.views={views}", f"train.epochs={epochs}", "train.num_processes=2",
                 master=master)
    wall = time.perf_counter() - start
    line = next(ln for ln in out.splitlines() if ln.startswith("trained by"))
    run = json.loads((model / "evaluation.json").read_text())
    return {"mode": name, "where": line.split(" (Python")[0],
            "frozen_pass_s": run["run"]["frozen_pass_seconds"],
            "epoch_s": sum(run["run"]["epoch_seconds"]) / len(run["run"]["epoch_seconds"]),
            "job_wall_s": wall, "test_macro_f1": run["test"]["macro_f1"],
            "job_body_s": float(re.search(r"job body took ([\d.]+) s", out).group(1))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--views", type=int, default=4)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--port", type=int, default=7187)
    a = ap.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    if not (OUT / "ds").exists():
        submit("ingest", f"data.dataset={OUT / 'ds'}", f"data.quarantine={OUT / 'q'}")
    rows = [train("local", "conf/local.yaml", a.views, a.epochs, None)]
    env = dict(os.environ, WBC_SPARK_CLUSTER_DIR=str(OUT / "cluster"),
               SPARK_MASTER_PORT=str(a.port))
    script = str(REPO / "deploy" / "local_cluster.sh")
    subprocess.run(["bash", script, "start"], env=env, check=True)
    try:
        rows.append(train("cluster", "conf/cluster.yaml", a.views, a.epochs,
                          f"spark://127.0.0.1:{a.port}"))
    finally:
        subprocess.run(["bash", script, "stop"], env=env)
    print(f"KRD-WBC, train.views={a.views}, train.epochs={a.epochs}, 2 processes")
    print(f"{'mode':8} {'frozen pass s':>13} {'epoch s':>8} {'job body s':>10} "
          f"{'wall s':>7} {'test macro-F1':>13}  where")
    for r in rows:
        print(f"{r['mode']:8} {r['frozen_pass_s']:13.1f} {r['epoch_s']:8.2f} "
              f"{r['job_body_s']:10.1f} {r['job_wall_s']:7.1f} {r['test_macro_f1']:13.3f}  "
              f"{r['where']}")


if __name__ == "__main__":
    main()
