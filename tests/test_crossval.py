import pandas as pd
import pytest
from conftest import smear

from wbc_spark.evaluation.crossval import cut_at_cell, load_dataset
from wbc_spark.preprocessing import ContractError, Preprocessing, of_dataset
from wbc_spark.transforms import locate_cell


def test_a_dataset_made_with_another_stain_setting_is_refused(tmp_path):
    rows = pd.DataFrame({"image_id": ["a", "b"], "label": ["Neutrophil", "Lymphocyte"],
                         "group": ["a", "b"], "sha256": ["1", "2"], "crop": [b"x", b"y"],
                         "source": ["lab", "lab"],
                         "crop_size": [1, 1], "context": [1.5, 1.5], "stain": ["none", "none"],
                         "image": [b"", b""], "cell_found": [True, True],
                         "mask": [None, None], "crop_box": [[0, 0, 1], [0, 0, 1]],
                         "width": [1, 1], "height": [1, 1], "path": ["a.jpg", "b.jpg"],
                         "ingested_at": pd.to_datetime(["2026-01-01", "2026-01-01"])})
    (tmp_path / "batch=1").mkdir()
    rows.to_parquet(tmp_path / "batch=1" / "part.parquet")
    classes = ["Neutrophil", "Lymphocyte"]
    assert len(load_dataset(str(tmp_path), classes, Preprocessing(1, 1.5, "none"))) == 2
    with pytest.raises(ContractError, match="crops were made as .*'none'.*'field'"):
        load_dataset(str(tmp_path), classes, Preprocessing(1, 1.5, "field"))
    with pytest.raises(ContractError, match="'context': 1.5.*'context': 2.0"):
        load_dataset(str(tmp_path), classes, Preprocessing(1, 2.0, "none"))


def test_a_dataset_mixing_contracts_or_without_context_is_refused():
    with pytest.raises(ContractError, match="made in 2 ways"):
        of_dataset([(224, 1.5, "none"), (224, 1.5, "surround")], "ds")
    with pytest.raises(ContractError, match="before the crop context was stored"):
        of_dataset([(224, None, "none")], "ds")
    assert of_dataset([(224, 1.5, None)] * 3, "ds") == Preprocessing(224, 1.5, "none")


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
    labels = np.arange(n) % 2
    feats = torch.randn(n, 832, 7, 7) + torch.as_tensor(labels, dtype=torch.float32)[
        :, None, None, None]
    meta = pd.DataFrame({"image_id": [f"i{i}" for i in range(n)],
                         "label": np.where(labels == 1, "B", "A"),
                         "group": [f"g{i}" for i in range(n)],
                         "sha256": [f"h{i}" for i in range(n)],
                         "source": np.where(np.arange(n) < n // 2, "lab1", "lab2")})
    recipe = Recipe(epochs=1, batch_size=8, sampling="lab_class")
    r = run_fold(model, feats[None], {"original": feats}, labels, meta, recipe, folds=4,
                 fold=0, val_fraction=0.25, num_classes=2)
    assert r.probs["original"].shape == (len(r.test_index), 2)
    assert set(meta.source[r.test_index]) == {"lab1", "lab2"}
