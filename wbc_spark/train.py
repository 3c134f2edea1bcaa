"""The fine-tuning recipe: the training loop, calibration and prediction, on frozen features.

The recipe (``Recipe``) is one thing, used by the distributed worker
(``wbc_spark.training_worker``: batches from petastorm) and by the cross-validation benchmark
(``wbc_spark.evaluation.crossval``: batches from memory): AdamW with a lower learning rate for
the pretrained upper blocks than for the new head, cosine decay, label smoothing, class-weighted
loss, the epoch chosen on the validation split (``train.selection``), then temperature scaling
fitted on the same validation split.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from scipy.optimize import minimize_scalar
from torch import nn

from wbc_spark import metrics
from wbc_spark.config import SAMPLINGS, SELECTIONS
from wbc_spark.model.transfer import inference_precision

log = logging.getLogger(__name__)

Batch = tuple[torch.Tensor, torch.Tensor]  # uint8 N x H x W x 3 images, int64 labels


@dataclass(frozen=True)
class Recipe:
    epochs: int = 8
    batch_size: int = 32
    lr: float = 3e-3
    block_lr_factor: float = 0.1
    weight_decay: float = 1e-4
    label_smoothing: float = 0.1
    class_weighting: str = "inverse_sqrt"
    sampling: str = "shuffle"
    selection: str = "pooled"
    seed: int = 0
    step_precision: str = "fp32"

    @classmethod
    def from_config(cls, train_config) -> Recipe:
        names = cls.__dataclass_fields__
        return cls(**{k: getattr(train_config, k) for k in names})


# --- distributed helpers: the only place that knows about ranks ---------------------------
def class_weights(counts: list[int], mode: str) -> torch.Tensor:
    """Per-class loss weights, normalised to mean 1 over the classes present."""
    c = torch.tensor(counts, dtype=torch.float32).clamp(min=1)
    if mode == "none":
        w = torch.ones_like(c)
    elif mode == "inverse":
        w = 1 / c
    elif mode == "inverse_sqrt":
        w = c.rsqrt()
    else:
        raise ValueError(f"class_weighting={mode!r}; choose none, inverse or inverse_sqrt")
    return w * len(w) / w.sum()


def make_optimizer(model, recipe: Recipe, steps: int
                   ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """AdamW: the new head at ``lr``, pretrained upper blocks at ``lr * block_lr_factor``.

    Warm-up over the first 5% of ``steps``, then cosine decay to zero.
    """
    head = [p for p in model.fc.parameters() if p.requires_grad]
    blocks = [p for p in model.trainable.parameters() if p.requires_grad]
    groups = [{"params": head, "lr": recipe.lr}]
    if blocks:
        groups.append({"params": blocks, "lr": recipe.lr * recipe.block_lr_factor})
    optimizer = torch.optim.AdamW(groups, weight_decay=recipe.weight_decay)
    warmup = max(1, steps // 20)

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, steps - warmup))))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)


class HeadOnly(nn.Module):
    """The trainable part of a ``WBCNet`` as a module of its own: frozen features -> logits.

    Training runs on cached frozen-part outputs, so this (wrapped in DDP when distributed) is
    what the optimiser steps; it shares its parameters with the full model.
    """

    def __init__(self, model) -> None:
        super().__init__()
        self.model = model
        # The cached frozen features are channels-last (what ``embed_frozen`` returns), so
        # the trained convolutions' weight gradients are too. Parameters in the same layout
        # keep DistributedDataParallel's gradient buckets matching them ("grad strides do not
        # match bucket view strides" otherwise); a training step takes as long either way,
        # while contiguous features would make it about 25% slower (docs/PERFORMANCE.md).
        model.trainable.to(memory_format=torch.channels_last)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.model.head(features)


def train_one_epoch(head: nn.Module, batches: Iterable[Batch], optimizer, scheduler,
                    loss_fn: nn.Module, precision: str = "fp32") -> float:
    """One pass over ``batches`` of (frozen features, labels); returns the mean loss.

    ``precision``: the forward pass's arithmetic ("bf16": CPU autocast, so the convolutions
    and their backward run in bfloat16 while the weights, their gradients, the optimiser
    step and the loss stay fp32; "auto" as ``resolve_precision``)."""
    head.train()
    total, count = 0.0, 0
    for features, labels in batches:
        optimizer.zero_grad(set_to_none=True)
        with inference_precision(precision):
            logits = head(features.float())
        loss = loss_fn(logits.float(), labels)
        loss.backward()
        optimizer.step()
        scheduler.step()
        total += loss.item() * len(labels)
        count += len(labels)
    return total / max(count, 1)


@torch.no_grad()
def frozen_features(model, batches: Iterable[Batch], precision: str = "fp32",
                    dtype=torch.float16) -> tuple[torch.Tensor, np.ndarray]:
    """Frozen-part outputs (computed in ``precision``, stored as float16 to halve memory) and
    labels of ``batches``.

    The frozen layers are the expensive part of the network and never change, so each image
    view goes through them once; every epoch then trains on the cached outputs.
    """
    model.eval()
    feats, labels = [], []
    for images, y in batches:
        with inference_precision(precision):
            out = model.embed_frozen(images)
        feats.append(out.to(dtype))
        labels.append(np.asarray(y))
    if not feats:
        raise ValueError("no images to compute features from")
    return torch.cat(feats), np.concatenate(labels)


@torch.no_grad()
def head_logits(model, features: torch.Tensor, batch_size: int = 128) -> np.ndarray:
    model.eval()
    return torch.cat([model.head(features[i:i + batch_size].float())
                      for i in range(0, len(features), batch_size)]).numpy()


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """Temperature minimising the validation negative log-likelihood: SciPy's bounded scalar
    search over log T in [log 0.05, log 20] (the NLL is unimodal in log T). ``logits`` N x
    classes, or views x N x classes: then the likelihood of the views' mean probabilities, as
    test-time flips score an image."""
    y = torch.as_tensor(labels)
    z = torch.as_tensor(logits, dtype=torch.float64)

    def nll(log_t: float) -> float:
        if z.dim() == 2:
            return float(nn.functional.cross_entropy(z / math.exp(log_t), y))
        mean = torch.softmax(z / math.exp(log_t), dim=-1).mean(0)
        return float(nn.functional.nll_loss(torch.log(mean.clamp_min(1e-300)), y))

    best = minimize_scalar(nll, bounds=(math.log(0.05), math.log(20.0)), method="bounded",
                           options={"xatol": 1e-6})
    return float(math.exp(best.x))


@dataclass
class FitResult:
    best_epoch: int
    best_val_macro_f1: float
    temperature: float
    history: list[dict]


def rank_batches(n_train: int, batch_size: int, world: int) -> tuple[int, int]:
    """(views each of ``world`` processes draws per step, steps per epoch) for a step of
    ``batch_size`` views in all: DistributedDataParallel averages the processes' gradients,
    so a recipe takes the same steps of the same size in any number of processes (one in the
    benchmarks, two in local mode, more on a cluster)."""
    if batch_size % world:
        raise ValueError(f"train.batch_size={batch_size} is not a multiple of {world} "
                         "processes")
    return batch_size // world, max(1, n_train // batch_size)


def feature_batches(features: torch.Tensor, labels: np.ndarray, batch_size: int, steps: int,
                    rng: np.random.Generator, sampling: str = "shuffle",
                    labs: np.ndarray | None = None) -> Iterator[Batch]:
    """``steps`` random batches of cached features.

    ``features`` holds every augmented view of every training image. ``shuffle``: without
    replacement within an epoch, so an epoch sees each image about once, in a random one of
    its views. ``balanced``: each batch drawn with every class equally likely (rare classes'
    views repeat, with replacement as in torch's WeightedRandomSampler), the alternative
    to weighting the loss. ``lab_class``: each view drawn with probability ∝ 1/√(images of
    its lab and class) (``labs``: the lab of each view), so a small lab's rare classes are
    not drowned by a large lab's (pair it with class_weighting=none). ``lab_class_equal``:
    ∝ 1/(images of its lab and class), so every lab's every class weighs the same, however
    few cells it has (a new lab's few labelled cells beside a large lab's).
    """
    y = torch.as_tensor(labels)
    if sampling in ("balanced", "lab_class", "lab_class_equal"):
        if sampling != "balanced":
            if labs is None:
                raise ValueError(f"sampling={sampling} needs the lab of every view")
            keys = np.char.add(np.asarray(labs, str), np.char.add("/", labels.astype(str)))
        else:
            keys = labels
        _, inverse, counts = np.unique(keys, return_inverse=True, return_counts=True)
        p = 1.0 / (np.sqrt(counts[inverse]) if sampling == "lab_class" else counts[inverse])
        p /= p.sum()
        for _ in range(steps):
            idx = torch.as_tensor(rng.choice(len(features), batch_size, p=p))
            yield features[idx], y[idx]
        return
    if sampling != "shuffle":
        raise ValueError(f"sampling={sampling!r}; choose one of {', '.join(SAMPLINGS)}")
    order = rng.permutation(len(features))
    for i in range(steps):
        idx = torch.as_tensor(order[(i * batch_size) % len(order):][:batch_size])
        if len(idx) < batch_size:  # wrap around for the last batches
            idx = torch.as_tensor(rng.choice(len(features), batch_size, replace=False))
        yield features[idx], y[idx]


def selection_score(labels: np.ndarray, predicted: np.ndarray, num_classes: int,
                    rule: str = "pooled", labs: np.ndarray | None = None) -> float:
    """The validation score that chooses the epoch (``Recipe.selection``): macro-F1 over all
    the images ("pooled"; also what is reported under "loss" and "last", which choose by
    the validation loss and by the epoch), or the mean of each lab's macro-F1 ("lab_mean",
    which needs ``labs``, the lab of every image)."""
    if rule in ("pooled", "loss", "last"):
        return metrics.macro_f1(labels, predicted, num_classes)
    if rule != "lab_mean":
        raise ValueError(f"selection={rule!r}; choose one of {', '.join(SELECTIONS)}")
    if labs is None:
        raise ValueError("selection=lab_mean needs the lab of every validation image")
    labs = np.asarray(labs)
    labels, predicted = np.asarray(labels), np.asarray(predicted)
    return float(np.mean([metrics.macro_f1(labels[labs == lab], predicted[labs == lab],
                                           num_classes) for lab in np.unique(labs)]))


def fit(model, head: nn.Module, epoch_batches: Callable[[int], Iterable[Batch]],
        steps_per_epoch: int, val: tuple[torch.Tensor, np.ndarray] | None,
        recipe: Recipe, num_classes: int, class_counts: list[int],
        val_labs: np.ndarray | None = None,
        val_logits: Callable[[nn.Module], np.ndarray] | None = None) -> FitResult:
    """Train for ``recipe.epochs``; keep the epoch with the best validation score
    (``recipe.selection``: macro-F1, pooled or per lab (``selection_score``), the lowest
    validation loss, or the last epoch, the validation split then only calibrating).

    Args:
        model: the ``WBCNet`` (its weights end at the best epoch).
        head: what is trained: ``HeadOnly(model)`` or its DistributedDataParallel wrapper.
        epoch_batches: epoch number -> that epoch's batches of (frozen features, labels).
        steps_per_epoch: batches per epoch (equal on every rank, as DDP requires).
        val: frozen features and labels of the validation images, or None on ranks that do
            not evaluate.
        val_labs: the validation images' labs (``recipe.selection="lab_mean"`` needs them).
        val_logits: model -> the logits of every validation image, where they are not
            ``head_logits(model, val[0])``: a distributed training scores each rank's part of
            the validation split and gathers them (every rank then chooses the same epoch).
    """
    logits_of = val_logits or (lambda m: head_logits(m, val[0]))

    loss_fn = nn.CrossEntropyLoss(weight=class_weights(class_counts, recipe.class_weighting),
                                  label_smoothing=recipe.label_smoothing)
    optimizer, scheduler = make_optimizer(model, recipe, recipe.epochs * steps_per_epoch)
    best = (-1.0, math.inf)  # (validation score, validation loss) of the chosen epoch
    best_key = None
    best_state, best_epoch, history = None, -1, []
    for epoch in range(recipe.epochs):
        start = time.perf_counter()
        loss = train_one_epoch(head, epoch_batches(epoch), optimizer, scheduler, loss_fn,
                               recipe.step_precision)
        record = {"epoch": epoch, "train_loss": loss, "seconds": time.perf_counter() - start}
        if val is not None:
            logits = logits_of(model)
            f1 = selection_score(val[1], logits.argmax(1), num_classes, recipe.selection,
                                 val_labs)
            val_loss = float(nn.functional.cross_entropy(torch.as_tensor(logits),
                                                         torch.as_tensor(val[1])))
            record.update(val_macro_f1=f1, val_loss=val_loss)
            # Ties in macro-F1 (common on a small validation split) go to the lower loss;
            # selection=loss takes the lower loss first, selection=last the last epoch.
            key = {"loss": (-val_loss, f1), "last": (epoch,)}.get(recipe.selection,
                                                                  (f1, -val_loss))
            if best_key is None or key > best_key:
                best, best_key = (f1, val_loss), key
                best_epoch = epoch
                best_state = copy.deepcopy(model.state_dict())
        history.append(record)
        log.info("epoch %d: %s", epoch, json.dumps({k: round(v, 4) if isinstance(v, float)
                                                    else v for k, v in record.items()}))
    temperature = 1.0
    if best_state is not None:
        model.load_state_dict(best_state)
        temperature = fit_temperature(logits_of(model), val[1])
        log.info("epoch %d kept (train.selection=%s; val macro-F1 %.4f); temperature %.3f",
                 best_epoch, recipe.selection, best[0], temperature)
    return FitResult(best_epoch, best[0], temperature, history)


def predict_probs(model, features: torch.Tensor, temperature: float = 1.0) -> np.ndarray:
    """Calibrated class probabilities from frozen features."""
    return metrics.softmax(head_logits(model, features), temperature)
