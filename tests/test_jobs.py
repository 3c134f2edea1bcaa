"""The jobs as users run them: through spark-submit (deploy/submit.sh), on synthetic lakes."""

from __future__ import annotations

import hashlib
import re
import os
import shutil
import time

import numpy as np
import pandas as pd
import pytest
from conftest import jpeg_bytes, smear, spark_submit
from PIL import Image

from wbc_spark.model.transfer import resolve_precision

pytestmark = [pytest.mark.slow, pytest.mark.spark]


def make_lake(root):
    """Three classes x 3 images, plus four bad files."""
    for c, cls in enumerate(["Neutrophil", "Lymphocyte", "Basophil"]):
        (root / cls).mkdir(parents=True)
        for i in range(3):
            smear(seed=10 * c + i, radius=20 + 5 * c).save(root / cls / f"{cls}_{i}.jpg")
    bad = root / "Neutrophil"
    (bad / "empty.jpg").write_bytes(b"")
    (bad / "notes.jpg").write_text("this is not an image")
    (bad / "truncated.jpg").write_bytes(jpeg_bytes(smear(seed=99))[:1500])
    Image.new("RGB", (1, 1)).save(bad / "dot.png")
    return root


def run_ok(job, *args, **kw):
    proc = spark_submit(job, *args, **kw)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def ingest_args(tmp_path, lake):
    return ["data.source=folder", f"data.lake={lake}", f"data.dataset={tmp_path / 'ds'}",
            f"data.quarantine={tmp_path / 'q'}", "data.crop_size=64"]


def test_ingest_quarantines_bad_files_and_is_idempotent(tmp_path, tiny_artifact):
    lake = make_lake(tmp_path / "lake")
    out = run_ok("ingest", *ingest_args(tmp_path, lake)).stdout
    assert "read 13, written 9, quarantined 4, duplicates 0" in out
    data = pd.read_parquet(tmp_path / "ds")
    assert len(data) == 9 and data.image_id.is_unique
    assert set(data.label) == {"Neutrophil", "Lymphocyte", "Basophil"}
    assert set(data.source) == {"lake"}  # the lab: the lake folder's name by default
    assert data.crop.map(len).eq(64 * 64 * 3).all()
    assert data.context.eq(1.5).all() and data.stain.eq("surround").all()  # the contract
    assert data.framing.eq("fit").all()
    assert data.sha256.str.len().eq(64).all()
    q = pd.read_parquet(tmp_path / "q").set_index("image_id")
    assert q.loc["lake/Neutrophil/empty.jpg", "reason"] == "empty file"
    assert q.loc["lake/Neutrophil/notes.jpg", "reason"].startswith("not an image")
    assert "truncated" in q.loc["lake/Neutrophil/truncated.jpg", "reason"]
    assert "too small 1x1" in q.loc["lake/Neutrophil/dot.png", "reason"]

    again = run_ok("ingest", *ingest_args(tmp_path, lake)).stdout
    assert "written 0, quarantined 0" in again and "already ingested 13" in again
    assert len(pd.read_parquet(tmp_path / "ds")) == 9

    smear(seed=77).save(lake / "Lymphocyte" / "new.jpg")
    shutil.copy(lake / "Basophil" / "Basophil_0.jpg", lake / "Basophil" / "copy.jpg")
    third = run_ok("ingest", *ingest_args(tmp_path, lake)).stdout
    assert "read 15, written 2, quarantined 0, duplicates 1" in third
    assert len(pd.read_parquet(tmp_path / "ds")) == 11

    # A copied or touched lake (every file listed with a new time, same bytes) adds nothing.
    later = time.time() + 3600
    for f in lake.rglob("*"):
        if f.is_file():
            os.utime(f, (later, later))
    touched = run_ok("ingest", *ingest_args(tmp_path, lake)).stdout
    assert "written 0, quarantined 0" in touched and "already ingested 15" in touched
    assert len(pd.read_parquet(tmp_path / "ds")) == 11
    assert len(pd.read_parquet(tmp_path / "q")) == 4

    # A file whose content changed is ingested again; its new row supersedes the old one.
    smear(seed=55).save(lake / "Lymphocyte" / "Lymphocyte_0.jpg")
    changed = run_ok("ingest", *ingest_args(tmp_path, lake)).stdout
    assert "written 1, quarantined 0" in changed
    from wbc_spark.evaluation.crossval import load_dataset

    current = load_dataset(str(tmp_path / "ds"), ["Neutrophil", "Lymphocyte", "Basophil"])
    assert len(current) == 11 and current.path.is_unique
    row = current[current.image_id == "lake/Lymphocyte/Lymphocyte_0.jpg"].iloc[0]
    assert row.sha256 == hashlib.sha256(
        (lake / "Lymphocyte" / "Lymphocyte_0.jpg").read_bytes()).hexdigest()
    # Spark readers (training, scoring) see the same 11 rows.
    scored = run_ok("score", f"score.input={tmp_path / 'ds'}", f"score.model={tiny_artifact}",
                    f"score.results={tmp_path / 'res'}").stdout
    # 11 rows, 10 images: copy.jpg is Basophil_0.jpg's bytes, scored once (an image is its
    # content).
    assert "scored 10 new images (0 with errors)" in scored
    res = pd.read_parquet(tmp_path / "res")
    assert len(res) == 10 and row.sha256 in set(res.sha256)


def test_same_content_with_two_labels_is_an_error_naming_both(tmp_path):
    lake = tmp_path / "lake"
    (lake / "Neutrophil").mkdir(parents=True)
    (lake / "Monocyte").mkdir()
    smear(seed=1).save(lake / "Neutrophil" / "a.jpg")
    shutil.copy(lake / "Neutrophil" / "a.jpg", lake / "Monocyte" / "b.jpg")
    proc = spark_submit("ingest", *ingest_args(tmp_path, lake))
    assert proc.returncode == 1
    # spark-submit passes the Python driver's stderr through its stdout.
    out = proc.stdout + proc.stderr
    assert "labelled Monocyte and Neutrophil" in out
    assert "Monocyte/b.jpg" in out and "Neutrophil/a.jpg" in out
    assert not (tmp_path / "ds").exists() or pd.read_parquet(tmp_path / "ds").empty


def score_args(tmp_path, lake, model):
    return [f"score.input={lake}", f"score.model={model}", f"score.results={tmp_path / 'res'}"]


def test_scoring_is_incremental_and_records_errors(tmp_path, tiny_artifact):
    lake = tmp_path / "lake"
    for k, slide in enumerate(("s1", "s2")):
        (lake / slide).mkdir(parents=True)
        for i in range(3):
            # Fixed seeds, none of them late.jpg's 555 below (a seed from hash() changed with
            # each process's string hashing and once drew 555: late.jpg was then a copy of an
            # image already scored and rightly not scored again).
            smear(seed=100 + 10 * k + i).save(lake / slide / f"c{i}.jpg")
    (lake / "s2" / "broken.jpg").write_bytes(b"\xff\xd8 not really")
    noise = np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8)
    Image.fromarray(noise).save(lake / "s2" / "noise.png")
    proc = run_ok("score", *score_args(tmp_path, lake, tiny_artifact))
    out = proc.stdout
    assert "scored 8 new images (1 with errors)" in out
    assert "pyarrow_hotfix active: True" in proc.stdout + proc.stderr
    assert re.search(r"review: \d+ of them flagged for review", out)
    res = pd.read_parquet(tmp_path / "res")
    assert len(res) == 8 and res.path.is_unique
    assert {f"p_{c}" for c in ["Neutrophil", "Basophil"]} <= set(res.columns)
    broken = res[res.path.str.endswith("broken.jpg")].iloc[0]
    assert broken.error and broken.predicted_class is None
    assert broken.needs_review and broken.review_reason == "unreadable"
    flagged_noise = res[res.path.str.endswith("noise.png")].iloc[0]
    assert flagged_noise.needs_review and flagged_noise.predicted_class is not None
    assert "not_a_known_cell" in flagged_noise.review_reason
    good = res[res.error.isna()]
    assert good.predicted_class.notna().all() and set(good.slide) == {"s1", "s2"}
    assert good.lab_distance.notna().all() and good.beyond_lab_range.notna().all()
    # score.precision=auto and score.trained_precision=auto, resolved by each worker's CPU
    # (this machine's) and recorded: the trained layers' only where they are not fp32.
    auto = resolve_precision("auto")
    expected = auto if auto == "fp32" else f"{auto}/{auto}"
    assert (good.precision == expected).all() and broken.precision is None
    per = pd.read_parquet(tmp_path / "res_per_class")
    overall = per[per.slide.isna()]
    assert overall["count"].sum() == 7 and (overall.classified == 7).all()
    assert (overall.errors == 1).all() and overall.flagged.sum() == good.needs_review.sum()
    assert (overall.shift_cells == 7).all() and overall.shift_score.between(0, 1).all()
    assert not overall.shift_alarm.any()  # 7 cells: under alarm_min_cells
    assert set(per.slide.dropna()) == {"s1", "s2"}
    assert ((per.ci_low <= per.fraction) & (per.fraction <= per.ci_high)).all()
    # The corrected differential: counted cells plus those counted apart make the classified.
    out_reasons = good.review_reason.fillna("").str.contains("no_cell_found")
    assert (overall.excluded == out_reasons.sum()).all()
    assert (overall.counted_total + overall.excluded == overall.classified).all()
    assert overall.counted.sum() == overall.counted_total.iloc[0]
    # Cells flagged not_a_known_cell still count (and are flagged): the differential is a
    # distribution with its intervals, corrected with the model's pooled confusion (the toy
    # model's has no labs).
    assert ((per.corrected_low <= per.corrected_fraction)
            & (per.corrected_fraction <= per.corrected_high)).all()
    assert np.allclose(per.groupby(per.slide.fillna("*")).corrected_fraction.sum(), 1.0)
    assert (per.confusion_lab == "pooled").all()
    assert "corrected share [95% interval]" in out

    # A run killed before its commit leaves only staging debris: it is never read, and the
    # next run clears it and scores only what is new.
    debris = tmp_path / "res" / "_staging" / "dead-run"
    debris.mkdir(parents=True)
    res.head(2).to_parquet(debris / "part-0.parquet")
    smear(seed=555).save(lake / "s1" / "late.jpg")
    # This run's trained layers in fp32 (score.trained_precision), recorded as the frozen.
    proc = run_ok("score", *score_args(tmp_path, lake, tiny_artifact),
                  "score.trained_precision=fp32")
    second = proc.stdout
    assert "trained layers in fp32" in proc.stdout + proc.stderr
    assert "scored 1 new images (0 with errors)" in second
    res2 = pd.read_parquet(tmp_path / "res")
    assert len(res2) == 9 and res2.path.is_unique
    late = res2[res2.path.str.endswith("late.jpg")].iloc[0]
    assert late.precision == auto, late.precision
    assert not debris.exists()
    third = run_ok("score", *score_args(tmp_path, lake, tiny_artifact)).stdout
    assert "scored 0 new images" in third
    assert len(pd.read_parquet(tmp_path / "res")) == 9


def test_scoring_refuses_a_model_for_other_classes(tmp_path, tiny_artifact):
    lake = tmp_path / "lake"
    lake.mkdir()
    smear().save(lake / "a.jpg")
    proc = spark_submit("score", *score_args(tmp_path, lake, tiny_artifact),
                        "classes=[Neutrophil, Lymphocyte, Monocyte]")
    assert proc.returncode == 1
    assert "model is for classes" in proc.stdout + proc.stderr
    assert not (tmp_path / "res").exists()


def test_int8_scoring_refuses_a_model_without_its_calibration(tmp_path, tiny_artifact):
    lake = tmp_path / "lake"
    lake.mkdir()
    smear().save(lake / "a.jpg")
    proc = spark_submit("score", *score_args(tmp_path, lake, tiny_artifact),
                        "score.precision=int8")
    assert proc.returncode == 1
    assert f"{tiny_artifact}: no int8 calibration in the model" in proc.stdout + proc.stderr
    assert not (tmp_path / "res").exists()
    # The report's activation maps run the same frozen pass: refused on the driver too.
    report = spark_submit("report", *score_args(tmp_path, lake, tiny_artifact),
                          "score.precision=int8", f"report.output={tmp_path / 'report'}")
    assert report.returncode == 1
    assert f"{tiny_artifact}: no int8 calibration in the model" in report.stdout + report.stderr
    assert not (tmp_path / "report").exists()


def test_training_twice_on_the_same_data_gives_the_same_model(tmp_path, fake_weights):
    """Seeded training is reproducible: petastorm's reader threads deliver the row groups in
    a varying order, and neither the augmented views nor the batches may follow it. The two
    runs' model_id digests the weights, temperature and review detectors."""
    import json

    from conftest import CLASSES

    lake = tmp_path / "lake"
    for c, cls in enumerate(CLASSES):
        (lake / cls).mkdir(parents=True)
        for i in range(8):
            smear(seed=70 * c + i, radius=20 + 3 * c, hue_shift=8 * c).save(lake / cls / f"{i}.jpg")
    paths = [f"data.dataset={tmp_path / 'ds'}", f"data.quarantine={tmp_path / 'q'}"]
    run_ok("ingest", "data.source=folder", f"data.lake={lake}", *paths)
    evaluations = []
    for run in ("a", "b"):
        run_ok("train_distributed", *paths, f"model.weights_dir={fake_weights}",
               f"train.output={tmp_path / run}", f"train.petastorm_cache={tmp_path / 'cache'}",
               "train.views=3", "train.epochs=2", "train.num_processes=2")
        evaluations.append(json.loads((tmp_path / run / "evaluation.json").read_text()))
    a, b = evaluations
    assert a["model_id"] == b["model_id"]
    assert a["test"] == b["test"]


def test_lab_alignment_trains_per_lab_and_scores_by_a_kept_lab_profile(tmp_path, fake_weights):
    """train.align: the artifact keeps each training lab's moments; scoring measures the
    input's own lab profile once, keeps it, reuses it, and refuses what it cannot measure.
    The model averages two test-time views (model.test_views=2), aligned alike."""
    import json

    import torch
    from conftest import CLASSES

    paths = [f"data.dataset={tmp_path / 'ds'}", f"data.quarantine={tmp_path / 'q'}"]
    for lab, shift in (("north", 0), ("south", 25)):
        lake = tmp_path / lab
        for c, cls in enumerate(CLASSES):
            (lake / cls).mkdir(parents=True)
            for i in range(8):
                smear(seed=300 * c + i + shift, radius=20 + 3 * c,
                      hue_shift=8 * c + shift).save(lake / cls / f"{i}.jpg")
        run_ok("ingest", "data.source=folder", f"data.lake={lake}", f"data.lab={lab}", *paths)
    model = tmp_path / "model"
    run_ok("train_distributed", *paths, f"model.weights_dir={fake_weights}",
           f"train.output={model}", f"train.petastorm_cache={tmp_path / 'cache'}",
           "train.views=2", "train.epochs=1", "train.num_processes=2", "train.align=true",
           "train.int8_calibration=0", "model.test_views=2")
    saved = torch.load(model / "model.pt", weights_only=True)
    state = saved["alignment"]
    assert sorted(state["labs"]) == ["north", "south"]
    # two test-time views: the artifact's temperature is the views' mean's, and the
    # evaluation keeps one view's figures beside
    evaluation = json.loads((model / "evaluation.json").read_text())
    assert saved["test_views"] == evaluation["test_views"] == 2
    assert saved["temperature"] == evaluation["temperature"]
    single = evaluation["single_view"]
    assert 0.05 <= single["temperature"] <= 20
    assert sorted(single["test_per_lab"]) == ["north", "south"]
    assert single["test"]["n"] == evaluation["test"]["n"]
    assert state["reference"]["images"] == sum(m["images"] for m in state["labs"].values())

    new_lab = tmp_path / "elsewhere"
    new_lab.mkdir()
    for i in range(34):
        smear(seed=900 + i, radius=20 + i % 12, hue_shift=40).save(new_lab / f"{i}.jpg")
    args = score_args(tmp_path, new_lab, model / "model.pt")
    first = run_ok("score", *args)
    assert "scored 34 new images (0 with errors)" in first.stdout
    assert "a new lab profile of 34 images" in first.stdout + first.stderr
    profiles = pd.read_parquet(tmp_path / "res_lab_profiles")
    assert len(profiles) == 1 and profiles.images.iloc[0] == 34
    smear(seed=2000, hue_shift=40).save(new_lab / "late.jpg")
    second = run_ok("score", *args)
    assert "scored 1 new images" in second.stdout
    assert "the lab profile of 34 images" in second.stdout + second.stderr
    assert len(pd.read_parquet(tmp_path / "res_lab_profiles")) == 1

    few = tmp_path / "few"
    few.mkdir()
    for i in range(3):
        smear(seed=950 + i).save(few / f"{i}.jpg")
    refused = spark_submit("score", f"score.input={few}", f"score.model={model / 'model.pt'}",
                           f"score.results={tmp_path / 'few_res'}")
    assert refused.returncode == 1
    assert "3 readable images to measure the lab's moments" in refused.stdout + refused.stderr
    assert not list((tmp_path / "few_res").glob("run=*"))  # nothing scored
    unknown = spark_submit("score", f"score.input={few}", f"score.model={model / 'model.pt'}",
                           f"score.results={tmp_path / 'few_res'}", "score.lab=nowhere")
    assert unknown.returncode == 1
    assert "'nowhere' has no moments: known labs are north, south" in (unknown.stdout
                                                                      + unknown.stderr)
    known = run_ok("score", f"score.input={few}", f"score.model={model / 'model.pt'}",
                   f"score.results={tmp_path / 'few_res'}", "score.lab=north")
    assert "scored 3 new images" in known.stdout
    assert "training lab north's stored moments" in known.stdout + known.stderr

    # One class's folder would give a profile of one class: refused unless score.lab_profile
    # names the lab's folder, whose stored profile is then used (and none is measured anew).
    one_class = tmp_path / "elsewhere_labelled" / CLASSES[1].lower()
    one_class.mkdir(parents=True)
    for i in range(3):
        smear(seed=970 + i, hue_shift=40).save(one_class / f"{i}.jpg")
    one_args = [f"score.input={one_class}", f"score.model={model / 'model.pt'}",
                f"score.results={tmp_path / 'res'}"]
    refused = spark_submit("score", *one_args)
    assert refused.returncode == 1
    assert (f"one class's folder ({CLASSES[1]})" in refused.stdout + refused.stderr
            and f"(here perhaps {one_class.parent})" in refused.stdout + refused.stderr)
    by_lab = run_ok("score", *one_args, f"score.lab_profile={new_lab}")
    assert "scored 3 new images" in by_lab.stdout
    assert f"the lab profile of 34 images of {new_lab}" in by_lab.stdout + by_lab.stderr
    assert len(pd.read_parquet(tmp_path / "res_lab_profiles")) == 1
    missing = spark_submit("score", *one_args, f"score.lab_profile={tmp_path / 'nowhere'}")
    assert missing.returncode == 1
    assert f"{tmp_path / 'nowhere'}: score.lab_profile not found" in (missing.stdout
                                                                      + missing.stderr)
