"""Ingest and scoring on a Spark standalone cluster (master + two workers on 127.0.0.1)."""

from __future__ import annotations

import os
import re
import signal
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from conftest import local_cluster, smear, spark_submit, spark_submit_background

pytestmark = [pytest.mark.slow, pytest.mark.spark]
PORT = 7177


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    state = tmp_path_factory.mktemp("cluster")
    with local_cluster(state, PORT, WBC_SPARK_VENV=str(Path(sys.executable).parents[1]),
                       PYSPARK_PYTHON=sys.executable) as master:
        yield master, state


def test_ingest_and_score_on_two_executors(cluster, tmp_path, tiny_artifact):
    cluster, state = cluster
    lake = tmp_path / "lake"
    for c, cls in enumerate(("Neutrophil", "Lymphocyte")):
        (lake / cls).mkdir(parents=True)
        for i in range(4):
            # Fixed, distinct seeds: hash() changes with each process, and two equal seeds
            # would make two images one (the same bytes).
            smear(seed=10 * c + i).save(lake / cls / f"{i}.jpg")
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


def _processes(under: Path):
    """(pid, parent pid, command line) of the processes whose working directory is below
    ``under`` (the cluster's state folder: executors and their Python workers)."""
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            if not os.readlink(d / "cwd").startswith(str(under)):
                continue
            ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, ValueError, IndexError):
            continue
        yield int(d.name), ppid, cmd


def _wait_for(find, seconds: float):
    deadline = time.time() + seconds
    while time.time() < deadline:
        found = find()
        if found:
            return found
        time.sleep(0.1)
    return []


def _cpu_ticks(pid: int) -> int:
    """User plus system CPU time of ``pid`` in clock ticks (0 once it has exited)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0
    return int(fields[11]) + int(fields[12])


def _busy(pids: list[int], seconds: float = 0.3) -> list[int]:
    """Those of ``pids`` that used CPU over the next ``seconds``, busiest first: a Python
    worker doing so is inside a task (an idle, reused one waits on its socket)."""
    before = {pid: _cpu_ticks(pid) for pid in pids}
    time.sleep(seconds)
    used = {pid: _cpu_ticks(pid) - t for pid, t in before.items()}
    return sorted((pid for pid, u in used.items() if u > 0), key=used.get, reverse=True)


def _kill_one(find, seconds: float) -> int | None:
    """SIGKILL the first process of ``find()`` still there; polls until ``seconds`` pass."""
    deadline = time.time() + seconds
    while time.time() < deadline:
        for pid in find():
            try:
                os.kill(pid, signal.SIGKILL)
                return pid
            except ProcessLookupError:
                continue
        time.sleep(0.1)
    return None


def _kill_busy(find, seconds: float) -> int | None:
    """SIGKILL the busiest process of ``find()`` that is computing; None if none did within
    ``seconds``."""
    return _kill_one(lambda: _busy(find()), seconds)


def test_a_killed_python_worker_and_a_killed_executor_are_retried(cluster, tmp_path,
                                                                   tiny_artifact):
    """kill -9 of a Python worker while it scores, then of an executor: Spark retries their
    tasks, and the run commits every image exactly once."""
    master, state = cluster
    lake = tmp_path / "lake"
    n = 0
    for slide in ("s1", "s2"):
        (lake / slide).mkdir(parents=True)
        for i in range(60):
            smear(seed=5000 + 100 * len(slide) + i + (50 if slide == "s2" else 0),
                  radius=18 + i % 14).save(lake / slide / f"c{i}.jpg")
            n += 1
    log = tmp_path / "score.log"
    job = spark_submit_background(
        "score", "--config", "conf/cluster.yaml", f"score.input={lake}",
        f"score.model={tiny_artifact}", f"score.results={tmp_path / 'res'}",
        "score.batch_size=4", "score.tasks_per_core=1", log=log, master=master)
    try:
        def python_workers():  # forked by pyspark.daemon: each runs a task
            procs = list(_processes(state))
            daemons = {pid for pid, _, cmd in procs if "pyspark.daemon" in cmd}
            return [pid for pid, ppid, _ in procs if ppid in daemons]

        # Only a worker that is computing is inside a task: killing an idle one, or one
        # whose task has ended, is not a fault Spark has to see.
        killed = _kill_busy(python_workers, 240)
        assert killed, "no Python worker was seen scoring: " + log.read_text()[-2000:]

        def busy_executors():  # the executor JVM above a computing worker's daemon
            procs = {pid: (ppid, cmd) for pid, ppid, cmd in _processes(state)}

            def parent(pid):
                return procs.get(pid, (None, ""))[0]

            up = {parent(parent(w)) for w in _busy(python_workers())}
            return [pid for pid in up
                    if "CoarseGrainedExecutorBackend" in procs.get(pid, (None, ""))[1]]

        assert _kill_one(busy_executors, 240), "no executor was seen scoring: " + \
            log.read_text()[-2000:]
        assert job.wait(timeout=900) == 0, log.read_text()[-3000:]
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
    out = log.read_text()
    # Both faults hit the run (Spark saw them) and it still completed. The killed worker's task
    # is lost while its executor lives on, so Spark reports it with the exception the executor
    # met on the worker's socket. Its wording depends on what the executor was doing at that
    # instant ("Python worker exited unexpectedly", "Connection reset", "Broken pipe" were all
    # seen here), so the test asks for a lost task that is not an executor's loss.
    lost = re.findall(r"Lost task .*", out)
    by_worker = [line for line in lost if "ExecutorLostFailure" not in line]
    assert by_worker, "no task lost to the killed worker; lost tasks: %s\n%s" % (
        lost, out[-3000:])
    assert "Lost executor" in out, out[-3000:]
    assert f"scored {n} new images (0 with errors)" in out, out[-3000:]
    res = pd.read_parquet(tmp_path / "res")
    assert len(res) == n and res.sha256.is_unique and res.predicted_class.notna().all()
    per = pd.read_parquet(tmp_path / "res_per_class")
    assert per[per.slide.isna()]["count"].sum() == n
