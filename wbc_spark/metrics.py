"""Scores with 95% intervals, calibration error and the confusion matrix."""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw


def wilson(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a proportion (``(nan, nan)`` when n is 0), SciPy's."""
    from scipy import stats  # here: importing scipy.stats costs a scoring worker 0.6 s

    if n == 0:
        return (math.nan, math.nan)
    ci = stats.binomtest(int(successes), int(n)).proportion_ci(confidence, method="wilson")
    return (float(ci.low), float(ci.high))


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Class probabilities of ``logits`` (rows) at ``temperature``, computed stably."""
    z = logits / temperature
    z = z - z.max(1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(1, keepdims=True)


def mean_probs(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """The mean over views of ``softmax`` of views x N x classes ``logits``: how test-time
    flips score each image (``model.test_views``)."""
    return np.mean([softmax(z, temperature) for z in logits], axis=0)


def confusion(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    """Rows: true class, columns: predicted class."""
    m = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(m, (np.asarray(y_true), np.asarray(y_pred)), 1)
    return m


def _f1(p: float, r: float) -> float:
    return 0.0 if p + r == 0 or math.isnan(p) or math.isnan(r) else 2 * p * r / (p + r)


def macro_f1(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> float:
    m = confusion(y_true, y_pred, num_classes)
    f1s = []
    for c in range(num_classes):
        if m[c].sum() == 0 and m[:, c].sum() == 0:
            continue  # class absent from truth and predictions: undefined, skipped
        tp = m[c, c]
        p = tp / m[:, c].sum() if m[:, c].sum() else 0.0
        r = tp / m[c].sum() if m[c].sum() else 0.0
        f1s.append(_f1(p, r))
    return float(np.mean(f1s)) if f1s else math.nan


def expected_calibration_error(probs: np.ndarray, y_true: np.ndarray, bins: int = 15) -> float:
    """ECE of the top-class confidence over ``bins`` equal-width bins."""
    conf = probs.max(1)
    correct = probs.argmax(1) == y_true
    edges = np.linspace(0, 1, bins + 1)
    ece = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        sel = (conf > lo) & (conf <= hi)
        if sel.any():
            ece += sel.mean() * abs(correct[sel].mean() - conf[sel].mean())
    return float(ece)


def bootstrap_interval(y_true: np.ndarray, y_pred: np.ndarray, fn, *, n: int = 1000,
                       seed: int = 0) -> tuple[float, float]:
    """95% percentile bootstrap interval of ``fn(y_true, y_pred)`` over resampled images."""
    rng = np.random.default_rng(seed)
    idx = np.arange(len(y_true))
    values = []
    for _ in range(n):
        s = rng.choice(idx, size=len(idx), replace=True)
        values.append(fn(y_true[s], y_pred[s]))
    lo, hi = np.nanpercentile(values, [2.5, 97.5])
    return (float(lo), float(hi))


def classification_report(y_true, y_pred, classes: list[str], probs: np.ndarray | None = None
                          ) -> dict:
    """Accuracy, balanced accuracy, macro-F1 (with 95% intervals), per-class scores, confusion.

    Proportions (accuracy, precision, recall) carry Wilson intervals; balanced accuracy,
    macro-F1 and F1 carry percentile-bootstrap intervals.
    """
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    k = len(classes)
    m = confusion(y_true, y_pred, k)
    n = int(m.sum())
    correct = int(np.trace(m))
    per_class = {}
    recalls = []
    for c, name in enumerate(classes):
        support, predicted, tp = int(m[c].sum()), int(m[:, c].sum()), int(m[c, c])
        precision = tp / predicted if predicted else math.nan
        recall = tp / support if support else math.nan
        if support:
            recalls.append(recall)
        per_class[name] = {
            "support": support, "predicted": predicted,
            "precision": precision, "precision_ci": wilson(tp, predicted),
            "recall": recall, "recall_ci": wilson(tp, support),
            "f1": _f1(precision, recall),
        }

    def bal_acc(t, p):
        mm = confusion(t, p, k)
        rs = [mm[c, c] / mm[c].sum() for c in range(k) if mm[c].sum()]
        return float(np.mean(rs)) if rs else math.nan

    report = {
        "n": n,
        "accuracy": correct / n if n else math.nan,
        "accuracy_ci": wilson(correct, n),
        "balanced_accuracy": float(np.mean(recalls)) if recalls else math.nan,
        "balanced_accuracy_ci": bootstrap_interval(y_true, y_pred, bal_acc),
        "macro_f1": macro_f1(y_true, y_pred, k),
        "macro_f1_ci": bootstrap_interval(y_true, y_pred, lambda t, p: macro_f1(t, p, k)),
        "per_class": per_class,
        "confusion": m.tolist(),
        "classes": list(classes),
    }
    if probs is not None:
        report["ece"] = expected_calibration_error(np.asarray(probs), y_true)
    return report


def format_report(report: dict) -> str:
    """A plain-text table of a ``classification_report``."""
    def ci(v):
        return f"[{v[0]:.3f}, {v[1]:.3f}]"

    lines = [
        f"n={report['n']}  accuracy {report['accuracy']:.3f} {ci(report['accuracy_ci'])}  "
        f"balanced accuracy {report['balanced_accuracy']:.3f} "
        f"{ci(report['balanced_accuracy_ci'])}  macro-F1 {report['macro_f1']:.3f} "
        f"{ci(report['macro_f1_ci'])}" + (f"  ECE {report['ece']:.3f}" if "ece" in report else ""),
        f"{'class':<12}{'support':>8}{'precision':>11}{'95% CI':>17}{'recall':>8}{'95% CI':>17}"
        f"{'F1':>7}",
    ]
    for name, s in report["per_class"].items():
        lines.append(f"{name:<12}{s['support']:>8}{s['precision']:>11.3f}{ci(s['precision_ci']):>17}"
                     f"{s['recall']:>8.3f}{ci(s['recall_ci']):>17}{s['f1']:>7.3f}")
    width = max(len(c) for c in report["classes"]) + 2
    lines.append("confusion (rows true, columns predicted):")
    lines.append(" " * width + "".join(f"{c[:5]:>7}" for c in report["classes"]))
    for name, row in zip(report["classes"], report["confusion"]):
        lines.append(f"{name:<{width}}" + "".join(f"{v:>7}" for v in row))
    return "\n".join(lines)


def confusion_png(matrix, classes: list[str], path: str, title: str = "") -> None:
    """Draw the confusion matrix as a PNG (row-normalised shading, counts in cells)."""
    m = np.asarray(matrix)
    cell, left, top = 70, 110, 60
    k = len(classes)
    img = Image.new("RGB", (left + cell * k + 10, top + cell * k + 40), "white")
    draw = ImageDraw.Draw(img)
    draw.text((10, 10), title or "confusion matrix (rows: true, columns: predicted)", fill="black")
    rows = m.sum(1, keepdims=True).clip(min=1)
    for i in range(k):
        draw.text((5, top + i * cell + cell // 2 - 5), classes[i][:14], fill="black")
        draw.text((left + i * cell + 3, top - 15), classes[i][:9], fill="black")
        for j in range(k):
            shade = int(255 * (1 - m[i, j] / rows[i, 0]))
            x0, y0 = left + j * cell, top + i * cell
            draw.rectangle([x0, y0, x0 + cell - 2, y0 + cell - 2], fill=(shade, shade, 255))
            draw.text((x0 + cell // 2 - 8, y0 + cell // 2 - 5), str(int(m[i, j])),
                      fill="black" if shade > 120 else "white")
    img.save(path)
