import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

from wbc_spark.metrics import softmax
from wbc_spark.model.googlenet import BVLCGoogLeNet
from wbc_spark.model.transfer import WBCNet
from wbc_spark.model.weights import CAFFE_CONVENTION
from wbc_spark.train import (
    HeadOnly,
    Recipe,
    class_weights,
    feature_batches,
    fit,
    fit_temperature,
    frozen_features,
    make_optimizer,
    rank_batches,
    selection_score,
    train_one_epoch,
)


def test_class_weights():
    w = class_weights([100, 25, 4], "inverse_sqrt")
    assert w.mean().item() == pytest.approx(1.0)
    assert w[2] / w[0] == pytest.approx(5.0)
    assert torch.allclose(class_weights([3, 9], "none"), torch.ones(2))
    with pytest.raises(ValueError, match="choose none"):
        class_weights([1], "focal")


def test_temperature_recovers_a_known_scale():
    rng = np.random.default_rng(0)
    n, k = 4000, 4
    true = rng.normal(0, 2, (n, k))
    y = np.array([rng.choice(k, p=p) for p in softmax(true)])
    t = fit_temperature(true * 3.0, y)  # logits made 3x too confident
    assert t == pytest.approx(3.0, rel=0.15)


def test_temperature_of_averaged_views_is_fitted_on_their_mean_probabilities():
    rng = np.random.default_rng(1)
    n, k = 3000, 4
    true = rng.normal(0, 2, (n, k))
    y = np.array([rng.choice(k, p=p) for p in softmax(true)])
    # Four views that disagree by noise: each view's own temperature is too high for their
    # mean (averaging softens), the fit on the mean must land lower and give a lower NLL.
    views = np.stack([true + rng.normal(0, 1.5, (n, k)) for _ in range(4)])
    t_mean = fit_temperature(views, y)
    t_single = fit_temperature(views[0], y)
    assert t_mean < t_single

    def nll(t):
        mean = np.mean([softmax(v / t) for v in views], axis=0)
        return -np.log(mean[np.arange(n), y]).mean()

    assert nll(t_mean) < nll(t_single)
    assert nll(t_mean) <= min(nll(t_mean * 0.9), nll(t_mean * 1.1))


def test_optimizer_groups_use_discriminative_rates():
    net = WBCNet(BVLCGoogLeNet(), CAFFE_CONVENTION, 3, freeze_until="inception4e")
    opt, _ = make_optimizer(net, Recipe(lr=1e-2, block_lr_factor=0.1), steps=10)
    rates = sorted(g["lr"] for g in opt.param_groups)
    assert rates == pytest.approx([1e-3 * 0.1 * 10, 1e-2])  # warm-up starts below these
    n_opt = sum(p.numel() for g in opt.param_groups for p in g["params"])
    assert n_opt == sum(p.numel() for p in net.parameters() if p.requires_grad)


def test_trained_gradients_keep_their_parameters_layout():
    """DistributedDataParallel's gradient buckets follow the parameters' strides: a gradient
    in another layout (the channels-last frozen features give channels-last ones) is copied
    on every step and warned about."""
    torch.manual_seed(0)
    net = WBCNet(BVLCGoogLeNet(), CAFFE_CONVENTION, 5, freeze_until="inception4e")
    head = HeadOnly(net)
    with torch.no_grad():
        features = net.embed_frozen(torch.randint(0, 256, (2, 224, 224, 3), dtype=torch.uint8))
    head(features.float()).sum().backward()
    trained = [p for p in head.parameters() if p.requires_grad]
    assert any(p.dim() == 4 for p in trained)
    for p in trained:
        assert p.grad.stride() == p.stride(), p.shape


class TinyNet(nn.Module):
    """The WBCNet interface around a tiny network, so the loop itself is tested fast."""

    def __init__(self):
        super().__init__()
        self.frozen = nn.Sequential()
        self.trainable = nn.Sequential(nn.Linear(3, 8), nn.ReLU())
        self.fc = nn.Linear(8, 2)

    def embed_frozen(self, images):
        return images.float().mean((1, 2)) / 255

    def head(self, features):
        return self.fc(self.trainable(features))

    def forward(self, images):
        return self.head(self.embed_frozen(images))


def test_fit_learns_a_separable_problem_and_keeps_best_epoch():
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    net = TinyNet()
    # Two classes: dark vs bright 64 x 64 images.
    def batch(n):
        return dark_or_bright(rng, n)
    images, labels = batch(32)
    val = (net.embed_frozen(images), labels.numpy())
    head = HeadOnly(net)

    def epoch_batches(epoch):
        for _ in range(20):
            images, labels = batch(16)
            yield net.embed_frozen(images), labels

    result = fit(net, head, epoch_batches, 20, val,
                 Recipe(epochs=4, lr=5e-2, label_smoothing=0.0), 2, [32, 32])
    assert len(result.history) == 4
    assert result.best_val_macro_f1 == max(h["val_macro_f1"] for h in result.history)
    assert result.best_val_macro_f1 > 0.9
    assert 0.05 < result.temperature < 20
    assert not math.isnan(result.history[-1]["train_loss"])


def test_lab_mean_selection_weighs_a_small_lab_as_much_as_a_large_one():
    # A large lab all right, a small lab all wrong: pooled macro-F1 is high, lab_mean is half.
    big = np.array([0, 1, 2] * 30)
    small = np.array([0, 1, 2])
    labels = np.concatenate([big, small])
    predicted = np.concatenate([big, (small + 1) % 3])
    labs = np.array(["big"] * len(big) + ["small"] * len(small))
    pooled = selection_score(labels, predicted, 3)
    assert pooled > 0.9
    assert selection_score(labels, predicted, 3, "lab_mean", labs) == pytest.approx(0.5)
    # One lab only: the two rules agree.
    assert selection_score(big, big, 3, "lab_mean", labs[:len(big)]) == 1.0
    with pytest.raises(ValueError, match="needs the lab"):
        selection_score(labels, predicted, 3, "lab_mean")
    assert selection_score(labels, predicted, 3, "loss") == pooled  # reported, not chosen by
    with pytest.raises(ValueError, match="choose one of pooled, lab_mean, loss, last"):
        selection_score(labels, predicted, 3, "lab_max", labs)


def dark_or_bright(rng: np.random.Generator, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` 64 x 64 images of two classes, dark (0) and bright (1), with their labels."""
    y = rng.integers(0, 2, n)
    x = np.where(y[:, None, None, None] == 1, 200, 40) + rng.integers(-20, 20, (n, 64, 64, 3))
    return torch.from_numpy(x.astype(np.uint8)), torch.from_numpy(y)


def test_fit_chooses_the_epoch_by_the_recipes_selection_rule():
    # Validation: 60 images of lab A, 6 of lab B whose classes the model cannot tell apart
    # (their images are the mean image). Every rule sees the same history; lab_mean scores
    # every epoch lower (lab B's macro-F1 is at most about a half), pooled does not.
    torch.manual_seed(0)
    net = TinyNet()
    images, labels = dark_or_bright(np.random.default_rng(0), 60)
    grey = torch.full((6, 64, 64, 3), 120, dtype=torch.uint8)
    val = (net.embed_frozen(torch.cat([images, grey])),
           np.concatenate([labels.numpy(), [0, 1, 0, 1, 0, 1]]))
    val_labs = np.array(["A"] * 60 + ["B"] * 6)
    fresh = {k: v.clone() for k, v in net.state_dict().items()}

    def train(rule):
        net.load_state_dict(fresh)
        torch.manual_seed(1)
        rng = np.random.default_rng(1)
        batches = lambda epoch: ((net.embed_frozen(i), y) for i, y in  # noqa: E731
                                 (dark_or_bright(rng, 16) for _ in range(10)))
        return fit(net, HeadOnly(net), batches, 10, val,
                   Recipe(epochs=3, lr=5e-2, label_smoothing=0.0, selection=rule), 2, [30, 30],
                   val_labs=val_labs)

    pooled, lab_mean, by_loss, last = map(train, ("pooled", "lab_mean", "loss", "last"))
    assert pooled.best_val_macro_f1 > 0.85
    assert lab_mean.best_val_macro_f1 < 0.8
    assert lab_mean.best_val_macro_f1 == max(h["val_macro_f1"] for h in lab_mean.history)
    losses = [h["val_loss"] for h in by_loss.history]
    assert by_loss.history[by_loss.best_epoch]["val_loss"] == min(losses)
    assert pooled.best_epoch != by_loss.best_epoch  # the rules disagree here, so this tests
    assert last.best_epoch == 2
    assert last.best_val_macro_f1 == last.history[2]["val_macro_f1"]


def test_bf16_training_steps_keep_fp32_weights_and_learn():
    """``step_precision=bf16`` autocasts the trained blocks' forward pass only: the weights,
    their gradients and the optimiser state stay fp32 (bf16 weights would lose AdamW's small
    updates to rounding), and the blocks still learn."""
    torch.manual_seed(0)
    net = WBCNet(BVLCGoogLeNet(), CAFFE_CONVENTION, 2, freeze_until="inception4e")
    head = HeadOnly(net)
    recipe = Recipe(lr=1e-2, label_smoothing=0.0, step_precision="bf16")
    optimizer, scheduler = make_optimizer(net, recipe, steps=12)
    features = torch.randn(8, 832, 14, 14).relu().half()
    labels = torch.tensor([0, 1] * 4)
    features[labels == 1, :64] += 2.0  # class 1: the first channels brighter
    before = [p.detach().clone() for p in head.parameters() if p.requires_grad]
    conv = next(m for m in net.trainable.modules() if isinstance(m, nn.Conv2d))
    seen = []
    conv.register_forward_hook(lambda module, args, out: seen.append(out.dtype))
    losses = [train_one_epoch(head, [(features, labels)], optimizer, scheduler,
                              nn.CrossEntropyLoss(), recipe.step_precision)
              for _ in range(12)]
    assert set(seen) == {torch.bfloat16}  # the convolutions did run in bf16
    trained = [p for p in head.parameters() if p.requires_grad]
    assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32 for p in trained)
    assert any(not torch.equal(a, p) for a, p in zip(before, trained))
    assert losses[-1] < losses[0] * 0.5, losses
    assert all(v.dtype == torch.float32 for s in optimizer.state.values()
               for v in s.values() if torch.is_tensor(v) and v.dim() > 0)


def test_feature_batches_cover_the_cache():
    feats = torch.arange(10).float().view(10, 1)
    labels = np.arange(10)
    rng = np.random.default_rng(0)
    batches = list(feature_batches(feats, labels, 4, 2, rng))
    seen = torch.cat([f for f, _ in batches]).view(-1).long()
    assert len(batches) == 2 and len(set(seen.tolist())) == 8
    for f, y in batches:
        assert torch.equal(f.view(-1).long(), y)


def test_a_recipe_takes_the_same_steps_in_any_number_of_processes():
    # 543 training images, 32 views a step: 16 steps an epoch whether one process draws 32
    # or each of two draws 16 (until session 40 two processes took 8 steps of 2 x 32).
    assert rank_batches(543, 32, 1) == (32, 16)
    assert rank_batches(543, 32, 2) == (16, 16)
    assert rank_batches(543, 32, 4) == (8, 16)
    assert rank_batches(10, 32, 2) == (16, 1)
    with pytest.raises(ValueError, match="not a multiple of 3 processes"):
        rank_batches(543, 32, 3)


def test_balanced_sampling_evens_out_the_classes():
    labels = np.array([0] * 90 + [1] * 9 + [2] * 1)
    feats = torch.arange(100).float().view(100, 1)
    rng = np.random.default_rng(0)
    drawn = np.concatenate([y.numpy() for _, y in
                            feature_batches(feats, labels, 3, 600, rng, "balanced")])
    share = np.bincount(drawn, minlength=3) / len(drawn)
    assert np.allclose(share, 1 / 3, atol=0.05)
    shuffled = np.concatenate([y.numpy() for _, y in
                               feature_batches(feats, labels, 10, 10, rng, "shuffle")])
    assert np.bincount(shuffled, minlength=3)[0] == 90
    with pytest.raises(ValueError, match="choose one of shuffle, balanced"):
        next(feature_batches(feats, labels, 3, 1, rng, "oversample"))


def test_frozen_features_are_half_precision_and_ordered():
    net = TinyNet()
    imgs = torch.randint(0, 255, (6, 8, 8, 3), dtype=torch.uint8)
    feats, labels = frozen_features(net, [(imgs[:3], torch.tensor([0, 1, 0])),
                                          (imgs[3:], torch.tensor([1, 1, 0]))])
    assert feats.dtype == torch.float16 and feats.shape == (6, 3)
    assert labels.tolist() == [0, 1, 0, 1, 1, 0]
    assert torch.allclose(feats.float(), net.embed_frozen(imgs), atol=1e-3)


def test_converter_batches_read_cached_parquet(tmp_path):
    import pandas as pd

    from wbc_spark.training_worker import converter_batches

    crops = np.random.default_rng(0).integers(0, 255, (7, 4, 4, 3), dtype=np.uint8)
    frame = pd.DataFrame({"crop": [c.tobytes() for c in crops],
                          "label_index": [0, 1, 2, 1, 0, 2, 2], "row": list(range(10, 17))})
    frame[:5].to_parquet(tmp_path / "part-0.parquet", row_group_size=3)
    frame[5:].to_parquet(tmp_path / "part-1.parquet")

    class Converter:  # files listed out of order: they are read in the order of their names
        file_urls = [(tmp_path / f"part-{i}.parquet").as_uri() for i in (1, 0)]

    rows = []
    batches = list(converter_batches(Converter(), 4, rows, batch=2))
    # full batches across row groups and files (pyarrow cuts at both)
    assert [len(b[1]) for b in batches] == [2, 2, 2, 1]
    assert rows == list(range(10, 17))
    assert np.array_equal(torch.cat([b[0] for b in batches]).numpy(), crops)


def test_cached_views_fit_the_memory_budget():
    from wbc_spark.training_worker import cached_views

    view = 81_536  # inception4e's output for one image, float16
    assert cached_views(4, 1_500, view, 4.0) == 4  # 5,000 images on two processes
    # 100,000 images (80,000 to train): on two processes one view takes 3.0 GiB, on four 1.5
    assert cached_views(4, 40_000, view, 4.0) == 1
    assert cached_views(4, 20_000, view, 4.0) == 2
    with pytest.raises(MemoryError, match="raise train.num_processes"):
        cached_views(4, 80_000, view, 4.0)


def _row_groups(crops, rows):
    import pandas as pd

    return pd.DataFrame({"crop": [crops[r].tobytes() for r in rows],
                         "label_index": [r % 3 for r in rows], "row": rows})


def test_training_views_do_not_depend_on_the_read_order():
    """petastorm's reader threads deliver row groups in a different order each run: a view's
    pixels, and the cached views' final order, must not follow it."""
    from wbc_spark.training_worker import canonical_order, transform_spec

    crops = np.random.default_rng(0).integers(0, 255, (6, 16, 16, 3), dtype=np.uint8)
    groups = [[0, 1, 2], [3, 4, 5]]
    two_epochs = groups + groups  # num_epochs=2: every row group is read twice

    def read(order, seed=7):
        transform = transform_spec(16, seed=seed).func
        outs = [transform(_row_groups(crops, two_epochs[i])) for i in order]
        rows = np.concatenate([o["row"] for o in outs])
        views = np.concatenate([o["view"] for o in outs])
        images = np.stack([im for o in outs for im in o["image"]])
        return images[canonical_order(rows, views)], rows, views

    a, rows, views = read([0, 1, 2, 3])
    b, rows_b, _ = read([3, 1, 2, 0])
    assert not np.array_equal(rows, rows_b)  # read in another order ...
    assert np.array_equal(a, b)  # ... the same views in the same order
    # every row twice, as view 0 and view 1; the two views differ (augmented anew)
    assert sorted(zip(rows.tolist(), views.tolist())) == [(r, v) for r in range(6)
                                                          for v in (0, 1)]
    assert not np.array_equal(a[0], a[1])
    assert not np.array_equal(read([0, 1, 2, 3], seed=8)[0], a)  # the seed matters
    with pytest.raises(ValueError, match="3 rows but 2 view numbers"):
        canonical_order([1, 2, 3], [0, 0])


def test_frozen_bytes_of_the_default_cut(fake_weights):
    from wbc_spark.model.transfer import build_classifier
    from wbc_spark.model.weights import load_bvlc
    from wbc_spark.training_worker import frozen_bytes

    model = build_classifier(load_bvlc(fake_weights), 5, freeze_until="inception4e")
    assert frozen_bytes(model, 224) == 832 * 7 * 7 * 2


def test_lab_class_sampling_lifts_a_small_labs_rare_class():
    """A big lab's 900 views of a class do not drown a small lab's 9: each (lab, class) is
    drawn in proportion to the square root of its size, not to its size."""
    labels = np.array([0] * 900 + [0] * 9 + [1] * 300)
    labs = np.array(["big"] * 900 + ["small"] * 9 + ["big"] * 300)
    feats = torch.arange(len(labels), dtype=torch.float32)[:, None]
    rng = np.random.default_rng(0)
    drawn = torch.cat([f[:, 0] for f, _ in feature_batches(feats, labels, 64, 200, rng,
                                                           "lab_class", labs)]).long().numpy()
    small = np.isin(drawn, np.arange(900, 909)).mean()
    expected = 9 ** 0.5 / (900 ** 0.5 + 9 ** 0.5 + 300 ** 0.5)  # 0.0625, against 0.0074
    assert abs(small - expected) < 0.01
    with pytest.raises(ValueError, match="needs the lab"):
        next(feature_batches(feats, labels, 4, 1, rng, "lab_class"))


def test_lab_class_equal_sampling_weighs_every_lab_and_class_alike():
    """A new lab's 9 labelled cells of a class are drawn as often as a big lab's 900 of it:
    each (lab, class) gets the same share, however few images it has."""
    labels = np.array([0] * 900 + [0] * 9 + [1] * 300 + [1] * 9)
    labs = np.array(["big"] * 900 + ["new"] * 9 + ["big"] * 300 + ["new"] * 9)
    feats = torch.arange(len(labels), dtype=torch.float32)[:, None]
    rng = np.random.default_rng(0)
    drawn = torch.cat([f[:, 0] for f, _ in feature_batches(feats, labels, 64, 200, rng,
                                                           "lab_class_equal", labs)])
    drawn = drawn.long().numpy()
    shares = [np.isin(drawn, rows).mean() for rows in (np.arange(0, 900), np.arange(900, 909),
                                                        np.arange(909, 1209),
                                                        np.arange(1209, 1218))]
    np.testing.assert_allclose(shares, 0.25, atol=0.02)
    with pytest.raises(ValueError, match="lab_class_equal needs the lab"):
        next(feature_batches(feats, labels, 4, 1, rng, "lab_class_equal"))


def _future_warnings(code: str) -> int:
    """FutureWarnings a fresh Python process prints running ``code``, every warning shown."""
    proc = subprocess.run([sys.executable, "-W", "always", "-c", code], capture_output=True,
                          text=True, check=True)
    return proc.stderr.count("FutureWarning")


def test_petastorms_pyarrow_deprecation_warnings_are_hidden_but_no_others():
    # Importing petastorm's Spark converter warns about pyarrow.LocalFileSystem; its readers
    # warn the same way for every row group, which buried the training job's log.
    assert _future_warnings("import petastorm.spark") > 0
    assert _future_warnings("import wbc_spark; import petastorm.spark") == 0
    assert _future_warnings("import wbc_spark, warnings; "
                            "warnings.warn('ours', FutureWarning)") == 1


def test_split_view_logits_score_each_flip_of_a_split_in_row_order(tmp_path, fake_weights):
    import pandas as pd

    from wbc_spark.model.transfer import build_classifier
    from wbc_spark.model.weights import load_bvlc
    from wbc_spark.train import frozen_features, head_logits
    from wbc_spark.training_worker import split_view_logits
    from wbc_spark.transforms import dihedral

    model = build_classifier(load_bvlc(fake_weights), 5, freeze_until="inception4e")
    crops = np.random.default_rng(1).integers(0, 255, (5, 224, 224, 3), dtype=np.uint8)
    pd.DataFrame({"crop": [c.tobytes() for c in crops], "label_index": [0, 1, 2, 3, 4],
                  "row": [3, 4, 5, 6, 7]}).to_parquet(tmp_path / "part-0.parquet",
                                                      row_group_size=2)

    class Converter:
        file_urls = [(tmp_path / "part-0.parquet").as_uri()]

    out = split_view_logits(model, Converter(), 224, 3, "fp32", [3, 4, 5, 6, 7], ["lab"] * 8,
                            None)
    assert out.shape == (2, 5, 5)  # views 1 and 2 (view 0 is the caller's)
    for k in (1, 2):
        feats, _ = frozen_features(model, [(torch.from_numpy(dihedral(crops, k)), [0] * 5)])
        assert np.allclose(out[k - 1], head_logits(model, feats), atol=1e-4)
    with pytest.raises(RuntimeError, match="another order"):
        split_view_logits(model, Converter(), 224, 2, "fp32", [7, 6, 5, 4, 3], ["lab"] * 8,
                          None)


def _two_ranks(rank: int, world: int, port: int, out: str, n_val: int = 33) -> None:
    """One of the training's processes: the validation split shared out and the review's
    cells gathered, as ``training_worker.distributed_worker`` does them."""
    import os

    import torch.distributed as dist

    from wbc_spark.training_worker import review_cells, share_validation

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world))
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    torch.manual_seed(0)  # the same weights in every process, as DDP keeps them
    net = TinyNet().eval()
    feats = torch.linspace(0, 1, n_val * 3).view(n_val, 3)
    labels = np.arange(n_val) % 2
    labs = np.array(["north"] * 20 + ["south"] * 13)[:n_val]
    val = (feats, labels) if rank == 0 else None
    (part, part_labels), got_labs, logits = share_validation(
        val, labs if rank == 0 else None, world)
    train = torch.rand(11 + rank, 3, generator=torch.Generator().manual_seed(rank))
    cells = review_cells(net, train, np.full(len(train), rank), world, seed=0)
    torch.save({"part": part, "labels": part_labels, "labs": got_labs, "logits": logits(net),
                "train": train, "cells": cells}, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


def test_ranks_share_the_validation_and_the_review_cells(tmp_path):
    """Two gloo processes: each scores its part of rank 0's validation split, and every rank
    gets all the logits in order, as rank 0 alone computes them; the review's cells come
    from half of each rank's views, joined on rank 0 only."""
    import socket

    import torch.multiprocessing as mp

    from wbc_spark import review
    from wbc_spark.train import head_logits

    def free_port() -> int:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    mp.spawn(_two_ranks, args=(2, free_port(), str(tmp_path)), nprocs=2)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    torch.manual_seed(0)
    net = TinyNet().eval()
    feats = torch.linspace(0, 1, 33 * 3).view(33, 3)
    assert len(r0["part"]) == 17 and len(r1["part"]) == 16
    assert torch.equal(torch.cat([r0["part"], r1["part"]]), feats)
    for r in (r0, r1):
        assert np.array_equal(r["labels"], np.arange(33) % 2)
        assert list(r["labs"]) == ["north"] * 20 + ["south"] * 13
        np.testing.assert_allclose(r["logits"], head_logits(net, feats), rtol=1e-6)
    assert r1["cells"] is None
    cells, cell_labels = r0["cells"]
    # ceil(11 / 2) of rank 0's views and ceil(12 / 2) of rank 1's
    assert len(cells) == 12 and list(cell_labels) == [0] * 6 + [1] * 6
    _, all_cells = review.head(net, torch.cat([r0["train"], r1["train"]]))
    matches = (np.abs(cells[:, None] - all_cells[None]).max(-1) < 1e-6).sum(1)
    assert (matches == 1).all()  # each a distinct training view's, through the trained layers

    # One validation image for two ranks: the second scores an empty part.
    mp.spawn(_two_ranks, args=(2, free_port(), str(tmp_path), 1), nprocs=2)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    assert len(r0["part"]) == 1 and len(r1["part"]) == 0
    for r in (r0, r1):
        assert r["logits"].shape == (1, 2)
        np.testing.assert_allclose(r["logits"], head_logits(net, torch.linspace(0, 1, 3)[None]),
                                   rtol=1e-6)
