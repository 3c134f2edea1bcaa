"""The self-describing model artifact: weights plus everything needed to use and trust them.

Saved with ``torch.save`` as a dict of tensors and plain Python values, so it loads with
``torch.load(path, weights_only=True)`` (no pickled code runs on load). Written atomically:
a temporary file in the same folder, fsynced, then renamed over the target.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import io
import os
import platform
import tempfile
from pathlib import Path

import torch

from wbc_spark.model.transfer import WBCNet, rebuild
from wbc_spark.model.weights import InputConvention

FORMAT = "wbc_spark.model/1"
REQUIRED = ("format", "model_id", "classes", "state_dict", "preprocessing", "architecture",
            "temperature")


class ArtifactError(ValueError):
    """A model artifact is unreadable, incomplete, or does not fit the request."""


def versions() -> dict:
    """The versions that made an artifact, read from the installed distributions' metadata
    (torchvision, an optional extra, is not imported: a CPU build of torch cannot load a
    CUDA build's operators)."""
    # str(): torch.__version__ is a TorchVersion object, which weights_only loading refuses.
    out = {"python": platform.python_version(), "torch": str(torch.__version__)}
    for name in ("torchvision", "numpy", "pyarrow", "pyspark"):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def save(path: str | os.PathLike, model: WBCNet, *, classes: list[str], source: str,
         convention: InputConvention, preprocessing: dict, config: dict, provenance: dict,
         metrics: dict, temperature: float = 1.0, trained_on: dict | None = None,
         review: dict | None = None, confusion: dict | None = None,
         int8: dict | None = None, alignment: dict | None = None, test_views: int = 1) -> str:
    """Atomically write the artifact; return its model ID (see ``model_digest``).
    ``test_views``: how many flips and rotations of each image its probabilities average
    (``temperature`` was fitted on that mean)."""
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    review = review or {}
    confusion = confusion or {}
    int8 = int8 or {}
    alignment = alignment or {}
    model_id = model_digest(state, temperature, review, preprocessing, confusion, int8,
                            alignment, test_views)
    payload = {
        "format": FORMAT,
        "model_id": model_id,
        "classes": list(classes),
        "state_dict": state,
        "architecture": {"name": "googlenet", "source": source,
                         "freeze_until": model.freeze_until,
                         "dropout": float(model.dropout.p)},
        "preprocessing": {**preprocessing, "input_convention": convention.to_dict()},
        "temperature": float(temperature),
        # Each image scored on the mean of its first test_views flips and rotations
        # (wbc_spark.transforms.dihedral); absent in artifacts older than it: 1.
        "test_views": int(test_views),
        "config": config,
        "weights_provenance": provenance,
        "versions": versions(),
        "metrics": metrics,
        # Lab -> class -> images the model was trained on (the test fold not included).
        "trained_on": trained_on or {},
        # Review detectors and thresholds (wbc_spark.review.ReviewModel.to_state).
        "review": review,
        # Held-out test-fold confusion for the corrected differential
        # (wbc_spark.differential.Confusion.to_state).
        "confusion": confusion,
        # int8 activation ranges (wbc_spark.model.quantize.calibration_state); empty: the
        # model cannot score in int8.
        "int8": int8,
        # Lab alignment (wbc_spark.align.LabAlignment.to_state): the training labs' and the
        # reference's moments; empty: trained without train.align.
        "alignment": alignment,
    }
    buf = io.BytesIO()
    torch.save(payload, buf)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(buf.getvalue())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return model_id


def model_digest(state: dict, temperature: float, review: dict, preprocessing: dict,
                 confusion: dict | None = None, int8: dict | None = None,
                 alignment: dict | None = None, test_views: int = 1) -> str:
    """The model ID: a digest of everything that changes a prediction, a flag or a corrected
    share (weights, temperature, review detectors and thresholds, preprocessing, held-out
    confusion, int8 calibration, lab alignment, test-time views), so a recalibrated model is a
    new model whose results do not mix with the old one's."""
    digest = hashlib.sha256()
    for k in sorted(state):
        digest.update(k.encode())
        digest.update(state[k].numpy().tobytes())
    digest.update(repr(float(temperature)).encode())

    def walk(prefix: str, value) -> None:
        if isinstance(value, dict):
            for k in sorted(value):
                walk(f"{prefix}/{k}", value[k])
        elif isinstance(value, torch.Tensor):
            digest.update(prefix.encode())
            digest.update(value.contiguous().numpy().tobytes())
        else:
            digest.update(f"{prefix}={value!r}".encode())

    walk("review", review)
    walk("preprocessing", preprocessing)
    if confusion:
        walk("confusion", confusion)
    if int8:
        walk("int8", int8)
    if alignment:
        walk("alignment", alignment)
    if test_views != 1:  # a single view keeps the IDs of the models made before views existed
        digest.update(f"test_views={int(test_views)}".encode())
    return digest.hexdigest()[:16]


def load(path: str | os.PathLike, *, expected_classes: list[str] | None = None
         ) -> tuple[WBCNet, dict]:
    """Load an artifact safely; refuse one that is incomplete or made for other classes."""
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"{path}: model artifact not found; train one with "
                            "jobs/train_distributed.py or set score.model")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [""])[0]
        raise ArtifactError(f"{path}: not a readable wbc_spark model artifact "
                            f"({type(exc).__name__}: {first})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ArtifactError(f"{path}: not a {FORMAT} artifact")
    missing = [k for k in REQUIRED if k not in payload]
    if missing:
        raise ArtifactError(f"{path}: artifact lacks {', '.join(missing)}")
    classes = list(payload["classes"])
    if expected_classes is not None and list(expected_classes) != classes:
        raise ArtifactError(
            f"{path}: model is for classes {classes}, but {list(expected_classes)} were asked "
            "for; use a model trained for these classes or change 'classes' in the config"
        )
    views = payload.setdefault("test_views", 1)
    if isinstance(views, bool) or not isinstance(views, int) or not 1 <= views <= 8:
        raise ArtifactError(f"{path}: test_views={views!r}; a model averages 1 to 8 flips and "
                            "rotations of each image")
    arch = payload["architecture"]
    convention = InputConvention.from_dict(payload["preprocessing"]["input_convention"])
    model = rebuild(arch["source"], convention, len(classes), arch["freeze_until"],
                    arch.get("dropout", 0.4))
    try:
        model.load_state_dict(payload["state_dict"], strict=True)
    except RuntimeError as exc:
        raise ArtifactError(f"{path}: weights do not fit the declared architecture: "
                            f"{str(exc).splitlines()[0]}") from None
    model.eval()
    meta = {k: v for k, v in payload.items() if k != "state_dict"}
    return model, meta
