"""Per-lab alignment of frozen-layer outputs, without labels.

A lab's camera, stain and zoom shift the frozen layers' outputs of all its cells by a shared
offset and scale per channel. ``LabAlignment`` maps each lab's outputs, channel by channel,
to the mean and spread of a reference (the training images' outputs): an AdaBN-like
alignment measured on a lab's unlabelled images (``docs/RESULTS.md``, "each lab's features
aligned without labels").

Moments are kept as sums (``Moments``), so that partial moments from Spark tasks or DDP
ranks add up to the same answer as one pass over every image.

Measured by ``benchmarks/crosslab_levers.py align``. In the jobs with ``train.align=true``:
training maps each training lab's cached outputs (its moments from unaugmented training
crops) and stores the moments in the artifact; scoring maps a run's images by a lab profile,
the moments of a sample of the input's own images, measured once and kept beside the results
(``wbc_spark.score``), or by a training lab's stored moments (``score.lab``).
"""

from __future__ import annotations

import functools
import operator
from dataclasses import dataclass

import numpy as np
import torch

MAX_SCALE = 8.0  # a channel's spread is scaled by 1/8 to 8 at most (near-constant channels)
# Each training lab's moments come from this many of its unaugmented crops (or all it has),
# as many as a scoring run's lab profile (score.lab_profile_images' default): with a lab's
# moments from 88 crops, a profile of 256 of the same lab's images moved channels' spreads by
# -7% to +14% (10th-90th percentile) and shifted the model's calls (docs/RESULTS.md, session 26).
LAB_SAMPLE = 256


@dataclass(frozen=True)
class Moments:
    """Per-channel sums over images and positions of N x C x H x W outputs."""

    count: int  # positions summed (images x H x W)
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
            total += x.sum((0, 2, 3)).cpu()
            squares += (x * x).sum((0, 2, 3)).cpu()
        return cls(len(feats) * feats.shape[2] * feats.shape[3], total.numpy(),
                   squares.numpy(), len(feats))

    def __add__(self, other: Moments) -> Moments:
        if self.total.shape != other.total.shape:
            raise ValueError(f"moments of {self.total.shape[0]} and {other.total.shape[0]} "
                             "channels cannot be added")
        return Moments(self.count + other.count, self.total + other.total,
                       self.squares + other.squares, self.images + other.images)

    @property
    def mean(self) -> np.ndarray:
        if self.count == 0:
            raise ValueError("moments of no image")
        return self.total / self.count

    @property
    def sd(self) -> np.ndarray:
        return np.sqrt(np.clip(self.squares / self.count - self.mean ** 2, 0, None))

    def to_state(self) -> dict:
        return {"count": int(self.count), "images": int(self.images),
                "total": self.total.tolist(), "squares": self.squares.tolist()}

    @classmethod
    def from_state(cls, state: dict) -> Moments:
        return cls(int(state["count"]), np.asarray(state["total"], np.float64),
                   np.asarray(state["squares"], np.float64), int(state.get("images", 0)))


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
        scale, shift = self.scale.to(feats.device), self.shift.to(feats.device)
        # In place on one fp32 copy: the same arithmetic as ``x * scale + shift`` (each
        # product rounded to fp32, then the sum), without three more temporaries.
        out = feats.to(torch.float32, copy=True)
        out.mul_(scale.view(-1, 1, 1)).add_(shift.view(-1, 1, 1)).clamp_(min=0)
        return out.to(feats.dtype)


@dataclass
class LabAlignment:
    """The reference moments and each known lab's own moments."""

    reference: Moments
    labs: dict[str, Moments]

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
            present = np.unique(part_labs)
            if len(present) == 1:  # the usual chunk: rows of one lab, mapped where they are
                part.copy_(maps[present[0]](part))
                continue
            for lab in present:
                at = torch.from_numpy(np.flatnonzero(part_labs == lab))
                part.index_copy_(-4, at, maps[lab](part.index_select(-4, at)))
        return out

    @classmethod
    def of_labs(cls, per_lab: dict[str, Moments]) -> LabAlignment:
        """The labs' moments; the reference is their sum (labs measured on equal samples
        weigh equally)."""
        if not per_lab:
            raise ValueError("no lab's moments")
        return cls(functools.reduce(operator.add, per_lab.values()), dict(per_lab))

    def to_state(self) -> dict:
        return {"reference": self.reference.to_state(),
                "labs": {k: v.to_state() for k, v in self.labs.items()}}

    @classmethod
    def from_state(cls, state: dict) -> LabAlignment:
        return cls(Moments.from_state(state["reference"]),
                   {k: Moments.from_state(v) for k, v in state["labs"].items()})


class LabSampler:
    """Each lab's moments from its first ``per_lab`` images, fed batch by batch: ``wanted``
    says which of a batch's images are still needed (so only those pass the frozen layers),
    ``add`` sums their outputs."""

    def __init__(self, per_lab: int = LAB_SAMPLE):
        self.per_lab = per_lab
        self.labs: dict[str, Moments] = {}

    def count(self, lab: str) -> int:
        return self.labs[lab].images if lab in self.labs else 0

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

    def add(self, feats: torch.Tensor, labs: np.ndarray) -> None:
        labs = np.asarray(labs).astype(str)
        if len(labs) != len(feats):
            raise ValueError(f"{len(labs)} labs for {len(feats)} images")
        for lab in sorted(set(labs)):
            m = Moments.of(feats[torch.from_numpy(np.flatnonzero(labs == lab))])
            self.labs[str(lab)] = self.labs[lab] + m if lab in self.labs else m

    def full(self, labs: set[str]) -> bool:
        """Whether every lab in ``labs`` has its ``per_lab`` images."""
        return all(self.count(lab) >= self.per_lab for lab in labs)

    def alignment(self) -> LabAlignment:
        return LabAlignment.of_labs({lab: self.labs[lab] for lab in sorted(self.labs)})
