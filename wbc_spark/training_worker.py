"""The function TorchDistributor runs in every training process, and what it is given.

The driver (``wbc_spark.training_job``) builds one ``TrainingJob``; each process reads its
shard of the training set through petastorm, trains with the recipe (``wbc_spark.train``) under
DistributedDataParallel, and rank 0 evaluates on the test fold, fits the review detectors and
writes the artifact, then ``evaluation.json``.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist

from wbc_spark import artifact, differential, metrics, review
from wbc_spark.align import LAB_SAMPLE, LabAlignment, LabSampler
from wbc_spark.augment import AugmentSettings, augment
from wbc_spark.config import ReviewConfig as ReviewSettings
from wbc_spark.model import quantize
from wbc_spark.model.transfer import build_classifier, parameter_summary, resolve_precision
from wbc_spark.model.weights import load_pretrained
from wbc_spark.sources.folder import local_path
from wbc_spark.train import (Batch, FitResult, HeadOnly, Recipe, feature_batches, fit,
                             fit_temperature, frozen_features, head_logits, rank_batches)
from wbc_spark.transforms import dihedral

log = logging.getLogger(__name__)


@dataclass
class TrainingJob:
    """The driver-to-worker contract: everything a training process needs, typed."""

    classes: list[str]
    recipe: Recipe
    model_source: str  # "bvlc" or "torchvision"
    weights_dir: str  # resolved on the driver ("" for torchvision)
    freeze_until: str
    dropout: float
    test_views: int  # flips/rotations each image's probabilities average (model.test_views)
    crop_size: int
    preprocessing: dict  # preprocessing.Preprocessing.to_dict() of the dataset
    threads_per_process: int
    views: int
    cache_gib: float
    frozen_precision: str
    int8_calibration: int  # unaugmented training crops for int8's activation ranges
    align: bool  # map each training lab's frozen outputs (wbc_spark.align)
    augment: AugmentSettings
    local_mode: bool
    review: ReviewSettings
    n_train: int
    class_counts: list[int]  # training images per class
    split_sizes: dict[str, int]
    test_fold: int
    folds: int
    image_ids: list[str]  # by petastorm row number
    sources: list[str]  # the lab of each row
    trained_on: dict[str, dict[str, int]]
    output: str  # the model folder
    config: dict  # the resolved configuration, stored in the artifact
    conv_train: Any  # petastorm SparkDatasetConverter of each split
    conv_val: Any
    conv_test: Any


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    """Rank 0 logs, evaluates and saves; the others only train."""
    return rank() == 0


# --- the recipe ---------------------------------------------------------------------------


def decode_crops(crops: Iterable[bytes], size: int) -> np.ndarray:
    return np.stack([np.frombuffer(b, dtype=np.uint8).reshape(size, size, 3) for b in crops])


def transform_spec(size: int, *, seed: int, settings: AugmentSettings = AugmentSettings()):
    """petastorm TransformSpec for training: crop bytes -> augmented uint8 image array (the
    unaugmented passes read the cached Parquet directly: :func:`converter_batches`).

    Each image's view is numbered by how often its row was read before, and its
    augmentation drawn from a generator seeded by (``seed``, row, view). So a view's pixels
    do not depend on the order in which petastorm's reader threads deliver row groups
    (which varies run to run), and the output's ``view`` column lets the caller put the
    views into one canonical order (:func:`canonical_order`).
    """
    from petastorm import TransformSpec

    seen: dict[int, int] = {}
    lock = threading.Lock()  # petastorm calls the transform from its reader threads

    def transform(pdf: pd.DataFrame) -> pd.DataFrame:
        rows = pdf["row"].to_numpy(np.int64)
        views = np.empty(len(rows), np.int64)
        with lock:
            for i, r in enumerate(rows.tolist()):
                views[i] = seen[r] = seen.get(r, -1) + 1
        images = np.stack([augment(im, np.random.default_rng([seed, r, v]), settings)
                           for im, r, v in zip(decode_crops(pdf["crop"], size),
                                               rows.tolist(), views.tolist())])
        return pd.DataFrame({"image": list(images),
                             "label": pdf["label_index"].astype(np.int64),
                             "row": rows, "view": views})

    return TransformSpec(
        transform,
        edit_fields=[("image", np.uint8, (size, size, 3), False),
                     ("label", np.int64, (), False), ("row", np.int64, (), False),
                     ("view", np.int64, (), False)],
        selected_fields=["image", "label", "row", "view"],
    )


def canonical_order(rows: Iterable[int], views: Iterable[int]) -> np.ndarray:
    """The permutation that sorts training views by (row, view): cached features in this
    order make training independent of the order in which they were read."""
    rows, views = np.asarray(list(rows), np.int64), np.asarray(list(views), np.int64)
    if len(rows) != len(views):
        raise ValueError(f"{len(rows)} rows but {len(views)} view numbers")
    return np.lexsort((views, rows))


def frozen_bytes(model, size: int) -> int:
    """Bytes one cached view takes: the frozen part's output for one image, in float16."""
    with torch.no_grad():
        out = model.embed_frozen(torch.zeros(1, size, size, 3, dtype=torch.uint8))
    return int(out.numel()) * 2


def cached_views(views: int, images_per_process: float, view_bytes: int, budget_gib: float
                 ) -> int:
    """How many views of each training image a process caches: ``views``, or fewer when
    they would not fit in ``budget_gib``; refuses when not even one does."""
    per_view = images_per_process * view_bytes
    fit = int(budget_gib * 2**30 // max(per_view, 1))
    if fit < 1:
        raise MemoryError(f"one view of {images_per_process:.0f} training images per process "
                          f"needs {per_view / 2**30:.1f} GiB, over train.cache_gib="
                          f"{budget_gib}; raise train.num_processes (or train.cache_gib)")
    return min(views, fit)


def _loader_batches(loader, rows: list | None = None, views: list | None = None
                    ) -> Iterator[Batch]:
    for batch in loader:
        if rows is not None:
            rows.extend(batch["row"].tolist())
        if views is not None:
            views.extend(batch["view"].tolist())
        yield batch["image"], batch["label"]


def converter_batches(converter, size: int, rows: list | None = None, batch: int = 64
                      ) -> Iterator[Batch]:
    """Unaugmented batches of ``batch`` crops (the last one smaller) from a petastorm
    converter's cached Parquet files, read with pyarrow, files in name order."""
    import pyarrow as pa
    import pyarrow.dataset as pads

    def emit(table: pa.Table) -> Batch:
        part = table.to_pandas()
        if rows is not None:
            rows.extend(part["row"].tolist())
        return (torch.from_numpy(decode_crops(part["crop"], size)),
                torch.from_numpy(part["label_index"].to_numpy(np.int64)))

    # Sorted: the converter lists its files in no fixed order, and the order is the batches'
    # (the first training batches are the int8 calibration and the lab detector's sample).
    data = pads.dataset(sorted(local_path(u) for u in converter.file_urls), format="parquet")
    # Streamed: the test fold of a large dataset never sits in memory whole. pyarrow cuts its
    # record batches at row groups (about 5 crops each), so they are gathered into full ones.
    pending: list[pa.RecordBatch] = []
    held = 0
    for record_batch in data.to_batches(columns=["crop", "label_index", "row"],
                                        batch_size=batch):
        pending.append(record_batch)
        held += record_batch.num_rows
        while held >= batch:
            table = pa.Table.from_batches(pending)
            yield emit(table.slice(0, batch))
            rest = table.slice(batch)
            pending, held = rest.to_batches(), rest.num_rows
    if held:
        yield emit(pa.Table.from_batches(pending))


def split_view_logits(model, converter, size: int, views: int, precision: str,
                      rows: list[int], sources: list[str], alignment: LabAlignment | None
                      ) -> np.ndarray:
    """(views - 1) x N x classes: the head's logits of views 1.. of each image of a split
    (``transforms.dihedral``; view 0, the image itself, the caller has), in the order of
    ``rows``, each batch aligned by its labs' moments. Batch by batch: only logits are kept."""
    out = []
    for k in range(1, views):
        seen: list[int] = []
        logits = []
        for images, labels in converter_batches(converter, size, seen):
            flipped = torch.from_numpy(dihedral(images.numpy(), k))
            feats, _ = frozen_features(model, [(flipped, labels)], precision)
            if alignment:
                alignment.apply(feats, [sources[r] for r in seen[-len(images):]], inplace=True)
            logits.append(head_logits(model, feats))
        if seen != rows:
            raise RuntimeError("a split's crops came back in another order for a flipped view")
        out.append(np.concatenate(logits))
    return np.stack(out)


class TestViews(NamedTuple):
    """What ``model.test_views`` > 1 adds to the test report: the temperature fitted on the
    validation images' views, and the test images' views 1.. (``split_view_logits``)."""

    temperature: float
    others: np.ndarray  # (views - 1) x N x classes


# Unaugmented training crops for the lab detector (wbc_spark.review): at most this many
# batches of 64 (the frozen layers run once more on them, on the last rank only).
PLAIN_BATCHES = 16


class PlainSample(NamedTuple):
    """What ``plain_sample`` sends from the rank that reads it to rank 0."""

    pooled: np.ndarray  # the crops' frozen outputs, pooled (review.pooled)
    labels: np.ndarray
    labs: np.ndarray
    alignment: dict | None  # LabAlignment.to_state(), with train.align


def plain_sample(model, job: TrainingJob, precision: str
                 ) -> tuple[PlainSample, torch.Tensor | None]:
    """The lab detector's training data: the first ``PLAIN_BATCHES`` batches of unaugmented
    training crops through the frozen layers, pooled (``review.pooled``), with their labels
    and labs, and with ``job.align`` the lab alignment's state (``lab_alignment``): small
    enough to send from one rank to another. Beside it, the crops the int8 calibration
    observes (``int8_calibration``; None when ``job.int8_calibration`` is 0): evenly spaced
    crops of the same batches, kept on this rank."""
    rows: list[int] = []
    kept: list[torch.Tensor] = []
    stream = converter_batches(job.conv_train, job.crop_size, rows)

    def batches() -> Iterator[Batch]:
        # The batches are as the Parquet files' row groups cut them (some under 64 crops),
        # so the sample's size is known only at its end: keep its crops (at most
        # PLAIN_BATCHES x 64 x 150 KB) until then.
        for images, labels in itertools.islice(stream, PLAIN_BATCHES):
            if job.int8_calibration:
                kept.append(images)
            yield images, labels

    frozen, labels = frozen_features(model, batches(), precision)
    labs = np.asarray([job.sources[r] for r in rows])
    alignment = None
    if job.align:
        alignment = lab_alignment(model, job, precision, frozen, labs, stream, rows).to_state()
    calibration = None
    if kept:
        sample = torch.cat(kept)
        kept.clear()
        pick = np.unique(np.linspace(0, len(sample) - 1, job.int8_calibration).round()
                         .astype(int))
        calibration = sample[torch.from_numpy(pick)]
    return PlainSample(review.pooled(frozen), labels, labs, alignment), calibration


def int8_calibration(model, crops: torch.Tensor) -> dict:
    """``quantize.calibration_state`` of the frozen layers on ``crops``, timed. The frozen
    layers never change, so the rank holding the crops runs it after training, while rank 0
    evaluates, instead of making every rank wait for it before the frozen pass."""
    start = time.perf_counter()
    state = quantize.calibration_state(model, crops)
    log.info("int8 calibration on %d unaugmented training crops in %.1f s", state["images"],
             time.perf_counter() - start)
    return state


def broadcast(obj: Any, src: int) -> Any:
    """``obj`` as rank ``src`` holds it, on every rank (a picklable object)."""
    shared = [obj]
    dist.broadcast_object_list(shared, src=src)
    return shared[0]


def share_validation(val: tuple[torch.Tensor, np.ndarray] | None, val_labs: np.ndarray | None,
                     world: int) -> tuple[tuple[torch.Tensor, np.ndarray], np.ndarray,
                                          Callable[[Any], np.ndarray]]:
    """Rank 0's validation split, cut into one part per rank for ``fit``: this rank's (part of
    the frozen outputs, every label), every image's lab, and the function that scores each
    rank's part and gathers the logits in order. Every rank then scores an epoch in
    1/``world`` of the time rank 0 alone took, while the others waited, and all choose the
    same epoch."""
    parts = None
    if is_main_process():
        chunks = np.array_split(np.arange(len(val[1])), world)
        parts = [(val[0][torch.from_numpy(c)], val[1], val_labs) for c in chunks]
    received: list = [None]
    dist.scatter_object_list(received, parts, src=0)
    part, labels, labs = received[0]

    def logits(model) -> np.ndarray:
        gathered: list = [None] * world
        # More ranks than validation images leave some parts empty.
        mine = (head_logits(model, part) if len(part) else
                np.zeros((0, model.fc.out_features), np.float32))
        dist.all_gather_object(gathered, mine)
        return np.concatenate(gathered)

    return (part, labels), labs, logits


def review_cells(model, train_feats: torch.Tensor, train_labels: np.ndarray, world: int,
                 seed: int) -> tuple[np.ndarray, np.ndarray] | None:
    """The cell detector's training views (``review.training_cells``) from every rank's
    shard: each rank passes 1/``world`` of its cached views through the trained layers (as
    many in all as one shard holds, up to ``review.CELL_SAMPLE``), and rank 0 gets them all
    (the other ranks None)."""
    limit = min(review.CELL_SAMPLE // world, -(-len(train_feats) // world))
    cells = review.training_cells(model, train_feats, train_labels, limit, seed + rank())
    if world == 1:
        return cells
    parts: list | None = [None] * world if is_main_process() else None
    dist.gather_object(cells, parts, dst=0)
    if parts is None:
        return None
    return np.concatenate([c for c, _ in parts]), np.concatenate([y for _, y in parts])


def lab_alignment(model, job: TrainingJob, precision: str, frozen: torch.Tensor,
                  labs: np.ndarray, stream: Iterator[Batch], rows: list[int]) -> LabAlignment:
    """Each training lab's moments on ``LAB_SAMPLE`` of its unaugmented training crops (all
    it has when fewer): the plain sample's (``frozen``, ``labs``) first, then the rest of the
    training crops from ``stream`` (whose row numbers it appends to ``rows``) until every lab
    has its share; only the crops still needed pass the frozen layers. Refuses when a lab the
    model trains on has no crop."""
    sampler = LabSampler(LAB_SAMPLE)
    take = sampler.wanted(labs)
    sampler.add(frozen[torch.from_numpy(take)], labs[take])
    trained = {lab for lab, n in job.trained_on.items() if sum(n.values())}
    seen = len(rows)
    while not sampler.full(trained):
        batch = next(stream, None)
        if batch is None:
            break
        batch_labs = np.asarray([job.sources[r] for r in rows[seen:]])
        seen = len(rows)
        take = sampler.wanted(batch_labs)
        if len(take):
            at = torch.from_numpy(take)
            feats, _ = frozen_features(model, [(batch[0][at], batch[1][at])], precision)
            sampler.add(feats, batch_labs[take])
    missing = sorted(lab for lab in trained if not sampler.count(lab))
    if missing:
        raise RuntimeError(f"train.align: no unaugmented training crop of lab(s) {missing}, "
                           "so their moments are unknown; train with train.align=false")
    alignment = sampler.alignment()
    log.info("lab alignment: moments of %s unaugmented training crops (up to %d per lab)",
             {lab: m.images for lab, m in alignment.labs.items()}, LAB_SAMPLE)
    return alignment


def distributed_worker(job: TrainingJob) -> dict | None:
    """Runs in every TorchDistributor process: DDP training; rank 0 evaluates and saves.

    Each rank reads its shard of the training set through petastorm ``views`` times, each
    time in a fresh random augmentation, and passes every view once through the frozen
    layers; the epochs then train the upper blocks and head on those cached outputs, with
    DistributedDataParallel averaging the gradients. ``job`` is built by
    ``wbc_spark.training_job`` on the driver.
    """
    from torch.nn.parallel import DistributedDataParallel


    logging.basicConfig(level=logging.INFO,
                        format=f"%(asctime)s rank{rank()} %(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(job.threads_per_process)
    recipe = job.recipe
    torch.manual_seed(recipe.seed)
    world = world_size()
    if world > 1:
        # CPU processes only: config.validate refuses train.use_gpu until the model and its
        # batches are moved to the process's device (nccl needs both there).
        dist.init_process_group("gloo")
    classes = job.classes
    pretrained = load_pretrained(job.model_source, job.weights_dir or None)
    model = build_classifier(pretrained, len(classes), freeze_until=job.freeze_until,
                             dropout=job.dropout)
    head = HeadOnly(model)
    # DDP only sees the trainable part: frozen weights need no gradient all-reduce.
    train_head = DistributedDataParallel(head) if world > 1 else head
    size = job.crop_size
    precision = resolve_precision(job.frozen_precision)  # "auto" by this process's CPU
    main = is_main_process()

    # Rank 0 reads the validation and test images (small, unaugmented) straight from the
    # converters' cached Parquet files; the last rank reads the review's plain training crops
    # the same way, so that the ranks reach their frozen pass at about the same time and rank
    # 0 does not pass them through the frozen layers alone after training. Only the training
    # data streams through a petastorm reader, and it is the only reader in the process: with
    # petastorm 0.13.1 a second reader in one process was seen to come back empty now and then.
    val = test = plain = calibration = None
    rows: list[int] = []
    val_rows: list[int] = []
    plain_rank = world - 1
    if rank() == plain_rank:
        plain, calibration = plain_sample(model, job, precision)
    if main:
        val = frozen_features(model, converter_batches(job.conv_val, size, val_rows),
                              precision)
        test = frozen_features(model, converter_batches(job.conv_test, size, rows),
                               precision)
    val_labs = np.asarray([job.sources[r] for r in val_rows]) if main else None
    view_bytes = frozen_bytes(model, size)
    views = cached_views(job.views, job.n_train / world, view_bytes, job.cache_gib)
    if views < job.views:
        log.warning("train.views=%d would cache %.1f GiB per process; caching %d views "
                    "(train.cache_gib=%.1f; more processes or a larger budget give more)",
                    job.views, job.views * job.n_train / world * view_bytes / 2**30,
                    views, job.cache_gib)
    start = time.perf_counter()
    for attempt in (1, 2):
        # petastorm 0.13.1's reader was seen, rarely, to deliver nothing at all: read again
        # once (loudly) before giving up; a partial shard is refused below.
        with job.conv_train.make_torch_dataloader(
                batch_size=64, num_epochs=views, workers_count=2, cur_shard=rank(),
                shard_count=world,
                transform_spec=transform_spec(size, seed=recipe.seed,
                                              settings=job.augment),
                shuffling_queue_capacity=0) as loader:
            train_rows: list[int] = []
            train_views: list[int] = []
            stream = _loader_batches(loader, train_rows, train_views)
            first = next(stream, None)
            if first is not None or attempt == 2:
                head = [first] if first is not None else []
                train_feats, train_labels = frozen_features(
                    model, itertools.chain(head, stream), precision)
                break
        log.warning("petastorm delivered no training rows to rank %d; reading again", rank())
    # The reader's order varies run to run; training draws its batches from this order.
    order = canonical_order(train_rows, train_views)
    train_feats, train_labels = train_feats[torch.from_numpy(order)], train_labels[order]
    train_rows = np.asarray(train_rows)[order]
    train_labs = np.asarray([job.sources[r] for r in train_rows])
    expected = views * job.n_train / world
    if len(train_feats) < 0.5 * expected:
        raise RuntimeError(f"petastorm delivered {len(train_feats)} training views to rank "
                           f"{rank()}, expected about {expected:.0f}; refusing to train on a "
                           "partial shard")
    frozen_seconds = time.perf_counter() - start
    log.info("cached %d augmented views of this shard's images through the frozen layers "
             "(%s) in %.1f s; training steps in %s", len(train_feats), precision,
             frozen_seconds, resolve_precision(recipe.step_precision))
    if plain_rank != 0:
        plain = broadcast(plain, plain_rank)
    alignment = LabAlignment.from_state(plain.alignment) if plain.alignment else None
    val_pooled = test_pooled = None
    if alignment:
        # The lab detector compares unaligned outputs (a lab's shift is what it detects); the
        # head and the cell detector see the aligned ones.
        alignment.apply(train_feats, train_labs, inplace=True)
        if main:
            val_pooled, test_pooled = review.pooled(val[0]), review.pooled(test[0])
            val = (alignment.apply(val[0], val_labs, inplace=True), val[1])
            test = (alignment.apply(test[0], [job.sources[r] for r in rows], inplace=True),
                    test[1])
    per_rank, steps = rank_batches(job.n_train, recipe.batch_size, world)
    rng = np.random.default_rng([recipe.seed, rank()])
    fit_val, fit_val_labs, val_logits = val, val_labs, None
    if world > 1:
        fit_val, fit_val_labs, val_logits = share_validation(val, val_labs, world)
    result = fit(model, train_head,
                 lambda epoch: feature_batches(train_feats, train_labels, per_rank,
                                               steps, rng, recipe.sampling, train_labs),
                 steps, fit_val, recipe, len(classes), job.class_counts,
                 val_labs=fit_val_labs, val_logits=val_logits)
    cells = review_cells(model, train_feats, train_labels, world, recipe.seed)
    int8 = int8_calibration(model, calibration) if calibration is not None else {}

    summary = embedded = detectors = views = None
    if main:
        val_probs = None
        if job.test_views > 1:
            # Test-time flips: every validation and test image's views through the network,
            # a temperature fitted on the views' mean (softer than any one view's), and the
            # review thresholds and the test report on that mean, as scoring will give it.
            val_views = np.concatenate([head_logits(model, val[0])[None], split_view_logits(
                model, job.conv_val, size, job.test_views, precision, val_rows, job.sources,
                alignment)])
            views = TestViews(fit_temperature(val_views, val[1]), split_view_logits(
                model, job.conv_test, size, job.test_views, precision, rows, job.sources,
                alignment))
            val_probs = metrics.mean_probs(val_views, views.temperature)
            log.info("%d test-time views: temperature %.3f (one view's %.3f)", job.test_views,
                     views.temperature, result.temperature)
        # The review detectors: fitted on the ranks' training views, thresholds on the
        # validation split (the test fold is only evaluated).
        detectors = review.fit(model, *cells, val[0], val[1],
                               result.temperature, len(classes), job.review,
                               plain_pooled=plain.pooled, plain_labels=plain.labels,
                               plain_labs=plain.labs, val_labs=val_labs,
                               val_pooled=val_pooled, val_probs=val_probs)
        embedded = review.embed(model, test[0], lab_features=test_pooled)
    if plain_rank != 0:  # the int8 calibration, from the rank that ran it while rank 0 evaluated
        int8 = broadcast(int8, plain_rank)
    if main:
        # Where and how it ran: a cluster run's Python is the executors' (a shipped archive).
        run = {"processes": world, "local_mode": job.local_mode,
               "backend": "gloo" if world > 1 else None,
               "python": sys.prefix, "frozen_pass_seconds": round(frozen_seconds, 1),
               "epoch_seconds": [round(h["seconds"], 2) for h in result.history]}
        summary = write_evaluation(job, model, pretrained, result, embedded, test[1], rows,
                                   parameter_summary(model), detectors, run, int8,
                                   plain.alignment, views)
    if world > 1:
        # TorchDistributor keeps whichever rank's return value is written last: give every
        # rank rank 0's summary.
        summary = broadcast(summary, 0)
        dist.destroy_process_group()
    return summary


def write_evaluation(job: TrainingJob, model, pretrained, result: FitResult,
                     embedded: tuple[np.ndarray, np.ndarray, np.ndarray], labels: np.ndarray,
                     rows: list[int], params: dict, detectors: review.ReviewModel, run: dict,
                     int8: dict | None = None, alignment: dict | None = None,
                     views: TestViews | None = None) -> dict:
    """Rank 0: test-fold report, predictions, confusion PNG and the model artifact.
    ``embedded``: ``review.embed``'s (logits, head-space features, unaligned pooled frozen
    outputs) of the test crops. ``views``: with ``model.test_views`` > 1, the report, flags
    and confusion are the views' mean's, and one view's figures are kept beside."""
    classes = job.classes
    out = Path(job.output)
    out.mkdir(parents=True, exist_ok=True)
    logits, cell_f, lab_f = embedded
    probs = metrics.softmax(logits, result.temperature)
    labs = np.asarray([job.sources[r] for r in rows])
    temperature = result.temperature
    single_view = None
    if views is not None:
        single_view = {"temperature": result.temperature, **_test_summary(
            labels, probs, labs, classes)}
        temperature = views.temperature
        probs = metrics.mean_probs(np.concatenate([logits[None], views.others]), temperature)
    report = metrics.classification_report(labels, probs.argmax(1), classes, probs)
    cell_d, _, beyond, _ = detectors.distances(cell_f, lab_f)
    reasons = review.flags(probs.max(1), cell_d, np.ones(len(probs), bool), detectors)
    confusion = differential.Confusion.from_predictions(classes, labels, probs.argmax(1),
                                                        reasons, labs)
    per_lab = {str(lab): metrics.classification_report(labels[labs == lab],
                                                       probs.argmax(1)[labs == lab], classes,
                                                       probs[labs == lab])
               for lab in sorted(set(labs))}
    evaluation = {
        "split": job.split_sizes, "test_fold": job.test_fold, "folds": job.folds,
        "best_epoch": result.best_epoch, "best_val_macro_f1": result.best_val_macro_f1,
        "temperature": temperature, "test_views": job.test_views,
        # With test_views > 1: the same model scored on each image alone, for comparison.
        "single_view": single_view, "history": result.history, "parameters": params,
        "test": report, "test_per_lab": per_lab,
        "trained_on": job.trained_on, "run": run,
        "review": review_report(reasons, probs.argmax(1) == labels, beyond,
                                detectors.validation),
        # What the corrected differential uses (wbc_spark.differential).
        "differential_confusion": confusion.to_state(),
    }
    # The artifact first, then the files that describe it (each naming its model_id): a
    # training killed in between leaves a model whose evaluation.json names another model_id,
    # never an evaluation of a model that does not exist.
    model_id = artifact.save(
        out / "model.pt", model, classes=classes, source=pretrained.source,
        convention=pretrained.convention,
        preprocessing={"crop": "stain-located cell, fixed cell scale",
                       **job.preprocessing},
        config=job.config, provenance=pretrained.provenance,
        metrics={"test": {k: report[k] for k in ("n", "accuracy", "balanced_accuracy",
                                                  "macro_f1", "ece")},
                 "best_val_macro_f1": result.best_val_macro_f1},
        temperature=temperature, trained_on=job.trained_on,
        review=detectors.to_state(), confusion=confusion.to_state(), int8=int8,
        alignment=alignment, test_views=job.test_views,
    )
    evaluation["model_id"] = model_id
    ids = [job.image_ids[r] for r in rows]
    preds = pd.DataFrame({"image_id": ids, "source": labs, "label": [classes[i] for i in labels],
                          "predicted": [classes[i] for i in probs.argmax(1)]})
    for i, c in enumerate(classes):
        preds[f"p_{c}"] = probs[:, i]
    preds["review_reason"] = reasons
    _atomic_write(out / "test_predictions.csv", preds.to_csv(index=False).encode())
    _atomic_write(out / "evaluation.json", json.dumps(evaluation, indent=2).encode())
    metrics.confusion_png(report["confusion"], classes, str(out / "confusion.png"),
                          f"test fold {job.test_fold}: rows true, columns predicted")
    text = metrics.format_report(report) + "".join(
        f"\n\n== test fold, lab {lab} ==\n{metrics.format_report(r)}" for lab, r in per_lab.items())
    _atomic_write(out / "confusion.txt", text.encode())
    log.info("saved %s (model_id %s)", out / "model.pt", model_id)
    return {"model_id": model_id, "test": {k: report[k] for k in (
        "n", "accuracy", "accuracy_ci", "balanced_accuracy", "balanced_accuracy_ci",
        "macro_f1", "macro_f1_ci", "ece")}, "best_epoch": result.best_epoch,
        "temperature": temperature, "test_views": job.test_views, "report_text": text,
        "run": run}


def _test_summary(labels: np.ndarray, probs: np.ndarray, labs: np.ndarray, classes: list[str]
                  ) -> dict:
    """The headline figures of a test fold's ``probs``, overall and per lab."""
    keys = ("n", "accuracy", "balanced_accuracy", "balanced_accuracy_ci", "macro_f1",
            "macro_f1_ci", "ece")

    def summary(mask: np.ndarray) -> dict:
        r = metrics.classification_report(labels[mask], probs[mask].argmax(1), classes,
                                          probs[mask])
        return {**{k: r[k] for k in keys},
                "recall": {c: r["per_class"][c]["recall"] for c in classes}}

    return {"test": summary(np.ones(len(labels), bool)),
            "test_per_lab": {str(lab): summary(labs == lab) for lab in sorted(set(labs))}}


def review_report(reasons: list, correct: np.ndarray, beyond: np.ndarray, validation: dict
                  ) -> dict:
    """The review flags on the test fold: coverage, accuracy of the unflagged cells, share per
    reason, share beyond the lab threshold; beside what the validation split gave."""
    flagged = np.asarray([r is not None for r in reasons])
    kept = ~flagged
    per_reason = {r: float(np.mean([r in (x or "").split(";") for x in reasons]))
                  for r in review.REASONS[1:]}
    return {"coverage": float(kept.mean()),
            "unflagged_accuracy": float(correct[kept].mean()) if kept.any() else float("nan"),
            "unflagged_accuracy_ci": metrics.wilson(int(correct[kept].sum()), int(kept.sum())),
            "flagged_share_by_reason": per_reason,
            "beyond_lab_threshold_share": float(np.mean(beyond)),
            "validation": validation}


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
