"""The corrected differential (wbc_spark.differential) on synthetic counts."""

import numpy as np
import pytest

from wbc_spark.differential import (Confusion, ConfusionError, counts_as_cell, estimate,
                                    scope_lab)

CLASSES = ("Neutrophil", "Lymphocyte", "Monocyte", "Eosinophil", "Basophil")
K = len(CLASSES)


def outcome_rates(monocyte_as_lymphocyte: float = 0.25, excluded: float = 0.02) -> np.ndarray:
    """Rows: true class; columns: counted as each class, then excluded."""
    a = np.zeros((K, K + 1))
    for i in range(K):
        a[i, i], a[i, K] = 1 - excluded, excluded
    a[2, 1], a[2, 2] = monocyte_as_lymphocyte, 1 - excluded - monocyte_as_lymphocyte
    return a


def simulate(rates: np.ndarray, share: np.ndarray, cells: int, slides: int, seed: int):
    """True counts per slide and the counted predictions the model would make."""
    rng = np.random.default_rng(seed)
    true = rng.multinomial(cells, share, slides)
    counted = np.zeros((slides, K), np.int64)
    for i in range(K):
        counted += rng.multinomial(true[:, i], rates[i])[:, :K]
    return true, counted


def held_out(rates: np.ndarray, per_class: int = 400) -> Confusion:
    return Confusion(CLASSES, np.round(rates * per_class).astype(int))


def test_counts_as_cell():
    assert counts_as_cell(None) and counts_as_cell("low_confidence")
    assert counts_as_cell("not_a_known_cell;low_confidence")  # flagged, and counted
    for reason in ("no_cell_found", "no_cell_found;low_confidence", "unreadable"):
        assert not counts_as_cell(reason)


def test_confusion_from_predictions_and_state():
    conf = Confusion.from_predictions(
        CLASSES, true=np.array([0, 0, 2, 2, 4]), predicted=np.array([0, 1, 1, 2, 4]),
        reasons=[None, "low_confidence", None, "no_cell_found", None],
        labs=["A", "A", "B", "B", "B"])
    assert conf.counts[0, 0] == 1 and conf.counts[0, 1] == 1  # low confidence still counts
    assert conf.counts[2, 1] == 1 and conf.counts[2, K] == 1  # excluded: last column
    assert conf.counts.sum() == 5
    assert conf.per_lab["A"].sum() == 2 and conf.per_lab["B"][2, K] == 1
    again = Confusion.from_state(conf.to_state())
    assert again.classes == CLASSES and np.array_equal(again.counts, conf.counts)
    assert np.array_equal(again.per_lab["B"], conf.per_lab["B"])
    with pytest.raises(ConfusionError, match="for classes"):
        again.check(CLASSES[::-1])
    with pytest.raises(ConfusionError, match="5 x 6"):
        Confusion(CLASSES, np.ones((K, K), int))


def test_no_confusion_keeps_the_counted_shares():
    conf = held_out(outcome_rates(monocyte_as_lymphocyte=0.0, excluded=0.0))
    e = estimate(np.array([120, 60, 12, 6, 2]), conf)
    raw = np.array([120, 60, 12, 6, 2]) / 200
    assert np.abs(e.share - raw).max() < 0.01
    assert ((e.low <= raw) & (raw <= e.high)).all()
    assert e.share.sum() == pytest.approx(1.0)


def test_a_known_confusion_is_undone():
    rates = outcome_rates(monocyte_as_lymphocyte=0.25)
    share = np.array([0.55, 0.30, 0.10, 0.04, 0.01])
    _, counted = simulate(rates, share, cells=20000, slides=1, seed=1)
    e = estimate(counted[0], held_out(rates))
    raw = counted[0] / counted[0].sum()
    assert raw[2] < 0.08 and raw[1] > 0.32            # the raw count is biased...
    assert abs(e.share[2] - 0.10) < 0.01 and abs(e.share[1] - 0.30) < 0.01  # ...this is not
    assert e.low[2] <= 0.10 <= e.high[2]


def test_a_class_excluded_more_often_is_not_undercounted():
    rates = outcome_rates(monocyte_as_lymphocyte=0.0)
    rates[3, 3], rates[3, K] = 0.5, 0.5               # half the eosinophils flagged away
    share = np.array([0.5, 0.3, 0.1, 0.08, 0.02])
    _, counted = simulate(rates, share, cells=20000, slides=1, seed=2)
    e = estimate(counted[0], held_out(rates))
    assert counted[0, 3] / counted[0].sum() < 0.05
    assert abs(e.share[3] - 0.08) < 0.01


def test_intervals_cover_the_true_share_and_the_correction_beats_raw_counts():
    rates = outcome_rates(monocyte_as_lymphocyte=0.2)
    share = np.array([0.55, 0.30, 0.10, 0.04, 0.01])
    true, counted = simulate(rates, share, cells=200, slides=300, seed=3)
    e = estimate(counted, held_out(rates))
    covered = ((e.low <= share) & (share <= e.high)).mean(0)
    assert (covered >= 0.88).all() and (covered <= 0.995).all(), covered
    truth = true / 200
    raw_err = np.abs(counted / counted.sum(1, keepdims=True) - truth).mean(0)
    corrected_err = np.abs(e.share - truth).mean(0)
    assert corrected_err[2] < raw_err[2] / 2 and corrected_err[1] < raw_err[1]


def test_uncertain_confusion_widens_the_interval():
    rates = outcome_rates(monocyte_as_lymphocyte=0.2)
    counts = np.array([110, 62, 18, 8, 2])
    sure = estimate(counts, held_out(rates, per_class=2000))
    unsure = estimate(counts, held_out(rates, per_class=10))
    assert (unsure.high - unsure.low)[2] > (sure.high - sure.low)[2]


def test_a_scope_is_corrected_for_the_lab_most_of_its_cells_lie_nearest_to():
    assert scope_lab({"KRD-WBC": 3, "PBC-dev": 9}) == "PBC-dev"
    assert scope_lab({"KRD-WBC": 5, "PBC-dev": 5}) == "KRD-WBC"  # a tie: the first listed
    assert scope_lab({"KRD-WBC": 0, "PBC-dev": 0}) is None  # none placed: the pooled
    assert scope_lab({}) is None


def test_empty_scope_and_bad_counts():
    conf = held_out(outcome_rates())
    e = estimate(np.array([[0, 0, 0, 0, 0], [10, 5, 1, 0, 0]]), conf)
    assert np.isnan(e.share[0]).all() and not np.isnan(e.share[1]).any()
    with pytest.raises(ConfusionError, match="4 counts for 5 classes"):
        estimate(np.array([1, 2, 3, 4]), conf)
    with pytest.raises(ConfusionError, match="negative"):
        estimate(np.array([1, -2, 3, 4, 5]), conf)


def test_same_counts_same_estimate():
    conf = held_out(outcome_rates())
    a, b = estimate(np.array([50, 30, 5, 3, 1]), conf), estimate(np.array([50, 30, 5, 3, 1]), conf)
    assert np.array_equal(a.share, b.share) and np.array_equal(a.low, b.low)


def test_per_class_rows_estimate_each_scope_on_its_own():
    import pandas as pd

    from wbc_spark.score import PER_CLASS_SCHEMA, per_class_rows

    classes = list(CLASSES)

    def scope(name, top, counted, flagged=0):
        return {"model_id": "m", "scope": name, **dict(zip(classes, top)),
                **{f"counted_{c}": v for c, v in zip(classes, counted)},
                **{f"flagged_{c}": flagged for c in classes},
                "n_shift": sum(top), "n_beyond": 0, "n_errors": 1}

    a = {**scope("a", [60, 30, 6, 3, 1], [58, 30, 5, 3, 1], flagged=1), "lab_0": 90,
         "lab_1": 7}
    empty = scope("b", [2, 0, 0, 0, 0], [0, 0, 0, 0, 0])
    pooled = held_out(outcome_rates())
    conf = Confusion(CLASSES, pooled.counts, {"L1": pooled.counts, "L2": pooled.counts})
    now = pd.Timestamp("2026-01-01")
    labs = ["L1", "L2"]
    both = per_class_rows(pd.DataFrame([a, empty]), classes, conf, 0.25, 10, now, labs)
    alone = per_class_rows(pd.DataFrame([a]), classes, conf, 0.25, 10, now, labs)
    assert list(both.columns) == PER_CLASS_SCHEMA.fieldNames()
    rows_a = both[both.slide == "a"].reset_index(drop=True)
    pd.testing.assert_frame_equal(rows_a, alone)  # the batch does not change a scope's numbers
    assert rows_a.counted_total.iloc[0] == 97 and (rows_a.excluded == 3).all()
    assert rows_a.corrected_fraction.sum() == pytest.approx(1.0)
    assert rows_a["count"].tolist() == [60, 30, 6, 3, 1] and (rows_a.classified == 100).all()
    assert (rows_a.confusion_lab == "L1").all()  # most cells lie nearest to L1
    rows_b = both[both.slide == "b"]
    assert rows_b.corrected_fraction.isna().all() and (rows_b.excluded == 2).all()
    assert (rows_b.confusion_lab == "pooled").all()


def test_a_lab_is_corrected_with_its_own_confusion_shrunk_to_the_pooled_one():
    from wbc_spark.differential import PRIOR_CELLS

    own = np.round(outcome_rates(monocyte_as_lymphocyte=0.4) * 100).astype(int)
    other = np.round(outcome_rates(monocyte_as_lymphocyte=0.0) * 1000).astype(int)
    conf = Confusion(CLASSES, own + other, {"A": own, "B": other})
    a = conf.for_lab("A")
    assert a.counts.sum(1) == pytest.approx(own.sum(1) + PRIOR_CELLS)
    assert a.counts[2, 1] > 0.3 * a.counts[2].sum()  # lab A's own confusion dominates
    assert np.array_equal(conf.for_lab(None).counts, conf.counts)
    assert np.array_equal(conf.for_lab("unknown lab").counts, conf.counts)
    counts = np.array([100, 70, 10, 8, 2])  # lab A's cells: many monocytes called lymphocytes
    assert estimate(counts, a).share[2] > estimate(counts, conf.for_lab("B")).share[2] + 0.02
