"""The white-cell differential of a slide, corrected for the model's measured confusion.

Counting the model's top predictions carries every systematic confusion into the
differential (monocytes called lymphocytes raise the lymphocyte share), and a Wilson interval
on those counts covers only the sampling of cells. Here the shares are estimated with the
model's confusion on its held-out test fold as a known measurement error:

- a cell *counts* when it was classified and the stain locator found a cell in it
  (``review_reason`` without ``no_cell_found`` or ``unreadable``); the others are counted
  apart. Cells flagged ``low_confidence`` or ``not_a_known_cell`` count in their predicted
  class (and are counted apart as flagged too): how often such cells are wrong is part of
  the measured confusion. Leaving them out of the differential was measured and is worse
  (docs/RESULTS.md, "The differential"): the flags concentrate in some classes and, for
  KRD-WBC, take a fifth of its true white cells;
- ``Confusion``: held-out cells of each true class by outcome, the predicted class of a
  counted cell or ``excluded`` (the last column), pooled and per training lab. A slide is
  corrected with the confusion of the lab its cells lie nearest to (the lab detector of
  ``wbc_spark.review``), each row shrunk toward the pooled rates by ``PRIOR_CELLS``
  pseudo-cells (a lab's test fold may hold two eosinophils);
- ``estimate``: the posterior of the slide's class shares ``p`` given its counted cells,
  where a cell of class ``i`` is counted as ``j`` with probability ``A[i, j]``. A Gibbs
  sampler allocates each predicted class's count to true classes (``p_i A[i, j]``), draws the
  excluded cells of each class (negative binomial), then ``p`` from its Dirichlet. Each chain
  draws its own ``A`` from the Dirichlet posterior of the held-out counts, so the 95% interval
  holds both the sampling of the slide's cells and the uncertainty of the correction.

The point estimate is the posterior mean; with a Jeffreys prior (0.5 per class) and
near-diagonal confusion it stays close to the counted shares, and moves where the test fold
showed a confusion.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

COUNTED_OUT = ("unreadable", "no_cell_found")
# Pseudo-cells per true class pulling a lab's confusion row toward the pooled rates.
PRIOR_CELLS = 5.0


def counts_as_cell(reason: str | None) -> bool:
    """Whether a classified cell with this ``review_reason`` enters the differential."""
    return not (set((reason or "").split(";")) & set(COUNTED_OUT))


def scope_lab(nearest: Mapping[str, int]) -> str | None:
    """The lab whose confusion corrects a scope: the one most of its cells lie nearest to
    (``nearest``: cells per training lab; the first listed wins a tie); None where no cell
    was placed (a model without the lab detector), and the pooled confusion is used."""
    counts = {lab: n for lab, n in nearest.items() if n > 0}
    return max(counts, key=counts.get) if counts else None


class ConfusionError(ValueError):
    """A confusion matrix that does not fit the model or the counts."""


@dataclass(frozen=True)
class Confusion:
    """Held-out cells: rows the true class, columns the counted prediction, then excluded;
    pooled over the test fold (``counts``) and per lab (``per_lab``)."""

    classes: tuple[str, ...]
    counts: np.ndarray  # (K, K + 1) non-negative (pseudo-)counts
    per_lab: dict = field(default_factory=dict)  # lab -> (K, K + 1) counts

    def __post_init__(self) -> None:
        k = len(self.classes)
        for c in (self.counts, *self.per_lab.values()):
            c = np.asarray(c)
            if c.shape != (k, k + 1) or (c < 0).any():
                raise ConfusionError(f"confusion counts of shape {c.shape} for {k} classes "
                                     f"(need {k} x {k + 1} non-negative counts)")

    @classmethod
    def from_predictions(cls, classes: Sequence[str], true: np.ndarray, predicted: np.ndarray,
                         reasons: Sequence[str | None], labs: Sequence[str] | None = None
                         ) -> Confusion:
        """From class indices of held-out cells, their review reasons and labs."""
        k = len(classes)
        labs = list(labs) if labs is not None else [None] * len(reasons)
        counts = np.zeros((k, k + 1), np.int64)
        per_lab: dict = {}
        for t, p, r, lab in zip(np.asarray(true), np.asarray(predicted), reasons, labs):
            j = int(p) if counts_as_cell(r) else k
            counts[int(t), j] += 1
            if lab is not None:
                per_lab.setdefault(str(lab), np.zeros((k, k + 1), np.int64))[int(t), j] += 1
        return cls(tuple(classes), counts, per_lab)

    def for_lab(self, lab: str | None) -> Confusion:
        """The confusion to correct a slide of ``lab`` with: that lab's held-out counts plus
        ``PRIOR_CELLS`` pseudo-cells per true class at the pooled rates; the pooled counts
        for a lab without its own."""
        if lab not in self.per_lab:
            return Confusion(self.classes, self.counts)
        pooled = np.asarray(self.counts, float) + 0.5
        rates = pooled / pooled.sum(1, keepdims=True)
        return Confusion(self.classes, np.asarray(self.per_lab[lab]) + PRIOR_CELLS * rates)

    def to_state(self) -> dict:
        return {"classes": list(self.classes), "counts": np.asarray(self.counts).tolist(),
                "per_lab": {lab: np.asarray(c).tolist() for lab, c in self.per_lab.items()},
                "columns": [*self.classes, "excluded"]}

    @classmethod
    def from_state(cls, state: dict) -> Confusion:
        return cls(tuple(state["classes"]), np.asarray(state["counts"]),
                   {lab: np.asarray(c) for lab, c in state.get("per_lab", {}).items()})

    def check(self, classes: Sequence[str]) -> None:
        if tuple(classes) != self.classes:
            raise ConfusionError(f"confusion is for classes {list(self.classes)}, not "
                                 f"{list(classes)}")


@dataclass(frozen=True)
class Estimate:
    """Per class: posterior mean share and its 95% interval (arrays over ``(..., K)``)."""

    share: np.ndarray
    low: np.ndarray
    high: np.ndarray


def estimate(counts: np.ndarray, confusion: Confusion, *, chains: int = 200,
             iterations: int = 60, keep: int = 20, prior: float = 0.5,
             confusion_prior: float = 0.5, seed: int = 0) -> Estimate:
    """Corrected shares for counted cells per predicted class, ``counts`` of shape (K,) or
    (slides, K); slides without counted cells get NaN."""
    counts = np.asarray(counts, np.int64)
    single = counts.ndim == 1
    c = counts[None] if single else counts
    k = len(confusion.classes)
    if c.shape[-1] != k:
        raise ConfusionError(f"{c.shape[-1]} counts for {k} classes")
    if (c < 0).any():
        raise ConfusionError("negative counts")
    rng = np.random.default_rng(seed)
    s = c.shape[0]
    # Each chain's confusion: Dirichlet posterior of each true class's held-out outcomes.
    a = rng.gamma(np.asarray(confusion.counts, float)[None] + confusion_prior,
                  size=(chains, k, k + 1))
    a /= a.sum(-1, keepdims=True)
    counted, kept_rate = a[:, :, :k], 1.0 - a[:, :, k]           # (C, K, K), (C, K)
    n = c.sum(-1, keepdims=True)
    p = np.broadcast_to((c + prior) / (n + k * prior), (chains, s, k)).transpose(1, 0, 2).copy()
    draws = []
    for it in range(iterations):
        # w[s, c, j, i] = p_i A[i, j] / sum_i'  (true class i of a cell counted as j)
        w = p[:, :, None, :] * counted.transpose(0, 2, 1)[None]
        w /= w.sum(-1, keepdims=True)
        z = rng.multinomial(np.broadcast_to(c[:, None, :], (s, chains, k)), w).sum(2)
        kept = np.broadcast_to(kept_rate[None], z.shape)
        m = np.where(z > 0, rng.negative_binomial(np.maximum(z, 1), kept), 0)
        g = rng.gamma(prior + z + m)
        p = g / g.sum(-1, keepdims=True)
        if it >= iterations - keep:
            draws.append(p)
    d = np.concatenate(draws, axis=1)                               # (S, chains * keep, K)
    share = d.mean(1)
    low, high = np.quantile(d, [0.025, 0.975], axis=1)
    empty = n[:, 0] == 0
    share[empty], low[empty], high[empty] = np.nan, np.nan, np.nan
    if single:
        return Estimate(share[0], low[0], high[0])
    return Estimate(share, low, high)
