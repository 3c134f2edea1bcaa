"""Real data: the BVLC weights classify a photo, and the pipeline runs on KRD-WBC.

These need ../shared (or WBC_SPARK_KRD_WBC and WBC_SPARK_WEIGHTS_DIR); they are skipped, with
the reason, where the data is absent, and run in CI where it is present.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import CLASSES, bvlc_dir, krd_root, pbc_root, spark_submit

pytestmark = pytest.mark.realdata
needs_weights = pytest.mark.skipif(bvlc_dir() is None, reason="BVLC weights not found")
needs_krd = pytest.mark.skipif(krd_root() is None, reason="KRD-WBC not found")

IMAGENET_CATS = range(281, 286)  # tabby, tiger cat, Persian, Siamese, Egyptian cat


def _top1(pm, photo) -> int:
    from PIL import Image

    from wbc_spark.model.weights import to_input

    img = Image.fromarray(photo)
    w, h = img.size
    s = min(w, h)
    img = img.crop(((w - s) // 2, (h - s) // 2, (w + s) // 2, (h + s) // 2)).resize((224, 224))
    x = to_input(torch.from_numpy(np.array(img))[None], pm.convention)
    with torch.no_grad():
        return int(pm.model.eval()(x).argmax())


@needs_weights
def test_bvlc_googlenet_sees_a_cat_and_an_espresso():
    from skimage import data
    from torchvision.models import GoogLeNet_Weights

    from wbc_spark.model.weights import load_bvlc

    pm = load_bvlc()
    names = GoogLeNet_Weights.IMAGENET1K_V1.meta["categories"]
    top = _top1(pm, data.chelsea())
    assert top in IMAGENET_CATS, f"chelsea() top-1 is {names[top]}"
    top = _top1(pm, data.coffee())
    assert names[top] == "espresso", f"coffee() top-1 is {names[top]}"


@pytest.fixture(scope="module")
def krd_run(tmp_path_factory):
    if krd_root() is None or bvlc_dir() is None:
        pytest.skip("KRD-WBC or the BVLC weights not found")
    root = tmp_path_factory.mktemp("krd")
    common = [f"data.dataset={root / 'ds'}", f"data.quarantine={root / 'q'}"]
    ingest = spark_submit("ingest", *common)
    assert ingest.returncode == 0, ingest.stdout[-3000:]
    train = spark_submit("train_distributed", *common, f"train.output={root / 'model'}",
                         f"train.petastorm_cache={root / 'cache'}", "train.views=4")
    assert train.returncode == 0, train.stdout[-5000:]
    return root, ingest.stdout, train.stdout


@pytest.mark.slow
@pytest.mark.spark
def test_krd_ingest_handles_every_quirk(krd_run):
    root, out, _ = krd_run
    assert "read 600, written 600, quarantined 0, duplicates 1" in out  # image200 = image202
    data = pd.read_parquet(root / "ds", columns=["image_id", "label", "group", "cell_iou",
                                                 "cell_found", "mask"])
    assert data.label.value_counts().to_dict() == {
        "Neutrophil": 300, "Lymphocyte": 230, "Monocyte": 39, "Basophil": 20, "Eosinophil": 11}
    ids = set(data.image_id)
    assert {"krd-wbc/image405", "krd-wbc/image524", "krd-wbc/image588", "krd-wbc/image99"} <= ids
    g = data.set_index("image_id").group
    assert g["krd-wbc/image91"] == g["krd-wbc/image394"]
    assert data["mask"].notna().all() and data.cell_found.all()
    assert data.cell_iou.median() > 0.6  # the stain locator finds the cell


# A check that distributed training learns, not an accuracy measurement (benchmarks/accuracy.py
# is that). Test fold 0 (122 images, 7 monocytes, 3 eosinophils) with the default recipe gave
# macro-F1 0.60-0.76 and accuracy 0.86-0.93 in four `deploy/demo.sh` runs when the runs still
# followed petastorm's read order; this fixture's training gave 0.531 and 0.642 before, then
# 0.608 / 0.876 in two runs with the same model_id (session 19, a CPU with AVX512-BF16; another
# CPU or precision rounds differently, so it is another draw). Predicting the majority class
# scores 0.13 and 0.49, so the bars sit well above chance and below the draws' spread. The
# large classes are steadier: neutrophil and lymphocyte recall stayed at 0.89 or more.
MIN_MACRO_F1 = 0.45
MIN_ACCURACY = 0.80
MIN_LARGE_CLASS_RECALL = 0.80


@pytest.mark.slow
@pytest.mark.spark
def test_distributed_training_beats_the_bar_on_held_out_data(krd_run):
    root, _, out = krd_run
    ev = json.loads((root / "model" / "evaluation.json").read_text())
    test = ev["test"]
    assert ev["split"]["test"] >= 100 and ev["split"]["val"] >= 60
    assert test["macro_f1"] >= MIN_MACRO_F1, out[-2000:]
    assert test["accuracy"] >= MIN_ACCURACY
    for name in ("Neutrophil", "Lymphocyte"):
        assert test["per_class"][name]["recall"] >= MIN_LARGE_CLASS_RECALL, name
    lo, hi = test["accuracy_ci"]
    assert lo < test["accuracy"] < hi
    assert set(test["per_class"]) == set(CLASSES)
    assert (root / "model" / "confusion.png").stat().st_size > 1000
    raw = torch.load(root / "model" / "model.pt", weights_only=True)
    assert raw["classes"] == CLASSES and raw["architecture"]["freeze_until"] == "inception4c"
    assert raw["weights_provenance"]["source"] == "bvlc"
    assert 0.05 < raw["temperature"] < 20
    assert ev["model_id"] == raw["model_id"]  # the evaluation describes this artifact
    pre = raw["preprocessing"]  # the contract read from the dataset
    assert (pre["crop_size"], pre["context"], pre["stain"], pre["framing"]) == \
        (224, 1.5, "surround", "fit")
    # Review detectors fitted, thresholds set on validation, applied to the test fold.
    rv = ev["review"]
    assert 0 < raw["review"]["confidence_threshold"] <= 1
    assert 0.02 < rv["validation"]["not_a_known_cell_share"] < 0.08
    assert rv["flagged_share_by_reason"]["not_a_known_cell"] < 0.25
    assert rv["beyond_lab_threshold_share"] < 0.25  # held-out cells of the trained lab
    assert rv["unflagged_accuracy"] >= test["accuracy"]
    preds = pd.read_csv(root / "model" / "test_predictions.csv")
    # No duplicate group straddles the test fold and the rest.
    data = pd.read_parquet(root / "ds", columns=["image_id", "group"]).set_index("image_id")
    test_groups = set(data.loc[preds.image_id, "group"])
    others = data[~data.index.isin(preds.image_id)]
    assert not test_groups & set(others.group)


@pytest.mark.slow
@pytest.mark.spark
def test_scoring_the_ingested_dataset(krd_run):
    root, _, _ = krd_run
    args = [f"score.input={root / 'ds'}", f"score.model={root / 'model' / 'model.pt'}",
            f"score.results={root / 'res'}"]
    first = spark_submit("score", *args)
    assert first.returncode == 0, first.stdout[-3000:]
    # 599 images: image200 and image202 are the same bytes, one image (scored once).
    assert "scored 599 new images (0 with errors)" in first.stdout
    res = pd.read_parquet(root / "res")
    assert len(res) == 599 and res.predicted_class.notna().all()
    probs = res[[f"p_{c}" for c in CLASSES]].to_numpy()
    assert np.allclose(probs.sum(1), 1, atol=1e-5)
    second = spark_submit("score", *args)
    assert "scored 0 new images" in second.stdout
    # The lab the model was trained on: no shift alarm, a minority flagged.
    assert "SHIFT ALARM" not in first.stdout
    per = pd.read_parquet(root / "res_per_class")
    assert not per[per.slide.isna()].shift_alarm.any()
    # Few cells look unlike the five classes; low_confidence may flag many more here (a
    # KRD-WBC-only model's validation split has ~100 cells, so 99.5% unflagged accuracy there
    # means no error above the threshold).
    assert res.review_reason.str.contains("not_a_known_cell").fillna(False).mean() < 0.1
    # The differential of KRD-WBC's images against its labels. The per-class table's raw
    # shares are the per-image table's predictions, counted.
    overall = per[per.slide.isna()].set_index("class")
    assert (overall.confusion_lab == "KRD-WBC").all()
    predicted = res.predicted_class.value_counts(normalize=True).reindex(overall.index,
                                                                          fill_value=0.0)
    assert np.allclose(overall.fraction, predicted, atol=1e-12)
    labels = pd.read_parquet(root / "ds", columns=["sha256", "label"]).drop_duplicates("sha256")
    truth = labels.label.value_counts(normalize=True).reindex(overall.index)
    table = overall[["fraction", "corrected_fraction", "corrected_low", "corrected_high"]]
    table = table.assign(truth=truth).to_string()
    # Most images were trained on, but through augmented views (grey, stain-jittered) with
    # label smoothing, so the raw shares are near the labels' without repeating them: CI's
    # run of 3551cd3 called 0.401 of the cells neutrophils against 0.501 (0.457 lymphocytes
    # against 0.382). The sink issue 13 reported (half of the cells called basophils, 0.033
    # of KRD-WBC's) would be off by more than 0.4.
    assert (overall.fraction - truth).abs().max() < 0.15, table
    # The correction applies the confusion of a test fold of about 120 cells (8 monocytes),
    # so its point moves a lot from one training to the next (CI: Monocyte +0.090; a fresh
    # clone: +0.153, interval 0.001-0.591): its 95% interval, not its point, must hold the
    # truth.
    assert ((overall.corrected_low <= truth) & (truth <= overall.corrected_high)).all(), table


@pytest.mark.slow
@pytest.mark.spark
def test_int8_scoring_follows_fp32_on_held_out_images(krd_run, tmp_path):
    """score.precision=int8 through the job, on 60 test-fold images (the model did not train
    on them), against the same images scored in fp32."""
    import hashlib
    import shutil

    root, _, _ = krd_run
    model = root / "model" / "model.pt"
    raw = torch.load(model, weights_only=True)
    assert raw["int8"]["images"] == 256 and raw["int8"]["backend"] == "x86"
    held_out = pd.read_csv(root / "model" / "test_predictions.csv").image_id.head(60)
    lake = tmp_path / "lake"
    lake.mkdir()
    for image_id in held_out:
        name = image_id.split("/")[-1] + ".jpg"
        shutil.copy(krd_root() / "Dataset" / "image" / name, lake / name)
    out, preds = {}, {}
    for precision in ("fp32", "int8"):
        out[precision] = spark_submit("score", f"score.input={lake}", f"score.model={model}",
                                      f"score.results={tmp_path / precision}",
                                      f"score.precision={precision}")
        assert out[precision].returncode == 0, out[precision].stdout[-3000:]
        preds[precision] = pd.read_parquet(tmp_path / precision).set_index("path")
    assert "frozen layers in int8 (x86 quantisation, activation ranges from 256 " \
           "training crops)" in out["int8"].stdout + out["int8"].stderr
    a, b = preds["fp32"], preds["int8"].loc[preds["fp32"].index]
    # Copies (image200 and image202 are the same bytes) are scored once.
    distinct = {hashlib.sha256(f.read_bytes()).digest() for f in lake.iterdir()}
    assert len(a) == len(distinct) >= 55 and b.predicted_class.notna().all()
    # int8 changed 11 of 739 two-lab test-fold predictions (docs/PERFORMANCE.md).
    agree = (a.predicted_class == b.predicted_class).mean()
    shift = (a.confidence - b.confidence).abs().median()
    assert agree >= 0.9 and shift < 0.05, (agree, shift)


@pytest.mark.slow
@pytest.mark.spark
def test_a_lab_the_model_never_saw_sounds_the_shift_alarm(krd_run, tmp_path):
    """A KRD-WBC-only model scoring 60 of PBC-dev's cells (another lab) through the job."""
    if pbc_root() is None:
        pytest.skip("PBC-dev not found")
    import shutil

    lake = tmp_path / "pbc_slide"
    lake.mkdir()
    labels = pd.read_csv(pbc_root() / "labels.csv")
    pick = labels[labels.label.isin(CLASSES)].groupby("label").head(12)
    for p in pick.path:
        shutil.copy(pbc_root() / p, lake / p.replace("/", "_"))
    root, _, _ = krd_run
    out = spark_submit("score", f"score.input={lake}",
                       f"score.model={root / 'model' / 'model.pt'}",
                       f"score.results={tmp_path / 'res'}")
    assert out.returncode == 0, out.stdout[-3000:]
    assert "SHIFT ALARM" in out.stdout
    per = pd.read_parquet(tmp_path / "res_per_class")
    assert per[per.slide.isna()].shift_alarm.all()
    assert per.shift_score.min() > 0.5


@pytest.fixture(scope="module")
def two_lab_run(tmp_path_factory):
    """KRD-WBC and PBC-dev in one dataset (4,894 rows, 3,694 of the five classes), trained
    on with conf/local.yaml's settings: the size at which training first ran out of Java heap
    (Spark's Parquet reader took thousands of 150 KB crops per batch). One view and three
    epochs keep it to a few minutes: this checks that it trains and what it records, not how
    well (benchmarks/crosslab.py measures that)."""
    if krd_root() is None or pbc_root() is None or bvlc_dir() is None:
        pytest.skip("KRD-WBC, PBC-dev or the BVLC weights not found")
    root = tmp_path_factory.mktemp("two_labs")
    common = [f"data.dataset={root / 'ds'}", f"data.quarantine={root / 'q'}"]
    krd = spark_submit("ingest", *common)
    assert krd.returncode == 0, krd.stdout[-3000:]
    pbc = spark_submit("ingest", *common, "data.source=manifest",
                       f"data.lake={pbc_root() / 'labels.csv'}")
    assert pbc.returncode == 0, pbc.stdout[-3000:]
    train = spark_submit("train_distributed", *common, f"train.output={root / 'model'}",
                         f"train.petastorm_cache={root / 'cache'}", "train.views=1",
                         "train.epochs=3", timeout=1800)
    assert train.returncode == 0, train.stdout[-5000:]
    return root, pbc.stdout, train.stdout


@pytest.mark.slow
@pytest.mark.spark
def test_two_labs_in_one_dataset_train_and_are_reported_per_lab(two_lab_run):
    root, ingest_out, out = two_lab_run
    assert "read 4294, written 4294, quarantined 0" in ingest_out
    data = pd.read_parquet(root / "ds", columns=["image_id", "source", "label"])
    assert data.source.value_counts().to_dict() == {"PBC-dev": 4294, "KRD-WBC": 600}
    assert data.image_id.is_unique
    # The three other cell types are kept with their label and never trained on.
    others = data[~data.label.isin(CLASSES)].label.value_counts().to_dict()
    assert others == {"ImmatureGranulocyte": 400, "Erythroblast": 400, "Platelet": 400}
    ev = json.loads((root / "model" / "evaluation.json").read_text())
    assert set(ev["test_per_lab"]) == {"KRD-WBC", "PBC-dev"}
    assert sum(ev["split"].values()) == 3694
    raw = torch.load(root / "model" / "model.pt", weights_only=True)
    trained = raw["trained_on"]
    assert set(trained) == {"KRD-WBC", "PBC-dev"}
    assert sum(sum(v.values()) for v in trained.values()) == ev["split"]["train"]
    # Stratified by lab and class: each lab's classes are in training in their shares.
    assert 0.5 < trained["PBC-dev"]["Basophil"] / (371 * 0.64) < 1.5
    assert trained["KRD-WBC"]["Eosinophil"] >= 5
    # The held-out confusion the differential corrects with: the test fold, per lab.
    conf = raw["confusion"]
    assert conf == ev["differential_confusion"] and set(conf["per_lab"]) == set(trained)
    assert np.asarray(conf["counts"]).sum() == ev["split"]["test"]
    assert sum(np.asarray(c).sum() for c in conf["per_lab"].values()) == ev["split"]["test"]
    # A learnt model on the large lab, well above chance (0.2), even after three epochs.
    assert ev["test_per_lab"]["PBC-dev"]["balanced_accuracy"] > 0.6, out[-3000:]
    preds = pd.read_csv(root / "model" / "test_predictions.csv")
    assert set(preds.source) == {"KRD-WBC", "PBC-dev"}
