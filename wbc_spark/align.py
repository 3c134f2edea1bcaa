"""Per-lab alignment of frozen-layer outputs, without labels.

A lab's camera, stain and zoom shift the frozen layers' outputs of all its cells by a shared
offset and scale per channel. ``LabAlignment`` maps each lab's outputs, channel by channel,
to the mean and spread of a reference (the training images' outputs): an AdaBN-like
alignment measured on a lab's unlabelled images (``docs/RESULTS.md``, "each lab's features
aligned without labels").

Moments are kept as sums (``Moments``), so that partial moments from Spark tasks or DDP
ranks add up to the same answer as one pass over every image.

A lab's moments also follow its mix of classes: a lab of mostly neutrophils has the
neutrophils' mean, and mapping it onto a reference of another mix moves its neutrophils
towards the reference's middle, where another class lies. With ``balanced`` moments
(``train.align_classes``, the default) each lab's classes weigh equally: a training lab's
by its labels (``LabSampler``), a lab measured without labels by the model's own calls on
its images, a few rounds (``profile_moments``).

Measured by ``benchmarks/crosslab_levers.py align``. In the jobs with ``train.align=true``:
training maps each training lab's cached outputs (its moments from unaugmented training
crops) and stores the moments in the artifact; scoring maps a run's images by a lab profile,
the (balanced) moments of a sample of the input's own images, measured once and kept beside
the results (``wbc_spark.score``), or by a training lab's stored moments (``score.lab``).
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

MAX_SCALE = 8.0  # a channel's spread is scaled by 1/8 to 8 at most (near-constant channels)
# Each training lab's moments come from this many of its unaugmented crops (or all it has),
# as many as a scoring run's lab profile (score.lab_profile_images' default): with a lab's
# moments from 88 crops, a profile of 256 of the same lab's images moved channels' spreads by
# -7% to +14% (10th-90th percentile) and shifted the model's calls (docs/RESULTS.md, session 26).
LAB_SAMPLE = 256
# A lab's moments weigh its classes equally (``balance``): labs mix the classes differently
# (a smear is mostly neutrophils, a curated collection is not), and the moments of the mix
# move every class of a lab by its mix instead of by its camera and stain. A class rarer
# than 1 / (classes x MAX_CLASS_WEIGHT) of a lab's images weighs at most MAX_CLASS_WEIGHT
# times its share, so a handful of cells does not stand for a fifth of the lab.
MAX_CLASS_WEIGHT = 10.0
# A lab measured without labels (a scoring run's profile, a lab held out): its class mix is
# estimated by the model itself, this many times, each from the images mapped by the last
# estimate (``profile_moments``).
PROFILE_ROUNDS = 3


@dataclass(frozen=True)
class Moments:
    """Per-channel sums over images and positions of N x C x H x W outputs."""

    count: float  # positions summed (images x H x W; weighted in ``mix``)
    total: np.ndarray  # (C,) float64
    squares: np.ndarray  # (C,) float64
    images: int = 0

    @classmethod
    def of(cls, feats: torch.Tensor, chunk: int = 256) -> Moments:
        if feats.dim() != 4:
            raise ValueError(f"moments need N x C x H x W outputs, got shape {tuple(feats.shape)}")
        total = torch.zeros(feats.shape[1], dtype=torch.float64)
        squares = torch.zeros_like(total)
        for i in range(0, len(feats), chunk):
            x = feats[i:i + chunk].double()
            total += x.sum((0, 2, 3))
            squares += (x * x).sum((0, 2, 3))
        return cls(len(feats) * feats.shape[2] * feats.shape[3], total.numpy(),
                   squares.numpy(), len(feats))

    def __add__(self, other: Moments) -> Moments:
        if self.total.shape != other.total.shape:
            raise ValueError(f"moments of {self.total.shape[0]} and {other.total.shape[0]} "
                             "channels cannot be added")
        return Moments(self.count + other.count, self.total + other.total,
                       self.squares + other.squares, self.images + other.images)

    @classmethod
    def mix(cls, parts: list[Moments], weights: np.ndarray) -> Moments:
        """``parts`` summed with ``weights`` (one per part); ``images`` stays their count."""
        w = np.asarray(weights, dtype=np.float64)
        if len(w) != len(parts):
            raise ValueError(f"{len(w)} weights for {len(parts)} moments")
        return cls(float(sum(wi * p.count for wi, p in zip(w, parts))),
                   sum(wi * p.total for wi, p in zip(w, parts)),
                   sum(wi * p.squares for wi, p in zip(w, parts)),
                   sum(p.images for p in parts))

    @property
    def mean(self) -> np.ndarray:
        if self.count == 0:
            raise ValueError("moments of no image")
        return self.total / self.count

    @property
    def sd(self) -> np.ndarray:
        return np.sqrt(np.clip(self.squares / self.count - self.mean ** 2, 0, None))

    def to_state(self) -> dict:
        return {"count": float(self.count), "images": int(self.images),
                "total": self.total.tolist(), "squares": self.squares.tolist()}

    @classmethod
    def from_state(cls, state: dict) -> Moments:
        return cls(float(state["count"]), np.asarray(state["total"], np.float64),
                   np.asarray(state["squares"], np.float64), int(state.get("images", 0)))


def class_balance(shares: np.ndarray, cap: float = MAX_CLASS_WEIGHT) -> np.ndarray:
    """Per class, the weight that makes classes of these ``shares`` (summing to 1) weigh
    equally, at most ``cap``; 0 for a class with no share."""
    shares = np.asarray(shares, dtype=np.float64)
    equal = 1.0 / len(shares)
    return np.where(shares > 0, np.minimum(equal / np.maximum(shares, 1e-12), cap), 0.0)


def balanced(per_class: dict, cap: float = MAX_CLASS_WEIGHT) -> Moments:
    """A labelled lab's moments with its classes weighing equally: ``per_class`` maps each
    class to the moments of the lab's images of that class."""
    parts = list(per_class.values())
    images = np.asarray([p.images for p in parts], dtype=np.float64)
    return Moments.mix(parts, class_balance(images / images.sum(), cap))


def profile_moments(feats: torch.Tensor, reference: Moments,
                    predict: Callable[[torch.Tensor], np.ndarray],
                    rounds: int = PROFILE_ROUNDS, cap: float = MAX_CLASS_WEIGHT) -> Moments:
    """An unlabelled lab's class-balanced moments from its images' frozen outputs ``feats``
    (N x C x H x W): starting from the plain moments, ``rounds`` times the images mapped by
    the last moments go through ``predict`` (class probabilities, N x K), and the images are
    weighed so that the predicted classes weigh equally (``class_balance``)."""
    parts = [Moments.of(feats[i:i + 1]) for i in range(len(feats))]
    moments = functools.reduce(operator.add, parts)
    for _ in range(rounds):
        probs = np.asarray(predict(ChannelMap.between(moments, reference)(feats)), np.float64)
        weights = probs @ class_balance(probs.mean(0), cap)
        moments = Moments.mix(parts, weights * len(weights) / weights.sum())
    return moments


@dataclass(frozen=True)
class ChannelMap:
    """``x * scale + shift`` per channel, kept non-negative (the outputs are ReLU outputs)."""

    scale: torch.Tensor  # (C,)
    shift: torch.Tensor  # (C,)

    @classmethod
    def between(cls, source: Moments, reference: Moments) -> ChannelMap:
        scale = np.clip(reference.sd / np.maximum(source.sd, 1e-6), 1 / MAX_SCALE, MAX_SCALE)
        shift = reference.mean - source.mean * scale
        return cls(torch.from_numpy(scale).float(), torch.from_numpy(shift).float())

    def __call__(self, feats: torch.Tensor) -> torch.Tensor:
        """``feats``: ... x C x H x W (images, or views x images)."""
        out = feats.float() * self.scale.view(-1, 1, 1) + self.shift.view(-1, 1, 1)
        return out.clamp_min(0).to(feats.dtype)


@dataclass
class LabAlignment:
    """The reference moments and each known lab's own moments."""

    reference: Moments
    labs: dict[str, Moments]
    # Whether the labs' classes weigh equally in their moments (``balanced``); a lab measured
    # without labels is then measured by ``profile_moments``. False in models from before.
    balanced: bool = False

    @classmethod
    def fit(cls, feats: torch.Tensor, labs: np.ndarray) -> LabAlignment:
        """Each lab's moments from its rows of ``feats``; the reference from all rows."""
        labs = np.asarray(labs).astype(str)
        if len(labs) != len(feats):
            raise ValueError(f"{len(labs)} labs for {len(feats)} images")
        rows = {str(lab): torch.from_numpy(np.flatnonzero(labs == lab)) for lab in set(labs)}
        return cls.of_labs({lab: Moments.of(feats[rows[lab]]) for lab in sorted(rows)})

    def map_for(self, lab: str, moments: Moments | None = None) -> ChannelMap:
        """The map of ``lab``: from ``moments`` when given (a lab measured on its own images),
        else from the lab's stored moments; an unknown lab without moments is refused."""
        if moments is None:
            if lab not in self.labs:
                raise KeyError(f"lab {lab!r} has no moments: known labs are "
                               f"{', '.join(sorted(self.labs))}; measure it on its own images")
            moments = self.labs[lab]
        return ChannelMap.between(moments, self.reference)

    def apply(self, feats: torch.Tensor, labs: np.ndarray, inplace: bool = False,
              chunk: int = 256) -> torch.Tensor:
        """``feats`` (N x C x H x W, or V x N x C x H x W for views) with image ``i`` mapped
        by the map of ``labs[i]``; ``inplace`` overwrites ``feats`` instead of a copy, ``chunk``
        images at a time (a cache of augmented views is not copied whole)."""
        labs = np.asarray(labs).astype(str)
        n = feats.shape[-4]
        if len(labs) != n:
            raise ValueError(f"{len(labs)} labs for {n} images")
        maps = {lab: self.map_for(lab) for lab in np.unique(labs)}
        out = feats if inplace else feats.clone()
        for start in range(0, n, chunk):
            part = out.narrow(-4, start, min(chunk, n - start))  # a view into ``out``
            part_labs = labs[start:start + part.shape[-4]]
            for lab in np.unique(part_labs):
                at = torch.from_numpy(np.flatnonzero(part_labs == lab))
                part.index_copy_(-4, at, maps[lab](part.index_select(-4, at)))
        return out

    @classmethod
    def of_labs(cls, per_lab: dict[str, Moments], balanced: bool = False) -> LabAlignment:
        """The labs' moments; the reference is their sum (labs measured on equal samples
        weigh equally)."""
        if not per_lab:
            raise ValueError("no lab's moments")
        return cls(functools.reduce(operator.add, per_lab.values()), dict(per_lab), balanced)

    def to_state(self) -> dict:
        return {"reference": self.reference.to_state(), "balanced": self.balanced,
                "labs": {k: v.to_state() for k, v in self.labs.items()}}

    @classmethod
    def from_state(cls, state: dict) -> LabAlignment:
        return cls(Moments.from_state(state["reference"]),
                   {k: Moments.from_state(v) for k, v in state["labs"].items()},
                   bool(state.get("balanced", False)))


class LabSampler:
    """Each lab's moments from its first ``per_lab`` images, fed batch by batch: ``wanted``
    says which of a batch's images are still needed (so only those pass the frozen layers),
    ``add`` sums their outputs, per class when given the labels (``alignment`` then weighs
    each lab's classes equally, ``balanced``)."""

    def __init__(self, per_lab: int = LAB_SAMPLE):
        self.per_lab = per_lab
        self.parts: dict[str, dict[int, Moments]] = {}  # lab -> class (-1: unknown) -> sums

    def count(self, lab: str) -> int:
        return sum(m.images for m in self.parts.get(lab, {}).values())

    def wanted(self, labs: np.ndarray) -> np.ndarray:
        """Indices of ``labs`` to measure, in order: each lab's up to ``per_lab`` in all."""
        counts: dict[str, int] = {}
        take = []
        for i, lab in enumerate(np.asarray(labs).astype(str)):
            counts[lab] = counts.get(lab, self.count(lab))
            if counts[lab] < self.per_lab:
                take.append(i)
                counts[lab] += 1
        return np.asarray(take, dtype=np.int64)

    def add(self, feats: torch.Tensor, labs: np.ndarray, labels: np.ndarray | None = None
            ) -> None:
        labs = np.asarray(labs).astype(str)
        labels = np.full(len(labs), -1) if labels is None else np.asarray(labels).astype(int)
        if len(labs) != len(feats) or len(labels) != len(feats):
            raise ValueError(f"{len(labs)} labs and {len(labels)} labels for {len(feats)} "
                             "images")
        for lab, label in sorted(set(zip(labs, labels))):
            m = Moments.of(feats[torch.from_numpy(np.flatnonzero((labs == lab)
                                                                 & (labels == label)))])
            mine = self.parts.setdefault(str(lab), {})
            mine[int(label)] = mine[label] + m if label in mine else m

    def full(self, labs: set[str]) -> bool:
        """Whether every lab in ``labs`` has its ``per_lab`` images."""
        return all(self.count(lab) >= self.per_lab for lab in labs)

    def alignment(self, balance: bool = False) -> LabAlignment:
        """The labs' alignment; ``balance``: each lab's classes weigh equally (needs every
        image's label), else each image does."""
        labs = {}
        for lab in sorted(self.parts):
            parts = self.parts[lab]
            if balance and -1 in parts:
                raise ValueError(f"lab {lab}: moments without labels cannot weigh its classes")
            labs[lab] = (balanced(parts) if balance
                         else functools.reduce(operator.add, parts.values()))
        return LabAlignment.of_labs(labs, balanced=balance)
