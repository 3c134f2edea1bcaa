"""The packed environment on a standalone cluster whose daemons cannot see the project's Python.

`make pack` builds a fresh virtual environment the way a user installs the package
(`pip install -r requirements/lock.txt`, then `pip install .`, then `pip check`) and packs it
with venv-pack. Here that environment runs the driver, and its archive, shipped with
`--archives`, runs the executors' Python workers, on two one-core workers started with a clean
environment and (as root) with `.venv/` and the unpacked environment covered by empty folders:
ingest, training with `train.local_mode=false` (TorchDistributor's processes as barrier tasks on
the executors) and scoring.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pandas as pd
import pytest
from conftest import CLASSES, REPO, local_cluster, smear

pytestmark = [pytest.mark.slow, pytest.mark.spark]
PORT = 7178
PACK_VENV = REPO / "runs" / "pack" / "venv"
ARCHIVE = REPO / "runs" / "wbc_env.tar.gz"


@pytest.fixture(scope="module")
def packed():
    """`make pack` (a no-op when the archive is newer than the package's sources)."""
    made = subprocess.run(["make", "-s", "pack"], cwd=REPO, capture_output=True, text=True,
                          timeout=1800)
    assert made.returncode == 0, made.stdout[-3000:] + made.stderr[-3000:]
    assert ARCHIVE.is_file() and (PACK_VENV / "bin" / "python").exists()
    return ARCHIVE


@pytest.fixture(scope="module")
def isolated_cluster(packed, tmp_path_factory):
    state = tmp_path_factory.mktemp("isolated_cluster")
    with local_cluster(state, PORT, WBC_SPARK_VENV=str(PACK_VENV), ISOLATE="1",
                       HIDE=f"{REPO / '.venv'} {PACK_VENV}") as master:
        yield master, state
    # Each executor unpacked the archive (about 2 GB) for each application: free the disk.
    for folder in [*state.glob("work*"), state / "spark"]:
        shutil.rmtree(folder, ignore_errors=True)


def submit(job: str, *args: str, master: str, timeout: int = 1200):
    """deploy/submit.sh with the packed environment: the driver in the pip-installed venv, the
    executors in the shipped archive."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYSPARK_PYTHON", "PYSPARK_DRIVER_PYTHON", "VIRTUAL_ENV", "PYTHONPATH")}
    env.update(WBC_SPARK_VENV=str(PACK_VENV), WBC_SPARK_ENV_ARCHIVE=str(ARCHIVE))
    return subprocess.run(["bash", str(REPO / "deploy" / "submit.sh"), job, "--master", master,
                           "--config", "conf/cluster.yaml", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_the_daemons_cannot_see_the_virtual_environments(isolated_cluster):
    _, state = isolated_cluster
    for name in ("master", "worker1", "worker2"):
        pid = (state / f"{name}.pid").read_text().strip()
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        assert not any(v.startswith((b"PYSPARK_PYTHON=", b"VIRTUAL_ENV=")) for v in environ)
        if os.geteuid() == 0:
            mounts = Path(f"/proc/{pid}/mountinfo").read_text()
            assert f" {REPO / '.venv'} " in mounts and f" {PACK_VENV} " in mounts, name


def test_ingest_cluster_training_and_scoring_in_the_packed_environment(
        isolated_cluster, fake_weights, tmp_path):
    master, state = isolated_cluster
    lake = tmp_path / "lake"
    for c, cls in enumerate(CLASSES):
        (lake / cls).mkdir(parents=True)
        for i in range(8):
            smear(seed=50 * c + i, radius=20 + 3 * c, hue_shift=8 * c).save(lake / cls / f"{i}.jpg")
    (lake / "Basophil" / "bad.jpg").write_text("not an image")
    paths = [f"data.dataset={tmp_path / 'ds'}", f"data.quarantine={tmp_path / 'q'}"]

    ingest = submit("ingest", "data.source=folder", f"data.lake={lake}", *paths, master=master)
    assert ingest.returncode == 0, ingest.stdout[-3000:] + ingest.stderr[-3000:]
    assert "read 41, written 40, quarantined 1" in ingest.stdout
    # The executors' Python is the archive's, unpacked in their working directory as ./env.
    log = ingest.stdout + ingest.stderr
    assert "executors' Python: " in log
    line = next(ln for ln in log.splitlines() if "executors' Python: " in ln)
    assert "/env/bin/python" in line and ".venv" not in line and "pyarrow_hotfix active: True" in line

    model = tmp_path / "model"
    train = submit("train_distributed", *paths, f"model.weights_dir={fake_weights}",
                   f"train.output={model}", f"train.petastorm_cache={tmp_path / 'cache'}",
                   "train.views=1", "train.epochs=2", "train.num_processes=2", master=master)
    assert train.returncode == 0, train.stdout[-3000:] + train.stderr[-5000:]
    assert (model / "model.pt").is_file() and (model / "evaluation.json").is_file()
    # TorchDistributor ran its two processes as barrier tasks on the executors, in the archive's
    # Python, not on the driver.
    line = next(ln for ln in train.stdout.splitlines() if ln.startswith("trained by"))
    assert "2 process(es) as barrier tasks on the executors" in line and "/env" in line, line

    score = submit("score", f"score.input={lake}", f"score.model={model / 'model.pt'}",
                   f"score.results={tmp_path / 'res'}", master=master)
    assert score.returncode == 0, score.stdout[-3000:] + score.stderr[-3000:]
    assert "scored 41 new images (1 with errors)" in score.stdout
    res = pd.read_parquet(tmp_path / "res")
    assert len(res) == 41 and res.predicted_class.notna().sum() == 40

    # Every application ran on both workers, each with the archive unpacked beside it.
    for worker in ("work1", "work2"):
        apps = sorted((state / worker).glob("app-*"))
        assert len(apps) == 3, (worker, apps)
        for app in apps:
            assert list(app.glob("*/env/bin/python")), app
