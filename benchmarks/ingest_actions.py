"""Where one ingest run's time goes in Spark: each action the job calls, and each stage.

Runs ``wbc_spark.ingest.run_ingest`` once on a folder lake into a new scratch table, timing
every Spark action (``count``, ``toPandas``, ``collect``, Parquet writes) with the line of our
code that called it, then lists the run's stages from Spark's REST API (tasks, wall time,
executor time). A run's fixed cost is the actions and stages that do not grow with the lake.

    .venv/bin/python benchmarks/ingest_actions.py --lake runs/bench_lake
    .venv/bin/python benchmarks/ingest_actions.py --lake ../shared/data/PBC-dev/labels.csv
"""

from __future__ import annotations

import argparse
import functools
import json
import shutil
import sys
import tempfile
import time
import traceback
import urllib.request
from datetime import datetime
from pathlib import Path

from pyspark.sql import DataFrame, DataFrameWriter

from wbc_spark import ingest
from wbc_spark.config import load_config
from wbc_spark.session import spark_builder

REPO = Path(__file__).resolve().parents[1]
ACTIONS = {DataFrame: ("count", "toPandas", "collect", "toLocalIterator"),
           DataFrameWriter: ("parquet",)}


def timed(cls, name: str, out: list[tuple[str, float, str]]) -> None:
    """Wrap ``cls.name`` so each call appends (name, seconds, calling line of wbc_spark)."""
    original = getattr(cls, name)

    @functools.wraps(original)
    def call(*args, **kwargs):
        start = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            ours = [f for f in traceback.extract_stack()[:-1] if "/wbc_spark/" in f.filename]
            where = f"{Path(ours[-1].filename).name}:{ours[-1].lineno}" if ours else "?"
            out.append((name, time.perf_counter() - start, where))

    setattr(cls, name, call)


def _seconds(start: str | None, end: str | None) -> float | None:
    if not start or not end:
        return None
    def parse(text: str) -> datetime:
        return datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fGMT")

    return (parse(end) - parse(start)).total_seconds()


def stages(spark) -> list[dict]:
    """The application's stages as Spark's REST API lists them."""
    sc = spark.sparkContext
    url = f"{sc.uiWebUrl}/api/v1/applications/{sc.applicationId}/stages"
    with urllib.request.urlopen(url) as reply:
        return sorted(json.load(reply), key=lambda s: s["stageId"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lake", required=True, help="a folder of images (data.source=folder), "
                        "or a manifest .csv (data.source=manifest)")
    parser.add_argument("--min-seconds", type=float, default=0.5,
                        help="list stages whose wall time is at least this")
    args = parser.parse_args()
    calls: list[tuple[str, float, str]] = []
    for cls, names in ACTIONS.items():
        for name in names:
            timed(cls, name, calls)
    scratch = Path(tempfile.mkdtemp(prefix="ingest_actions_"))
    try:
        cfg = load_config(REPO / "conf" / "local.yaml", [
            f"data.source={'manifest' if args.lake.endswith('.csv') else 'folder'}",
            f"data.lake={Path(args.lake).resolve()}",
            f"data.dataset={scratch / 'dataset'}", f"data.quarantine={scratch / 'quarantine'}"])
        spark = (spark_builder(cfg).config("spark.ui.enabled", "true").getOrCreate())
        spark.sparkContext.setLogLevel("ERROR")
        start = time.perf_counter()
        summary = ingest.run_ingest(spark, cfg)
        total = time.perf_counter() - start
        print(summary.line())
        print(f"run_ingest: {total:.1f} s; Spark actions {sum(c[1] for c in calls):.1f} s:")
        for name, seconds, where in calls:
            print(f"  {name:<16} {seconds:6.2f} s  called at {where}")
        listed = stages(spark)
        done = [s for s in listed if s["status"] == "COMPLETE"]
        print(f"stages: {len(done)} run, {len(listed) - len(done)} skipped; those of "
              f">= {args.min_seconds} s:")
        for s in done:
            wall = _seconds(s.get("submissionTime"), s.get("completionTime")) or 0.0
            if wall >= args.min_seconds:
                print(f"  stage {s['stageId']:3d}  {s['numTasks']:4d} tasks  {wall:6.2f} s wall  "
                      f"{s['executorRunTime'] / 1000:6.2f} s in tasks  {s['name'][:40]}")
        spark.stop()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
