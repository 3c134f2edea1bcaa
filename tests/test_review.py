import numpy as np
import pandas as pd
import pytest
from conftest import CLASSES, jpeg_bytes, smear
from PIL import Image

from wbc_spark import artifact, review
from wbc_spark.config import ConfigError, ReviewConfig, load_config
from wbc_spark.score import classify_frame


def test_gaussian_distance_is_small_inside_and_large_outside():
    rng = np.random.default_rng(0)
    means = rng.normal(0, 3, (3, 20))
    y = rng.integers(0, 3, 600)
    x = means[y] + rng.normal(0, 1, (600, 20))
    g = review.Gaussian.fit(x, y, 3)
    inside = g.distance(means[y[:100]] + rng.normal(0, 1, (100, 20)))
    outside = g.distance(rng.normal(0, 1, (100, 20)) + 10)
    assert 0.5 < np.median(inside) < 1.5  # a squared distance per dimension of unit noise
    assert inside.max() < outside.min()


def test_gaussian_survives_a_missing_class_and_a_state_round_trip():
    rng = np.random.default_rng(1)
    x, y = rng.normal(0, 1, (50, 8)), np.repeat([0, 2], 25)
    g = review.Gaussian.fit(x, y, 3)
    assert g.means.shape == (2, 8)
    again = review.Gaussian.from_state(g.to_state())
    assert np.allclose(again.distance(x), g.distance(x))


def test_lab_detector_keeps_a_threshold_per_lab_and_flags_a_new_lab():
    rng = np.random.default_rng(2)
    # Lab A: tight; lab B: spread three times wider; both two classes.
    def lab(center, spread, n):
        y = rng.integers(0, 2, n)
        return center + 3 * y[:, None] + rng.normal(0, spread, (n, 10)), y
    xa, ya = lab(0.0, 1.0, 400)
    xb, yb = lab(20.0, 3.0, 400)
    det = review.LabDetector.fit(np.r_[xa, xb], np.r_[["A"] * 400, ["B"] * 400], np.r_[ya, yb])
    assert det.labs == ["A", "B"] and len(det.component_lab) == 4
    va, vya = lab(0.0, 1.0, 200)
    vb, vyb = lab(20.0, 3.0, 200)
    da, la = det.nearest(va)
    db, lb = det.nearest(vb)
    assert (la == 0).all() and (lb == 1).all()
    det.thresholds = np.array([np.quantile(da, 0.95), np.quantile(db, 0.95)])
    assert det.thresholds[1] > det.thresholds[0]  # lab B's own cells set its bar
    assert 0.02 < det.beyond(vb)[1].mean() < 0.1 and 0.02 < det.beyond(va)[1].mean() < 0.1
    new, _ = lab(10.0, 1.0, 200)  # a lab between them, looking like neither
    assert det.beyond(new)[1].mean() > 0.9
    assert not det.beyond(new, override=1e9)[1].any()
    again = review.LabDetector.from_state(det.to_state())
    assert np.array_equal(again.beyond(new)[1], det.beyond(new)[1])


def test_confidence_threshold_keeps_the_cells_expected_to_reach_the_target():
    conf = np.array([0.6, 0.99, 0.8, 0.95, 0.7, 0.98, 0.9])
    t, coverage = review.confidence_threshold(conf, 0.95)  # running means .99 .985 .973 .955
    assert t == 0.9 and coverage == pytest.approx(4 / 7)
    assert conf[conf >= t].mean() >= 0.95 > conf[conf >= 0.8].mean()
    assert review.confidence_threshold(conf, 0.99) == (0.99, pytest.approx(1 / 7))
    assert review.confidence_threshold(conf, 0.999) == (1.0, 0.0)  # none expected so sure


def test_an_expected_confidence_threshold_varies_less_than_a_counted_one():
    """Validation splits of 600 cells from one calibrated model (each cell right with its
    probability): counting the few errors among the surest cells moves a counted threshold's
    coverage far more than the calibrated expectation moves."""
    rng = np.random.default_rng(7)

    def counted(conf, correct, target):
        order = np.argsort(-conf)
        accuracy = np.cumsum(correct[order]) / np.arange(1, len(conf) + 1)
        return (np.flatnonzero(accuracy >= target)[-1] + 1) / len(conf)

    expected, counts = [], []
    for _ in range(20):
        conf = 1 - rng.beta(0.6, 12, 600)
        correct = rng.random(600) < conf
        expected.append(review.confidence_threshold(conf, 0.995)[1])
        counts.append(counted(conf, correct, 0.995))
    assert np.std(expected) < np.std(counts) / 2


def test_flags_add_every_reason_that_holds():
    d = review.ReviewModel(None, None, confidence_threshold=0.8, cell_threshold=2.0,
                           lab_threshold=1.0, validation={})
    reasons = review.flags(np.array([0.9, 0.5, 0.9, 0.5]), np.array([1.0, 1.0, 3.0, 3.0]),
                           np.array([True, True, True, False]), d)
    assert reasons == [None, "low_confidence", "not_a_known_cell",
                       "no_cell_found;not_a_known_cell;low_confidence"]


def test_shift_alarm_needs_a_share_clearly_above_the_bar():
    assert review.shift_alarm(3, 60, 0.25) == (0.05, False)  # a trained lab's 5%
    assert review.shift_alarm(40, 60, 0.25)[1]  # most cells beyond the range
    assert not review.shift_alarm(9, 9, 0.25)[1] and review.shift_alarm(10, 10, 0.25)[1]
    assert review.shift_alarm(5, 5, 0.25, min_cells=5)[1]
    assert np.isnan(review.shift_alarm(0, 0, 0.25)[0])


def test_review_thresholds_are_overridable_and_checked():
    c = load_config(None, ["review.confidence_threshold=0.9", "review.alarm_share=0.4"])
    assert c.review.confidence_threshold == 0.9 and c.review.alarm_share == 0.4
    with pytest.raises(ConfigError, match="review.target_accuracy"):
        load_config(None, ["review.target_accuracy=1.5"])
    with pytest.raises(ConfigError, match="review.cell_threshold"):
        load_config(None, ["review.cell_threshold=-1"])


def test_scoring_flags_what_is_not_a_smear_and_keeps_its_prediction(tiny_artifact):
    model, meta = artifact.load(tiny_artifact)
    rng = np.random.default_rng(0)
    noise = Image.fromarray(rng.integers(0, 256, (256, 256, 3), dtype=np.uint8))
    blank = Image.new("RGB", (256, 256), (205, 200, 180))
    data = pd.Series([jpeg_bytes(smear(seed=7, radius=30)), jpeg_bytes(noise),
                      jpeg_bytes(blank), b"junk"])
    out = classify_frame(data, model, meta, "image")
    assert not out.loc[0, "needs_review"] or out.loc[0, "review_reason"] == "low_confidence"
    assert "not_a_known_cell" in out.loc[1, "review_reason"]
    assert "no_cell_found" in out.loc[2, "review_reason"]
    assert out.loc[3, "review_reason"] == "unreadable" and out.loc[3, "needs_review"]
    flagged = out.iloc[:3]
    assert flagged.predicted_class.notna().all()  # the flag adds, it does not hide
    assert (out.loc[1, "cell_distance"] > out.loc[0, "cell_distance"])
    # An override replaces the model's threshold: everything becomes low-confidence.
    strict = classify_frame(data[:1], model, meta, "image",
                            thresholds={"confidence_threshold": 1.01, "cell_threshold": 1e9,
                                        "lab_threshold": 1e9})
    assert strict.loc[0, "review_reason"] == "low_confidence"
    assert strict.loc[0, "beyond_lab_range"] == False  # noqa: E712


def test_model_id_changes_with_the_calibration(tiny_artifact, tmp_path):
    model, meta = artifact.load(tiny_artifact)
    ids = set()
    for t in (1.0, 1.5):
        ids.add(artifact.save(tmp_path / f"m{t}.pt", model, classes=CLASSES, source="bvlc",
                              convention=model.normalize.convention if hasattr(
                                  model.normalize, "convention") else _convention(meta),
                              preprocessing={"crop_size": 224, "context": 1.5}, config={},
                              provenance={}, metrics={}, temperature=t, review=meta["review"]))
    assert len(ids) == 2


def _convention(meta):
    from wbc_spark.model.weights import InputConvention

    return InputConvention.from_dict(meta["preprocessing"]["input_convention"])


def test_pooled_is_what_embed_gives_the_lab_detector(fake_weights):
    # The last training rank sends pooled frozen outputs to rank 0 instead of the outputs:
    # the lab detector must see the same numbers either way.
    import torch

    from wbc_spark.model.transfer import build_classifier
    from wbc_spark.model.weights import load_bvlc

    model = build_classifier(load_bvlc(fake_weights), len(CLASSES)).eval()
    images = np.stack([np.asarray(smear(size=224, seed=s)) for s in range(5)])
    frozen = model.embed_frozen(torch.from_numpy(images)).to(torch.float16)
    pooled = review.pooled(frozen, batch=2)  # batches of 2: the last one is short
    assert pooled.shape == (5, frozen.shape[1])
    np.testing.assert_array_equal(pooled, review.embed(model, frozen)[2])
    assert not np.allclose(pooled[0], pooled[1])  # five different smears, five answers
    logits, cell, _ = review.embed(model, frozen)
    head_logits, head_cell = review.head(model, frozen, batch=2)  # embed without the pooling
    np.testing.assert_allclose(head_logits, logits, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(head_cell, cell, rtol=1e-5, atol=1e-6)
    given = np.zeros((5, frozen.shape[1]), np.float32)  # an aligned batch's unaligned pooling
    assert review.embed(model, frozen, lab_features=given)[2] is given
