import math

import numpy as np
import pytest
from sklearn.metrics import balanced_accuracy_score, f1_score

from wbc_spark.metrics import (
    classification_report,
    confusion,
    confusion_png,
    expected_calibration_error,
    macro_f1,
    softmax,
    wilson,
)


def test_wilson_known_values():
    lo, hi = wilson(8, 10)
    assert lo == pytest.approx(0.4902, abs=1e-3) and hi == pytest.approx(0.9433, abs=1e-3)
    assert wilson(0, 5)[0] == 0.0 and wilson(5, 5)[1] == 1.0
    assert all(math.isnan(v) for v in wilson(0, 0))


def test_softmax_matches_torch_and_survives_large_logits():
    import torch

    logits = np.array([[2.0, -1.0, 0.5], [1000.0, 999.0, -1000.0]])
    p = softmax(logits, temperature=0.5)
    expected = torch.softmax(torch.as_tensor(logits) / 0.5, dim=1).numpy()
    assert np.isfinite(p).all()
    np.testing.assert_allclose(p, expected, rtol=1e-12)
    np.testing.assert_allclose(p.sum(1), 1.0)
    # A higher temperature flattens: the top class loses probability.
    assert softmax(logits[:1], 2.0)[0, 0] < softmax(logits[:1], 1.0)[0, 0] < p[0, 0]


def test_scores_match_sklearn():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 4, 300)
    p = np.where(rng.random(300) < 0.7, y, rng.integers(0, 4, 300))
    assert macro_f1(y, p, 4) == pytest.approx(f1_score(y, p, average="macro"))
    r = classification_report(y, p, ["a", "b", "c", "d"])
    assert r["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, p))
    assert r["accuracy"] == pytest.approx((y == p).mean())
    lo, hi = r["macro_f1_ci"]
    assert lo < r["macro_f1"] < hi
    assert np.array_equal(np.array(r["confusion"]), confusion(y, p, 4))


def test_ece_perfect_and_overconfident():
    y = np.array([0, 1, 0, 1])
    assert expected_calibration_error(np.eye(2)[y], y) == pytest.approx(0.0)
    wrong = np.eye(2)[1 - y] * 0.98 + 0.01
    assert expected_calibration_error(wrong, y) == pytest.approx(0.99)


def test_confusion_png(tmp_path):
    confusion_png([[3, 1], [0, 5]], ["Neutrophil", "Basophil"], str(tmp_path / "c.png"))
    assert (tmp_path / "c.png").stat().st_size > 500


def test_mean_probs_averages_the_views_softmax():
    from wbc_spark.metrics import mean_probs, softmax

    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 4, 5))
    out = mean_probs(logits, 2.0)
    assert out.shape == (4, 5) and np.allclose(out.sum(1), 1.0)
    assert np.allclose(out, (softmax(logits[0], 2) + softmax(logits[1], 2)
                             + softmax(logits[2], 2)) / 3)
    assert np.array_equal(mean_probs(logits[:1], 2.0), softmax(logits[0], 2.0))
