"""Fine-tuning: the training loop, evaluation, calibration, and the function TorchDistributor runs.

The recipe (``Recipe``) is one thing, used by the distributed job (batches from petastorm) and
by the cross-validation benchmark (batches from memory): AdamW with a lower learning rate for
the pretrained upper blocks than for the new head, cosine decay, label smoothing, class-weighted
loss, the best epoch chosen on validation macro-F1, then temperature scaling fitted on the same
validation split.
"""

from __future__ import annotations

import copy
import itertools
import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
from torch import nn

from wbc_spark import metrics
from wbc_spark.augment import augment

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
    seed: int = 0

    @classmethod
    def from_config(cls, train_config) -> Recipe:
        names = cls.__dataclass_fields__
        return cls(**{k: getattr(train_config, k) for k in names})


# --- distributed helpers: the only place that knows about ranks ---------------------------
def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    """Rank 0 logs, evaluates and saves; the others only train."""
    return rank() == 0


# --- the recipe ---------------------------------------------------------------------------
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


def make_optimizer(model: nn.Module, recipe: Recipe, steps: int
                   ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """AdamW: the new head at ``lr``, pretrained upper blocks at ``lr * block_lr_factor``."""
    core = model.module if hasattr(model, "module") else model
    head = [p for p in core.fc.parameters() if p.requires_grad]
    blocks = [p for p in core.trainable.parameters() if p.requires_grad]
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


def train_one_epoch(model: nn.Module, batches: Iterable[Batch], optimizer, scheduler,
                    loss_fn: nn.Module) -> float:
    """One pass over ``batches``; returns the mean training loss."""
    model.train()
    total, count = 0.0, 0
    for images, labels in batches:
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(model(images), labels)
        loss.backward()
        optimizer.step()
        scheduler.step()
        total += loss.item() * len(labels)
        count += len(labels)
    return total / max(count, 1)


@torch.no_grad()
def frozen_features(model, batches: Iterable[Batch]) -> tuple[torch.Tensor, np.ndarray]:
    """Frozen-part outputs and labels of a fixed set (computed once, reused every epoch)."""
    feats, labels = [], []
    for images, y in batches:
        feats.append(model.embed_frozen(images))
        labels.append(np.asarray(y))
    return torch.cat(feats), np.concatenate(labels)


@torch.no_grad()
def head_logits(model, features: torch.Tensor, batch_size: int = 128) -> np.ndarray:
    model.eval()
    return torch.cat([model.head(features[i:i + batch_size])
                      for i in range(0, len(features), batch_size)]).numpy()


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    z = logits / temperature
    z = z - z.max(1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(1, keepdims=True)


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """Temperature minimising the validation negative log-likelihood (1-D, bounded search)."""
    lo, hi = math.log(0.05), math.log(20.0)
    y = torch.as_tensor(labels)
    z = torch.as_tensor(logits, dtype=torch.float64)

    def nll(log_t: float) -> float:
        return float(nn.functional.cross_entropy(z / math.exp(log_t), y))

    # Golden-section search: NLL is unimodal in log T.
    g = (math.sqrt(5) - 1) / 2
    a, b = lo, hi
    c, d = b - g * (b - a), a + g * (b - a)
    for _ in range(60):
        if nll(c) < nll(d):
            b = d
        else:
            a = c
        c, d = b - g * (b - a), a + g * (b - a)
    return float(math.exp((a + b) / 2))


@dataclass
class FitResult:
    best_epoch: int
    best_val_macro_f1: float
    temperature: float
    history: list[dict]


def fit(model, train_model: nn.Module, epoch_batches: Callable[[int], Iterable[Batch]],
        steps_per_epoch: int, val_batches: Callable[[], Iterable[Batch]] | None,
        recipe: Recipe, num_classes: int, class_counts: list[int]) -> FitResult:
    """Train for ``recipe.epochs``; keep the epoch with the best validation macro-F1.

    Args:
        model: the ``WBCNet`` (used for evaluation; its weights end at the best epoch).
        train_model: what is trained: ``model`` itself or its DistributedDataParallel wrapper.
        epoch_batches: epoch number -> that epoch's (augmented) training batches.
        steps_per_epoch: batches per epoch (equal on every rank, as DDP requires).
        val_batches: validation batches, or None on ranks that do not evaluate.
    """
    loss_fn = nn.CrossEntropyLoss(weight=class_weights(class_counts, recipe.class_weighting),
                                  label_smoothing=recipe.label_smoothing)
    optimizer, scheduler = make_optimizer(train_model, recipe, recipe.epochs * steps_per_epoch)
    val_feats = val_labels = None
    if val_batches is not None:
        val_feats, val_labels = frozen_features(model, val_batches())
    best = (-1.0, math.inf)
    best_state, best_epoch, history = None, -1, []
    for epoch in range(recipe.epochs):
        start = time.perf_counter()
        loss = train_one_epoch(train_model, epoch_batches(epoch), optimizer, scheduler, loss_fn)
        record = {"epoch": epoch, "train_loss": loss, "seconds": time.perf_counter() - start}
        if val_feats is not None:
            logits = head_logits(model, val_feats)
            f1 = metrics.macro_f1(val_labels, logits.argmax(1), num_classes)
            val_loss = float(nn.functional.cross_entropy(torch.as_tensor(logits),
                                                         torch.as_tensor(val_labels)))
            record.update(val_macro_f1=f1, val_loss=val_loss)
            if (f1, -val_loss) > (best[0], -best[1]):
                best = (f1, val_loss)
                best_epoch = epoch
                best_state = copy.deepcopy(model.state_dict())
        history.append(record)
        log.info("epoch %d: %s", epoch, json.dumps({k: round(v, 4) if isinstance(v, float)
                                                    else v for k, v in record.items()}))
    temperature = 1.0
    if best_state is not None:
        model.load_state_dict(best_state)
        temperature = fit_temperature(head_logits(model, val_feats), val_labels)
        log.info("best epoch %d (val macro-F1 %.4f); temperature %.3f", best_epoch, best[0],
                 temperature)
    return FitResult(best_epoch, best[0], temperature, history)


@torch.no_grad()
def predict_probs(model, batches: Iterable[Batch], temperature: float = 1.0
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Calibrated class probabilities and labels for ``batches``."""
    feats, labels = frozen_features(model, batches)
    return softmax(head_logits(model, feats), temperature), labels


# --- petastorm plumbing ---------------------------------------------------------------------
def decode_crops(crops: Iterable[bytes], size: int) -> np.ndarray:
    return np.stack([np.frombuffer(b, dtype=np.uint8).reshape(size, size, 3) for b in crops])


def transform_spec(size: int, *, train: bool, seed: int):
    """petastorm TransformSpec: crop bytes -> uint8 image array (augmented when training)."""
    from petastorm import TransformSpec

    counter = itertools.count()

    def transform(pdf: pd.DataFrame) -> pd.DataFrame:
        rng = np.random.default_rng([seed, rank(), next(counter)])
        images = decode_crops(pdf["crop"], size)
        if train:
            images = np.stack([augment(im, rng) for im in images])
        return pd.DataFrame({"image": list(images),
                             "label": pdf["label_index"].astype(np.int64),
                             "row": pdf["row"].astype(np.int64)})

    return TransformSpec(
        transform,
        edit_fields=[("image", np.uint8, (size, size, 3), False),
                     ("label", np.int64, (), False), ("row", np.int64, (), False)],
        selected_fields=["image", "label", "row"],
    )


def _loader_batches(loader, steps: int | None = None) -> Iterator[Batch]:
    it = iter(loader)
    for batch in (itertools.islice(it, steps) if steps is not None else it):
        yield batch["image"], batch["label"]


def _rows_and_batches(loader, rows: list) -> Iterator[Batch]:
    for batch in loader:
        rows.extend(batch["row"].tolist())
        yield batch["image"], batch["label"]


def distributed_worker(job: dict) -> dict | None:
    """Runs in every TorchDistributor process: DDP training; rank 0 evaluates and saves.

    ``job`` holds plain values plus three petastorm converters (train, val, test), built by
    ``wbc_spark.training_job.run_training`` on the driver.
    """
    from torch.nn.parallel import DistributedDataParallel

    from wbc_spark.model.transfer import build_classifier, parameter_summary
    from wbc_spark.model.weights import load_pretrained

    logging.basicConfig(level=logging.INFO,
                        format=f"%(asctime)s rank{rank()} %(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(job["threads_per_process"])
    recipe = Recipe(**job["recipe"])
    torch.manual_seed(recipe.seed)
    np.random.seed(recipe.seed)
    world = world_size()
    use_gpu = job["use_gpu"] and torch.cuda.is_available()
    if job["use_gpu"] and not use_gpu:
        raise RuntimeError("train.use_gpu is true but no CUDA device is visible to this process")
    if world > 1:
        dist.init_process_group("nccl" if use_gpu else "gloo")
    classes = job["classes"]
    pretrained = load_pretrained(job["model_source"], job["weights_dir"] or None)
    model = build_classifier(pretrained, len(classes), freeze_until=job["freeze_until"],
                             dropout=job["dropout"])
    # DDP only over the trainable part: frozen weights need no gradient all-reduce.
    train_model = DistributedDataParallel(model) if world > 1 else model
    size = job["crop_size"]
    steps = max(1, job["n_train"] // (recipe.batch_size * world))
    train_spec = transform_spec(size, train=True, seed=recipe.seed)
    eval_spec = transform_spec(size, train=False, seed=recipe.seed)
    main = is_main_process()

    def eval_loader(converter):
        return converter.make_torch_dataloader(batch_size=64, num_epochs=1, workers_count=2,
                                               transform_spec=eval_spec)

    def val_batches():
        with eval_loader(job["conv_val"]) as loader:
            yield from _loader_batches(loader)

    with job["conv_train"].make_torch_dataloader(
            batch_size=recipe.batch_size, num_epochs=None, workers_count=2,
            cur_shard=rank(), shard_count=world, transform_spec=train_spec,
            shuffling_queue_capacity=4 * recipe.batch_size, seed=recipe.seed + rank(),
            shuffle_rows=True) as train_loader:
        stream = _loader_batches(train_loader)
        result = fit(model, train_model, lambda epoch: itertools.islice(stream, steps), steps,
                     val_batches if main else None, recipe, len(classes), job["class_counts"])

    summary = None
    if main:
        rows: list[int] = []
        with eval_loader(job["conv_test"]) as loader:
            probs, labels = predict_probs(model, _rows_and_batches(loader, rows),
                                          result.temperature)
        summary = write_evaluation(job, model, pretrained, result, probs, labels, rows,
                                   parameter_summary(model))
    if world > 1:
        # TorchDistributor keeps whichever rank's return value is written last: give every
        # rank rank 0's summary.
        shared = [summary]
        dist.broadcast_object_list(shared, src=0)
        summary = shared[0]
        dist.destroy_process_group()
    return summary


def write_evaluation(job: dict, model, pretrained, result: FitResult, probs: np.ndarray,
                     labels: np.ndarray, rows: list[int], params: dict) -> dict:
    """Rank 0: test-fold report, predictions, confusion PNG and the model artifact."""
    from wbc_spark import artifact

    classes = job["classes"]
    out = Path(job["output"])
    out.mkdir(parents=True, exist_ok=True)
    report = metrics.classification_report(labels, probs.argmax(1), classes, probs)
    evaluation = {
        "split": job["split_sizes"], "test_fold": job["test_fold"], "folds": job["folds"],
        "best_epoch": result.best_epoch, "best_val_macro_f1": result.best_val_macro_f1,
        "temperature": result.temperature, "history": result.history,
        "parameters": params, "test": report,
    }
    ids = [job["image_ids"][r] for r in rows]
    preds = pd.DataFrame({"image_id": ids, "label": [classes[i] for i in labels],
                          "predicted": [classes[i] for i in probs.argmax(1)]})
    for i, c in enumerate(classes):
        preds[f"p_{c}"] = probs[:, i]
    _atomic_write(out / "test_predictions.csv", preds.to_csv(index=False).encode())
    _atomic_write(out / "evaluation.json", json.dumps(evaluation, indent=2).encode())
    metrics.confusion_png(report["confusion"], classes, str(out / "confusion.png"),
                          f"test fold {job['test_fold']}: rows true, columns predicted")
    _atomic_write(out / "confusion.txt", metrics.format_report(report).encode())
    model_id = artifact.save(
        out / "model.pt", model, classes=classes, source=pretrained.source,
        convention=pretrained.convention,
        preprocessing={"crop": "stain-located cell, fixed cell scale",
                       "crop_size": job["crop_size"], "context": job["context"]},
        config=job["config"], provenance=pretrained.provenance,
        metrics={"test": {k: report[k] for k in ("n", "accuracy", "balanced_accuracy",
                                                  "macro_f1", "ece")},
                 "best_val_macro_f1": result.best_val_macro_f1},
        temperature=result.temperature,
    )
    evaluation["model_id"] = model_id
    log.info("saved %s (model_id %s)", out / "model.pt", model_id)
    return {"model_id": model_id, "test": {k: report[k] for k in (
        "n", "accuracy", "accuracy_ci", "balanced_accuracy", "balanced_accuracy_ci",
        "macro_f1", "macro_f1_ci", "ece")}, "best_epoch": result.best_epoch,
        "temperature": result.temperature, "report_text": metrics.format_report(report)}


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
