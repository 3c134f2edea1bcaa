"""Faults, overlapping runs and re-delivered files, through spark-submit on synthetic lakes.

Each test counts images in and rows out: every image scored exactly once per model, none lost.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time

import pandas as pd
import pytest
from conftest import smear, spark_submit, spark_submit_background

pytestmark = [pytest.mark.slow, pytest.mark.spark]


def make_lake(root, n=8):
    for slide in ("s1", "s2"):
        (root / slide).mkdir(parents=True)
        for i in range(n // 2):
            smear(seed=1000 + 10 * len(slide) + i + (50 if slide == "s2" else 0),
                  radius=20 + i).save(root / slide / f"c{i}.jpg")
    return root


def args(tmp_path, lake, model):
    return [f"score.input={lake}", f"score.model={model}", f"score.results={tmp_path / 'res'}"]


def exactly_once(tmp_path, n):
    """The per-image table holds each image (content) once; the per-class table counts n."""
    res = pd.read_parquet(tmp_path / "res")
    assert res.sha256.notna().all()
    assert len(res) == n and res.sha256.is_unique, res[["path", "sha256", "run"]]
    per = pd.read_parquet(tmp_path / "res_per_class")
    assert per[per.slide.isna()]["count"].sum() == n
    return res


def test_touched_copied_and_changed_files(tmp_path, tiny_artifact):
    lake = make_lake(tmp_path / "lake")
    first = spark_submit("score", *args(tmp_path, lake, tiny_artifact))
    assert first.returncode == 0, first.stderr[-2000:]
    assert "scored 8 new images" in first.stdout
    # Touch every file and copy the lake inside itself: the same bytes, new times and paths.
    later = time.time() + 60
    for p in lake.rglob("*.jpg"):
        os.utime(p, (later, later))
    shutil.copytree(lake / "s1", lake / "s1_copy")
    again = spark_submit("score", *args(tmp_path, lake, tiny_artifact))
    assert again.returncode == 0, again.stderr[-2000:]
    assert "scored 0 new images" in again.stdout
    exactly_once(tmp_path, 8)
    # A changed file is a new image under the same path: it supersedes the old result.
    smear(seed=4242, radius=33).save(lake / "s2" / "c0.jpg")
    changed = spark_submit("score", *args(tmp_path, lake, tiny_artifact))
    assert "scored 1 new images" in changed.stdout
    res = pd.read_parquet(tmp_path / "res")
    assert len(res) == 9  # the old row stays as history ...
    per = pd.read_parquet(tmp_path / "res_per_class")
    assert per[per.slide.isna()]["count"].sum() == 8  # ... and is no longer counted
    assert per[per.slide == "s2"]["count"].sum() == 4


def test_two_scoring_runs_at_once(tmp_path, tiny_artifact):
    lake = make_lake(tmp_path / "lake")
    procs = [spark_submit_background("score", *args(tmp_path, lake, tiny_artifact),
                                     log=tmp_path / f"run{i}.log") for i in range(2)]
    codes = [p.wait(timeout=600) for p in procs]
    logs = [(tmp_path / f"run{i}.log").read_text() for i in range(2)]
    for code, text in zip(codes, logs):
        assert code == 0 or "is writing it; run again when it has finished" in text, text[-2000:]
    assert 0 in codes
    exactly_once(tmp_path, 8)
    # Whatever the first pair did, one more run completes the lake, exactly once.
    assert spark_submit("score", *args(tmp_path, lake, tiny_artifact)).returncode == 0
    exactly_once(tmp_path, 8)


def test_two_ingests_at_once(tmp_path):
    lake = make_lake(tmp_path / "lake")
    common = ["data.source=folder", f"data.lake={lake}", f"data.dataset={tmp_path / 'ds'}",
              f"data.quarantine={tmp_path / 'q'}", "data.crop_size=64"]
    procs = [spark_submit_background("ingest", *common, log=tmp_path / f"in{i}.log")
             for i in range(2)]
    codes = [p.wait(timeout=600) for p in procs]
    logs = [(tmp_path / f"in{i}.log").read_text() for i in range(2)]
    for code, text in zip(codes, logs):
        assert code == 0 or "is writing it" in text, text[-2000:]
    assert 0 in codes
    ds = pd.read_parquet(tmp_path / "ds")
    assert len(ds) == 8 and ds.sha256.is_unique


@pytest.mark.parametrize("after", [6.0, 14.0, 22.0])
def test_killed_scoring_leaves_all_or_nothing_and_a_rerun_completes(tmp_path, tiny_artifact,
                                                                    after):
    """kill -9 of the whole job (driver and its Python workers) at a few moments of a run:
    before the Spark session, while scoring, around the commit."""
    lake = make_lake(tmp_path / "lake", n=16)
    proc = spark_submit_background("score", *args(tmp_path, lake, tiny_artifact),
                                   log=tmp_path / "killed.log")
    try:
        proc.wait(timeout=after)
    except Exception:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    res_dir = tmp_path / "res"
    if res_dir.exists() and any(res_dir.glob("run=*")):
        # Whatever was committed is a whole run: each image at most once.
        res = pd.read_parquet(res_dir)
        assert res.sha256.is_unique
    rerun = spark_submit("score", *args(tmp_path, lake, tiny_artifact))
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    exactly_once(tmp_path, 16)
    assert not (res_dir / "_lock").exists()


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has a GPU")
def test_scoring_on_a_gpu_that_is_not_there_is_refused_and_auto_scores_on_the_cpu(
        tmp_path, tiny_artifact):
    lake = make_lake(tmp_path / "lake")
    proc = spark_submit("score", *args(tmp_path, lake, tiny_artifact), "score.device=cuda")
    assert proc.returncode == 1
    failed = [ln for ln in (proc.stdout + proc.stderr).splitlines()
              if ln.startswith("score failed:")]
    assert len(failed) == 1 and "RuntimeError: score.device=cuda: torch" in failed[0], failed
    assert "sees no CUDA device in this worker; set score.device=cpu or auto" in failed[0]
    assert not list((tmp_path / "res").glob("run=*/*.parquet"))  # nothing committed
    proc = spark_submit("score", *args(tmp_path, lake, tiny_artifact), "score.device=auto")
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = exactly_once(tmp_path, 8)
    assert res.precision.notna().all()


def test_a_corrupt_parquet_part_is_named_in_one_line_and_nothing_is_committed(tmp_path,
                                                                            tiny_artifact):
    lake = make_lake(tmp_path / "lake")
    assert spark_submit("score", *args(tmp_path, lake, tiny_artifact)).returncode == 0
    part = sorted((tmp_path / "res").glob("run=*/*.parquet"))[0]
    part.write_bytes(b"PAR1 this is not a parquet file any more")
    runs_before = sorted(p.name for p in (tmp_path / "res").glob("run=*"))
    per_before = pd.read_parquet(tmp_path / "res_per_class")
    smear(seed=999).save(lake / "s1" / "new.jpg")
    proc = spark_submit("score", *args(tmp_path, lake, tiny_artifact))
    assert proc.returncode == 1
    failed = [ln for ln in (proc.stdout + proc.stderr).splitlines()
              if ln.startswith("score failed:")]
    assert len(failed) == 1 and part.name in failed[0], failed  # one line naming the file
    assert sorted(p.name for p in (tmp_path / "res").glob("run=*")) == runs_before
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "res_per_class"), per_before)
    assert not (tmp_path / "res" / "_lock").exists()


def test_a_corrupt_dataset_part_is_named_in_one_line_by_scoring_and_training(tmp_path,
                                                                             tiny_artifact):
    lake = tmp_path / "lake"
    for c, cls in enumerate(("Neutrophil", "Lymphocyte")):
        (lake / cls).mkdir(parents=True)
        for i in range(4):
            smear(seed=300 + 10 * c + i).save(lake / cls / f"{i}.jpg")
    ds = tmp_path / "ds"
    ingest = spark_submit("ingest", "data.source=folder", f"data.lake={lake}",
                          f"data.dataset={ds}", f"data.quarantine={tmp_path / 'q'}")
    assert ingest.returncode == 0, ingest.stdout[-2000:] + ingest.stderr[-2000:]
    part = sorted(ds.rglob("*.parquet"))[0]
    part.write_bytes(b"PAR1 this is not a parquet file any more")
    before = {p: p.stat().st_mtime_ns for p in ds.rglob("*")}
    score = spark_submit("score", f"score.input={ds}", f"score.model={tiny_artifact}",
                         f"score.results={tmp_path / 'res'}")
    train = spark_submit("train_distributed", f"data.dataset={ds}",
                         f"train.output={tmp_path / 'model'}",
                         f"train.petastorm_cache={tmp_path / 'cache'}")
    for job, proc in (("score", score), ("train_distributed", train)):
        assert proc.returncode == 1, (job, proc.stdout[-2000:])
        failed = [ln for ln in (proc.stdout + proc.stderr).splitlines()
                  if ln.startswith(f"{job} failed:")]
        assert len(failed) == 1 and part.name in failed[0], (job, failed)
    # Nothing written: no results run, no model, the dataset as it was.
    assert not list((tmp_path / "res").glob("run=*"))
    assert not (tmp_path / "model" / "model.pt").exists()
    assert {p: p.stat().st_mtime_ns for p in ds.rglob("*")} == before


@pytest.mark.skipif(os.geteuid() != 0, reason="a read-only bind mount needs root")
def test_a_read_only_output_folder_is_named_in_one_line(tmp_path, tiny_artifact):
    """The results folder on a file system mounted read-only (root ignores file modes, so a
    read-only bind mount in a private mount namespace stands in for a read-only share)."""
    from conftest import _submit_command

    lake = make_lake(tmp_path / "lake")
    out = tmp_path / "readonly"
    (out / "res").mkdir(parents=True)
    cmd, env = _submit_command("score", args(tmp_path / "readonly", lake, tiny_artifact), None)
    mount = (f"mount --bind {out} {out} && mount -o remount,bind,ro {out} && "
             'exec "$@"')
    proc = subprocess.run(["unshare", "-m", "bash", "-c", mount, "_", *cmd], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    failed = [ln for ln in (proc.stdout + proc.stderr).splitlines()
              if ln.startswith("score failed:")]
    assert len(failed) == 1 and str(out / "res") in failed[0], failed
    assert "Read-only file system" in failed[0], failed
    assert sorted(p.name for p in out.rglob("*")) == ["res"]  # nothing written anywhere
