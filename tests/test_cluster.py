"""Ingest and scoring on a Spark standalone cluster (master + two workers on 127.0.0.1)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from conftest import REPO, smear, spark_submit

pytestmark = [pytest.mark.slow, pytest.mark.spark]
PORT = 7177


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    state = tmp_path_factory.mktemp("cluster")
    env = dict(os.environ, WBC_SPARK_CLUSTER_DIR=str(state), SPARK_MASTER_PORT=str(PORT),
               WBC_SPARK_VENV=str(Path(sys.executable).parents[1]),
               PYSPARK_PYTHON=sys.executable)
    script = str(REPO / "deploy" / "local_cluster.sh")
    start = subprocess.run(["bash", script, "start"], env=env, capture_output=True, text=True,
                           timeout=180)
    try:
        assert start.returncode == 0, start.stdout + start.stderr
        yield f"spark://127.0.0.1:{PORT}", state
    finally:
        subprocess.run(["bash", script, "stop"], env=env, capture_output=True, timeout=120)


def test_ingest_and_score_on_two_executors(cluster, tmp_path, tiny_artifact):
    cluster, state = cluster
    lake = tmp_path / "lake"
    for cls in ("Neutrophil", "Lymphocyte"):
        (lake / cls).mkdir(parents=True)
        for i in range(4):
            smear(seed=hash((cls, i)) % 997).save(lake / cls / f"{i}.jpg")
    (lake / "Lymphocyte" / "bad.jpg").write_text("nope")
    ingest = spark_submit("ingest", "--config", "conf/cluster.yaml", "data.source=folder",
                          f"data.lake={lake}", f"data.dataset={tmp_path / 'ds'}",
                          f"data.quarantine={tmp_path / 'q'}", master=cluster)
    out = ingest.stdout
    assert ingest.returncode == 0, out[-3000:]
    assert "read 9, written 8, quarantined 1" in out
    score = spark_submit("score", "--config", "conf/cluster.yaml", f"score.input={tmp_path / 'ds'}",
                         f"score.model={tiny_artifact}", f"score.results={tmp_path / 'res'}",
                         master=cluster)
    assert score.returncode == 0, score.stdout[-3000:]
    assert "scored 8 new images (0 with errors)" in score.stdout
    res = pd.read_parquet(tmp_path / "res")
    assert len(res) == 8 and res.predicted_class.notna().all()
    # The work really ran on both workers' executors: each holds the two applications.
    for worker in ("work1", "work2"):
        apps = list((state / worker).glob("app-*"))
        assert len(apps) == 2, (worker, apps)
