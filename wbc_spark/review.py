"""Knowing when not to trust a prediction: review flags per cell, a shift alarm per scope.

Two feature-space distances, each the smallest squared Mahalanobis distance to a class mean
under one shared (Ledoit-Wolf shrunk) covariance, divided by the number of dimensions:

- ``cell_distance``, in the space the head classifies from (the trained blocks' pooled
  output): how unlike every one of the five classes a cell looks. Far: ``not_a_known_cell``
  (another cell type, debris, no blood at all).
- ``lab_distance``, in the frozen layers' pooled output, to the nearest mean of one training
  lab's class: how unlike the training labs' colours, textures and scale the crop is. Fitted
  on *unaugmented* training crops (augmentation is there to make the classifier ignore a lab's
  look; here the look is what is measured), with a threshold per training lab (a small, varied
  lab's cells lie farther from its means than a large, uniform lab's). A lab the model never
  saw moves most of its cells beyond it, so the share of cells beyond (``shift_score``) is the
  alarm.

Everything is fitted by ``fit`` at training time: the means and covariances on the training
images, the thresholds on the validation split (never the test fold), and stored in the model
artifact (``to_state``). ``conf/``'s ``review`` section overrides the thresholds at scoring
time.

Reasons a cell needs review (``review_reason`` joins them with ``;``):

==================  ===================================================================
unreadable          the file could not be decoded (no prediction)
no_cell_found       the stain locator found no white cell; the centre crop was classified
not_a_known_cell    ``cell_distance`` above the threshold
low_confidence      the calibrated probability of the predicted class under the threshold
==================  ===================================================================
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from wbc_spark.metrics import softmax, wilson
from wbc_spark.model.transfer import inference_precision

REASONS = ("unreadable", "no_cell_found", "not_a_known_cell", "low_confidence")


@dataclass
class Gaussian:
    """Class means with one shared precision matrix (Lee et al. 2018's Mahalanobis score)."""

    means: np.ndarray  # classes x dims
    precision: np.ndarray  # dims x dims

    @classmethod
    def fit(cls, x: np.ndarray, y: np.ndarray, num_classes: int) -> Gaussian:
        # Imported here: scikit-learn costs every scoring worker about a second at start-up,
        # and only training fits.
        from sklearn.covariance import LedoitWolf

        x = np.asarray(x, np.float64)
        present = [c for c in range(num_classes) if (y == c).any()]
        means = np.stack([x[y == c].mean(0) for c in present])
        centred = x - means[np.searchsorted(present, y)]
        precision = LedoitWolf(assume_centered=True).fit(centred).precision_
        return cls(means.astype(np.float32), precision.astype(np.float32))

    def distances(self, x: np.ndarray) -> np.ndarray:
        """Squared Mahalanobis distance to every mean, per dimension (cells x means)."""
        x = np.asarray(x, np.float32)
        xp = x @ self.precision
        d = ((xp * x).sum(1)[:, None] - 2 * xp @ self.means.T
             + ((self.means @ self.precision) * self.means).sum(1)[None, :])
        return np.maximum(d, 0.0) / x.shape[1]

    def distance(self, x: np.ndarray) -> np.ndarray:
        """Smallest squared Mahalanobis distance to a mean, per dimension."""
        return self.distances(x).min(1)

    def to_state(self) -> dict:
        return {"means": torch.from_numpy(self.means), "precision": torch.from_numpy(
            self.precision)}

    @classmethod
    def from_state(cls, state: dict) -> Gaussian:
        return cls(state["means"].numpy(), state["precision"].numpy())


@dataclass
class LabDetector:
    """Means per (training lab, class) of unaugmented frozen features, one shared precision,
    and a distance threshold per lab; a cell is beyond the training labs' range when its
    distance to the nearest mean exceeds that mean's lab's threshold."""

    gaussian: Gaussian  # one component per (lab, class) present
    component_lab: np.ndarray  # lab index of each component
    labs: list[str]
    thresholds: np.ndarray  # per lab

    @classmethod
    def fit(cls, x: np.ndarray, labs: np.ndarray, labels: np.ndarray) -> LabDetector:
        names = sorted(set(map(str, labs)))
        lab_idx = np.searchsorted(names, np.asarray(labs, str))
        keys = lab_idx * 1000 + np.asarray(labels)
        present = np.unique(keys)
        gaussian = Gaussian.fit(x, np.searchsorted(present, keys), len(present))
        return cls(gaussian, (present // 1000).astype(np.int64), names,
                   np.full(len(names), np.inf))

    def nearest(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(distance to the nearest component, that component's lab index)."""
        d = self.gaussian.distances(x)
        k = d.argmin(1)
        return d[np.arange(len(d)), k], self.component_lab[k]

    def beyond(self, x: np.ndarray, override: float = 0.0
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(lab_distance, beyond the range, nearest lab's index); ``override`` > 0 replaces
        every lab's threshold."""
        d, lab = self.nearest(x)
        limit = np.full(len(d), override) if override > 0 else self.thresholds[lab]
        return d, d > limit, lab

    def to_state(self) -> dict:
        return {**self.gaussian.to_state(), "component_lab": torch.from_numpy(
            self.component_lab), "labs": list(self.labs),
            "thresholds": [float(t) for t in self.thresholds]}

    @classmethod
    def from_state(cls, state: dict) -> LabDetector:
        return cls(Gaussian.from_state(state), state["component_lab"].numpy(),
                   list(state["labs"]), np.asarray(state["thresholds"], float))


def embed(model, frozen: torch.Tensor, batch: int = 256, lab_features: np.ndarray | None = None,
          precision: str = "fp32") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(logits, head-space features, frozen pooled features) of frozen-layer outputs.
    ``lab_features``: the third part when it is not ``frozen``'s own (``frozen`` aligned,
    ``wbc_spark.align``: the lab detector compares the unaligned outputs); nothing is pooled
    then. ``precision``: the trained layers' arithmetic, as ``head``."""
    if lab_features is None:
        lab_features = pooled(frozen, batch)
    return (*head(model, frozen, batch, precision), lab_features)


def head(model, frozen: torch.Tensor, batch: int = 256, precision: str = "fp32"
         ) -> tuple[np.ndarray, np.ndarray]:
    """(logits, head-space features) of frozen-layer outputs: ``embed`` without the pooled
    features (where only the cells' side is wanted, as for the training cells in ``fit``).
    ``precision``: the trained layers' arithmetic, "fp32" (what the temperature and the
    thresholds were fitted with) or "bf16" (autocast, ``inference_precision``); both
    answers are fp32."""
    logits, cell = [], []
    with torch.inference_mode(), inference_precision(precision, frozen.device.type):
        for i in range(0, len(frozen), batch):
            pen = model.trainable(frozen[i:i + batch].float())
            logits.append(model.fc(pen).float())  # dropout is the identity in eval mode
            cell.append(pen.float())
    return torch.cat(logits).cpu().numpy(), torch.cat(cell).cpu().numpy()


def pooled(frozen: torch.Tensor, batch: int = 256) -> np.ndarray:
    """Frozen-layer outputs averaged over space: what the lab detector compares (the third
    part of ``embed``'s answer, without the trained blocks)."""
    with torch.inference_mode():
        return torch.cat([frozen[i:i + batch].float().mean((2, 3))
                          for i in range(0, len(frozen), batch)]).cpu().numpy()


def confidence_threshold(confidence: np.ndarray, target: float) -> tuple[float, float]:
    """The lowest threshold at which the cells at or above it are expected to be right in a
    share >= ``target``: the mean of their calibrated probabilities (``confidence``, the
    predicted class's), and the share of cells it keeps. Where no threshold reaches the
    target, 1.0 (flag everything) and coverage 0.

    Expected, not counted: a validation split of about 600 cells holds a handful of errors
    among its most confident cells, and where they fall decided a counted threshold. On the
    five in-lab folds of ``benchmarks/review.py`` counting gave thresholds of 0.955-0.999 and
    kept 9-59% of the validation cells; the calibrated expectation, the same folds trained
    again, 0.983-0.987 and 42-56%, at the same accuracy of the unflagged test cells
    (docs/RESULTS.md, "Review flags", session 44)."""
    order = np.argsort(-confidence, kind="stable")
    ranked = np.asarray(confidence, float)[order]
    expected = np.cumsum(ranked) / np.arange(1, len(ranked) + 1)
    ok = np.flatnonzero(expected >= target)
    if not len(ok):
        return 1.0, 0.0
    k = ok[-1]
    return float(ranked[k]), float((k + 1) / len(ranked))


@dataclass
class ReviewModel:
    cell: Gaussian
    lab: LabDetector
    confidence_threshold: float
    cell_threshold: float
    lab_threshold: float  # > 0: replaces the lab detector's per-lab thresholds (an override)
    validation: dict  # what the thresholds gave on the validation split

    def to_state(self) -> dict:
        return {"cell": self.cell.to_state(), "lab": self.lab.to_state(),
                "confidence_threshold": self.confidence_threshold,
                "cell_threshold": self.cell_threshold, "lab_threshold": self.lab_threshold,
                "validation": self.validation}

    @classmethod
    def from_state(cls, state: dict) -> ReviewModel:
        return cls(Gaussian.from_state(state["cell"]), LabDetector.from_state(state["lab"]),
                   float(state["confidence_threshold"]), float(state["cell_threshold"]),
                   float(state.get("lab_threshold", 0.0)), dict(state.get("validation", {})))

    def with_overrides(self, settings) -> ReviewModel:
        """Thresholds from ``conf/``'s ``review`` section where set (> 0)."""
        return ReviewModel(
            self.cell, self.lab,
            settings.confidence_threshold or self.confidence_threshold,
            settings.cell_threshold or self.cell_threshold,
            settings.lab_threshold or self.lab_threshold, self.validation)

    def distances(self, cell_features: np.ndarray, lab_features: np.ndarray
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]:
        """(cell_distance, lab_distance, beyond the training labs' range, the training lab
        whose cells it lies nearest to) per cell."""
        lab_d, beyond, lab = self.lab.beyond(lab_features, self.lab_threshold)
        return (self.cell.distance(cell_features), lab_d, beyond,
                [self.lab.labs[i] for i in lab])


# Training views the cell detector is fitted on, at most (``training_cells``).
CELL_SAMPLE = 20_000


def training_cells(model, train_frozen: torch.Tensor, train_labels: np.ndarray,
                   limit: int = CELL_SAMPLE, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(head-space features, labels) of training views for the cell detector (``fit``): all
    of ``train_frozen`` (frozen outputs of augmented views, what the head learnt from), or
    ``limit`` of them drawn at random (``seed``) where there are more. In fp32, as the
    validation cells its threshold is set on. A distributed training calls it on each rank's
    share and joins the parts."""
    model.eval()
    pick = np.arange(len(train_frozen))
    if len(pick) > limit:
        pick = np.sort(np.random.default_rng(seed).choice(len(pick), limit, replace=False))
    _, cells = head(model, train_frozen[torch.as_tensor(pick)])
    return cells, np.asarray(train_labels)[pick]


def fit(model, train_cells: np.ndarray, train_labels: np.ndarray, val_frozen: torch.Tensor,
        val_labels: np.ndarray, temperature: float, num_classes: int, settings, *,
        plain_pooled: np.ndarray, plain_labels: np.ndarray, plain_labs: np.ndarray,
        val_labs: np.ndarray, val_pooled: np.ndarray | None = None,
        val_probs: np.ndarray | None = None) -> ReviewModel:
    """Fit the detectors and set the thresholds on the validation split.

    The cell detector is fitted on training views' head-space features (``train_cells``, with
    their labels: ``training_cells``), the lab detector on unaugmented
    training crops (``plain_pooled``, their frozen outputs as ``pooled`` gives them, with their
    labels and labs). Thresholds: the confidence threshold for ``settings.target_accuracy`` of
    the unflagged (expected from the calibrated probabilities: ``confidence_threshold``); the
    cell threshold at the ``settings.cell_quantile`` of validation cells; each lab's threshold
    at the ``settings.lab_quantile`` of its own validation cells (``val_labs``).
    ``val_pooled``: the validation cells' pooled outputs for the lab detector, when
    ``val_frozen`` is aligned (``wbc_spark.align``) and they differ. ``val_probs``: the
    validation cells' probabilities where they are not ``val_frozen``'s at ``temperature``
    (a model that averages test-time views, ``model.test_views``).
    """
    model.eval()
    cell = Gaussian.fit(np.asarray(train_cells), np.asarray(train_labels), num_classes)
    lab = LabDetector.fit(np.asarray(plain_pooled), plain_labs, plain_labels)
    logits, cell_va, lab_va = embed(model, val_frozen, lab_features=val_pooled)
    probs = softmax(logits, temperature) if val_probs is None else val_probs
    conf_t, coverage = confidence_threshold(probs.max(1), settings.target_accuracy)
    kept = probs.max(1) >= conf_t
    kept_accuracy = (float((probs.argmax(1) == val_labels)[kept].mean()) if kept.any()
                     else None)
    cell_d = cell.distance(cell_va)
    cell_t = float(np.quantile(cell_d, settings.cell_quantile))
    lab_d, _ = lab.nearest(lab_va)
    val_labs = np.asarray(val_labs, str)
    pooled = float(np.quantile(lab_d, settings.lab_quantile))
    # A training lab without validation cells (possible only for tiny labs) gets the
    # threshold of all validation cells.
    lab.thresholds = np.asarray([
        float(np.quantile(lab_d[val_labs == name], settings.lab_quantile))
        if (val_labs == name).sum() >= 5 else pooled for name in lab.labs])
    _, beyond, _ = lab.beyond(lab_va)
    validation = {"images": int(len(val_labels)), "target_accuracy": settings.target_accuracy,
                  "confident_coverage": coverage, "confident_accuracy": kept_accuracy,
                  "not_a_known_cell_share": float((cell_d > cell_t).mean()),
                  "beyond_lab_threshold_share": float(beyond.mean()),
                  "lab_thresholds": dict(zip(lab.labs, map(float, lab.thresholds)))}
    return ReviewModel(cell, lab, conf_t, cell_t, 0.0, validation)


def flags(confidence: np.ndarray, cell_distance: np.ndarray, cell_found: np.ndarray,
          review: ReviewModel) -> list[str | None]:
    """``review_reason`` of each classified cell (None: no review needed)."""
    out = []
    for conf, dist, found in zip(confidence, cell_distance, cell_found):
        reasons = [r for r, hit in (("no_cell_found", not found),
                                    ("not_a_known_cell", dist > review.cell_threshold),
                                    ("low_confidence", conf < review.confidence_threshold))
                   if hit]
        out.append(";".join(reasons) or None)
    return out


def shift_alarm(beyond: int, cells: int, alarm_share: float, min_cells: int = 10
                ) -> tuple[float, bool]:
    """``shift_score``: the share of a scope's cells beyond the lab threshold (about
    1 - lab_quantile for images like the training labs'); the alarm fires for a scope of at
    least ``min_cells`` cells when the 95% Wilson interval of that share lies wholly above
    ``alarm_share``."""
    if cells == 0:
        return float("nan"), False
    low, _ = wilson(beyond, cells)
    return beyond / cells, bool(cells >= min_cells and low > alarm_share)
