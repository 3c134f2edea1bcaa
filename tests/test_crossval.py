import copy

import pandas as pd
import pytest
from conftest import smear

from wbc_spark.evaluation.crossval import cut_at_cell, load_dataset
from wbc_spark.preprocessing import ContractError, Preprocessing, of_dataset
from wbc_spark.transforms import cell_crop, locate_cell


def test_a_dataset_made_with_another_stain_setting_is_refused(tmp_path):
    rows = pd.DataFrame({"image_id": ["a", "b"], "label": ["Neutrophil", "Lymphocyte"],
                         "group": ["a", "b"], "sha256": ["1", "2"], "crop": [b"x", b"y"],
                         "source": ["lab", "lab"],
                         "crop_size": [1, 1], "context": [1.5, 1.5], "stain": ["none", "none"],
                         "framing": ["fit", "fit"],
                         "image": [b"", b""], "cell_found": [True, True],
                         "mask": [None, None], "crop_box": [[0, 0, 1], [0, 0, 1]],
                         "width": [1, 1], "height": [1, 1], "path": ["a.jpg", "b.jpg"],
                         "ingested_at": pd.to_datetime(["2026-01-01", "2026-01-01"])})
    (tmp_path / "batch=1").mkdir()
    rows.to_parquet(tmp_path / "batch=1" / "part.parquet")
    classes = ["Neutrophil", "Lymphocyte"]
    assert len(load_dataset(str(tmp_path), classes, Preprocessing(1, 1.5, "none", "fit"))) == 2
    with pytest.raises(ContractError, match="crops were made as .*'none'.*'field'"):
        load_dataset(str(tmp_path), classes, Preprocessing(1, 1.5, "field", "fit"))
    with pytest.raises(ContractError, match="'context': 1.5.*'context': 2.0"):
        load_dataset(str(tmp_path), classes, Preprocessing(1, 2.0, "none", "fit"))
    with pytest.raises(ContractError, match="'framing': 'fit'.*'framing': 'reflect'"):
        load_dataset(str(tmp_path), classes, Preprocessing(1, 1.5, "none", "reflect"))
    # A dataset ingested before the framing was stored: refused, not taken for either.
    rows.drop(columns="framing").to_parquet(tmp_path / "batch=1" / "part.parquet")
    with pytest.raises(ContractError, match="before the crop framing was stored"):
        load_dataset(str(tmp_path), classes, Preprocessing(1, 1.5, "none", "reflect"))


def test_a_dataset_mixing_contracts_or_without_context_is_refused():
    with pytest.raises(ContractError, match="made in 2 ways"):
        of_dataset([(224, 1.5, "none", "fit"), (224, 1.5, "surround", "fit")], "ds")
    with pytest.raises(ContractError, match="made in 2 ways"):
        of_dataset([(224, 1.5, "none", "fit"), (224, 1.5, "none", "reflect")], "ds")
    with pytest.raises(ContractError, match="before the crop context was stored"):
        of_dataset([(224, None, "none", "fit")], "ds")
    assert of_dataset([(224, 1.5, None, "fit")] * 3, "ds") == Preprocessing(224, 1.5, "none",
                                                                            "fit")


@pytest.mark.parametrize("side", range(4))
def test_cut_at_cell_puts_the_frame_edge_at_the_cell(side):
    """The cell stays whole and is found again; its crop box now reaches a sixth of its side
    past the new edge (where crop_box reflects), on the side that was cut and no other."""
    field = smear(256, (128, 128), radius=20)
    before, _, _ = locate_cell(field)
    cut = cut_at_cell(field, side, 1 / 3, context=1.5)
    after, _, _ = locate_cell(cut)
    # The locator works on a 128 x 128 grid of the field, so a smaller field moves it by a few
    # pixels.
    assert after.found and abs(after.side - before.side) <= 0.1 * before.side
    w, h = cut.size
    beyond = [after.left + after.side - w, -after.top, -after.left, after.top + after.side - h]
    assert abs(beyond[side] - before.side / 6) <= 0.1 * before.side
    assert all(b <= 0 for i, b in enumerate(beyond) if i != side)


def test_summary_counts_other_classes_called_each_class():
    import numpy as np

    from wbc_spark.evaluation.crossval import FoldResult, format_summary, summarise

    classes = ["A", "B", "C"]
    labels = np.array([0, 0, 1, 1, 2, 2])
    # Every image predicted A, except one C image predicted B.
    probs = np.tile([0.8, 0.1, 0.1], (6, 1))
    probs[5] = [0.1, 0.8, 0.1]
    runs = [FoldResult(0, f, idx, {"original": probs[idx]}, 0, 1.0, 0.0, 4, None)
            for f, idx in enumerate([np.array([0, 2, 4]), np.array([1, 3, 5])])]
    called = summarise(runs, labels, classes)["original"]["others_called"]
    # Non-A images: two B (both called A) and two C (one called A, one B).
    assert called == pytest.approx({"A": 3 / 4, "B": 1 / 4, "C": 0.0})
    assert "B 25.0%" in format_summary(summarise(runs, labels, classes), classes)


def test_outside_frame_share_per_class():
    from wbc_spark.evaluation.crossval import outside_frame

    df = pd.DataFrame({"label": ["A", "A", "B"], "width": [100, 100, 100],
                       "height": [100, 100, 100],
                       "crop_box": [[10, 10, 50], [-10, 20, 50], [60, 60, 50]]})
    out = outside_frame(df)
    assert out.loc["A", "outside"] == 0.5 and out.loc["A", "mean_share"] == pytest.approx(0.1)
    assert out.loc["B", "outside"] == 1.0 and out.loc["B", "mean_share"] == pytest.approx(0.2)


def _fold_inputs(sources, generator=None):
    """Labels, frozen-layer outputs and dataset rows for ``run_fold``: one image per entry
    of ``sources`` (its lab), two classes alternating, class B's outputs shifted up by 1."""
    import numpy as np
    import torch

    n = len(sources)
    labels = np.arange(n) % 2
    feats = torch.randn(n, 832, 7, 7, generator=generator) + torch.as_tensor(
        labels, dtype=torch.float32)[:, None, None, None]
    meta = pd.DataFrame({"image_id": [f"i{i}" for i in range(n)],
                         "label": np.where(labels == 1, "B", "A"),
                         "group": [f"g{i}" for i in range(n)],
                         "sha256": [f"h{i}" for i in range(n)], "source": sources})
    return labels, feats, meta


def test_a_fold_trains_with_lab_and_class_sampling():
    """``run_fold`` passes each image's lab (``meta.source``) on: the default recipe samples
    by lab and class and refuses to train without them."""
    import numpy as np
    import torch

    from wbc_spark.evaluation.crossval import run_fold
    from wbc_spark.model.googlenet import BVLCGoogLeNet
    from wbc_spark.model.transfer import WBCNet
    from wbc_spark.model.weights import CAFFE_CONVENTION
    from wbc_spark.train import Recipe

    torch.manual_seed(0)
    n = 40
    model = WBCNet(BVLCGoogLeNet(), CAFFE_CONVENTION, 2, freeze_until="inception4e")
    labels, feats, meta = _fold_inputs(np.where(np.arange(n) < n // 2, "lab1", "lab2"))
    recipe = Recipe(epochs=1, batch_size=8, sampling="lab_class")
    r = run_fold(model, feats[None], {"original": feats}, labels, meta, recipe, folds=4,
                 fold=0, val_fraction=0.25, num_classes=2)
    assert r.probs["original"].shape == (len(r.test_index), 2)
    assert set(meta.source[r.test_index]) == {"lab1", "lab2"}


def test_a_fold_is_the_same_whatever_state_the_process_started_in():
    """Two processes running one (seed, fold) get one model: the new head's starting weights
    are drawn from the recipe's seed, not from the generator's state when the model was
    built (which differed per process, so "paired" runs were paired in everything but the
    head's start). A different seed still starts elsewhere."""
    import numpy as np
    import torch

    from wbc_spark.evaluation.crossval import run_fold
    from wbc_spark.model.googlenet import BVLCGoogLeNet
    from wbc_spark.model.transfer import WBCNet
    from wbc_spark.model.weights import CAFFE_CONVENTION
    from wbc_spark.train import Recipe

    labels, feats, meta = _fold_inputs(np.array(["lab"] * 24),
                                       torch.Generator().manual_seed(0))
    trunk = BVLCGoogLeNet()
    results = []
    for process_seed, recipe_seed in ((1, 0), (2, 0), (1, 7)):
        torch.manual_seed(process_seed)  # the state a process happens to build the model in
        model = WBCNet(copy.deepcopy(trunk), CAFFE_CONVENTION, 2,
                       freeze_until="inception4e")
        recipe = Recipe(epochs=1, batch_size=8, sampling="shuffle", seed=recipe_seed)
        results.append(run_fold(model, feats[None], {"original": feats}, labels, meta,
                                recipe, folds=3, fold=0, val_fraction=0.25,
                                num_classes=2).probs["original"])
    assert np.array_equal(results[0], results[1])
    assert not np.array_equal(results[0], results[2])


def _two_labs(seed: int = 0):
    """70 images' outputs: lab A (40), then lab B (30) with shifted and rescaled channels."""
    import numpy as np
    import torch

    rng = np.random.default_rng(seed)
    labs = np.array(["A"] * 40 + ["B"] * 30)
    feats = rng.gamma(2.0, 1.0, (70, 3, 4, 4))
    feats[labs == "B"] = feats[labs == "B"] * np.array([3.0, 0.5, 1.0])[:, None, None] + 2.0
    keys = np.array([f"{(37 * i) % 70:03d}" for i in range(70)])  # SHA order != row order
    return labs, torch.tensor(feats, dtype=torch.float16), keys


def test_lab_alignment_measures_training_labs_on_training_rows_a_new_lab_on_its_own():
    import numpy as np

    from wbc_spark.align import Moments
    from wbc_spark.evaluation.crossval import lab_alignment

    labs, feats, keys = _two_labs()
    tr, te = np.arange(0, 30), np.arange(40, 70)  # B is never trained on
    a = lab_alignment(feats, labs, keys, tr, te, per_lab=8)
    assert set(a.labs) == {"A", "B"} and a.labs["A"].images == a.labs["B"].images == 8
    smallest_a = tr[np.argsort(keys[tr])[:8]]  # the profile's sample: smallest keys first
    assert np.allclose(a.labs["A"].total, Moments.of(feats[smallest_a]).total)
    assert np.allclose(a.reference.total, a.labs["A"].total)  # one training lab
    aligned = a.apply(feats[te], labs[te])
    ref, before, got = a.reference, Moments.of(feats[te]), Moments.of(aligned)
    assert np.abs(got.mean - ref.mean).max() < 0.3 < np.abs(before.mean - ref.mean).max()
    # A lab seen in training keeps its training moments, even when it is tested too.
    both = lab_alignment(feats, labs, keys, np.arange(0, 60), np.arange(30, 70), per_lab=100)
    assert both.labs["B"].images == 20 and both.labs["A"].images == 40


def test_lab_alignment_counts_a_copy_once():
    import numpy as np

    from wbc_spark.evaluation.crossval import lab_alignment

    labs, feats, keys = _two_labs()
    keys[:10] = "000"  # ten copies of one image in lab A
    a = lab_alignment(feats, labs, keys, np.arange(40), np.arange(40, 70))
    assert a.labs["A"].images == 31


class _StubModel:
    """What train_and_test asks of a model when fit and predict are replaced."""

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass

    def init_head(self):
        pass


def test_train_and_test_with_align_feeds_the_head_aligned_outputs_and_refuses_without_keys():
    import numpy as np
    import pytest
    import torch

    from wbc_spark.evaluation import crossval

    labs, feats, keys = _two_labs()
    seen = {}

    def fake_fit(model, head, batches, steps, val, recipe, num_classes, counts, val_labs=None):
        seen["val"], seen["val_labs"] = val[0], val_labs
        return type("R", (), {"temperature": 1.0})()

    def fake_predict(model, f, temperature):
        seen.setdefault("test", []).append(f)
        return np.zeros((len(f), 2))

    tr, va, te = np.arange(0, 30), np.arange(30, 40), np.arange(40, 70)
    mp = pytest.MonkeyPatch()
    with mp.context() as m:
        m.setattr(crossval, "fit", fake_fit)
        m.setattr(crossval, "HeadOnly", lambda model: None)
        m.setattr(crossval, "predict_probs", fake_predict)
        m.setattr(crossval, "class_activation_maps", lambda model, f: (None, None))
        args = (_StubModel(), torch.stack([feats, feats]), {"original": feats}, np.arange(70) % 2,
                tr, va, te, crossval.Recipe(epochs=1, batch_size=8), 2)
        crossval.train_and_test(*args, labs=labs, align=False)
        plain = seen.pop("test")[0]
        # The validation rows' labs go to fit (train.selection=lab_mean weighs them).
        assert list(seen["val_labs"]) == list(labs[va])
        crossval.train_and_test(*args, labs=labs, align=True, keys=keys)
        aligned = seen.pop("test")[0]
        with pytest.raises(ValueError, match="SHA-256"):
            crossval.train_and_test(*args, labs=labs, align=True)
    assert torch.equal(plain, feats[te])
    a = crossval.lab_alignment(feats, labs, keys, tr, te)
    assert torch.equal(aligned, a.apply(feats[te], labs[te]))
    assert not torch.equal(aligned, plain)
    assert (feats[te].float().mean() - feats[tr].float().mean()).abs() > 1
    assert (aligned.float().mean() - feats[tr].float().mean()).abs() < 0.3


def test_flipped_views_are_scored_with_a_temperature_fitted_on_the_validation_views():
    import numpy as np
    import pytest
    import torch

    from wbc_spark.evaluation import crossval

    labs, feats, keys = _two_labs()
    calls = {"fit_temperature": [], "predict": [], "mean_probs": []}

    def fake_fit(model, head, batches, steps, val, recipe, num_classes, counts, val_labs=None):
        return type("R", (), {"temperature": 1.5})()

    def fake_temperature(logits, labels):
        calls["fit_temperature"].append((np.asarray(logits).shape, list(labels)))
        return 0.7

    def fake_predict(model, f, temperature):
        calls["predict"].append((len(f), temperature))
        return np.full((len(f), 2), 0.5)

    def fake_mean_probs(logits, temperature):
        calls["mean_probs"].append((np.asarray(logits).shape, temperature))
        return np.full(np.asarray(logits).shape[1:], 0.5)

    tr, va, te = np.arange(0, 30), np.arange(30, 40), np.arange(40, 70)
    y = np.arange(70) % 2
    views = torch.stack([feats, feats.flip(-1), feats.flip(-2)])  # 3 views x 70 images
    with pytest.MonkeyPatch().context() as m:
        m.setattr(crossval, "fit", fake_fit)
        m.setattr(crossval, "HeadOnly", lambda model: None)
        m.setattr(crossval, "head_logits", lambda model, f: np.zeros((len(f), 2)))
        m.setattr(crossval, "fit_temperature", fake_temperature)
        m.setattr(crossval, "predict_probs", fake_predict)
        m.setattr(crossval.metrics, "mean_probs", fake_mean_probs)
        m.setattr(crossval, "class_activation_maps", lambda model, f: (None, None))
        probs, _, _ = crossval.train_and_test(
            _StubModel(), torch.stack([feats, feats]), {"original": feats, "tta": views}, y, tr, va,
            te, crossval.Recipe(epochs=1, batch_size=8), 2, labs=labs)
    assert set(probs) == {"original", "tta"} and probs["tta"].shape == (30, 2)
    # One fit, on the 10 validation images' logits in each of the 3 views, with their labels.
    assert calls["fit_temperature"] == [((3, 10, 2), list(y[va]))]
    # The original crops keep the training's temperature; the mean of the 3 views' probabilities
    # gets the new one.
    assert calls["predict"] == [(30, 1.5)]
    assert calls["mean_probs"] == [((3, 30, 2), 0.7)]


def test_a_model_from_before_framing_is_cropped_as_it_was_trained():
    """An artifact that names no framing (or stain) was trained on reflected crops without
    standardisation: it gets those, not today's defaults."""
    import numpy as np

    pre = Preprocessing.from_artifact({"preprocessing": {"crop_size": 64, "context": 1.5}})
    assert (pre.stain, pre.framing) == ("none", "reflect")
    field = smear(256, (20, 20), radius=18)
    crop, box, _ = pre.crop_image(field)
    want, want_box, _ = cell_crop(field, 64, context=1.5, stain="none", framing="reflect")
    assert box == want_box and box.left < 0 and np.array_equal(crop, want)
    assert not np.array_equal(crop, cell_crop(field, 64, stain="none")[0])  # today's: "fit"
