"""Pretrained ImageNet weight sources for GoogLeNet, resolved in a fixed, documented order.

Two sources exist:

``bvlc`` (default, works offline)
    The original BVLC Caffe weights as raw float32 blobs (``<dir>/weights/<layer>/*.bin`` plus
    ``SHA256SUMS``). The folder is looked up in this order, first hit wins:

    1. an explicit folder (``model.weights_dir`` in the config, or ``--model.weights_dir``);
    2. the environment variable ``WBC_SPARK_WEIGHTS_DIR``;
    3. the user cache ``$XDG_CACHE_HOME/wbc_spark/bvlc_googlenet`` (``~/.cache/...``);
    4. ``shared/weights/bvlc_googlenet`` in the folder beside the repository (``../shared``;
       ``$WBC_SPARK_SHARED`` moves it), where this project's CI and development machines keep
       them.

    Every blob is checked against ``SHA256SUMS`` before use.

``torchvision``
    ``torchvision.models.GoogLeNet_Weights.IMAGENET1K_V1``, downloaded into the torch hub cache
    for users who are online. A failed download is an error that says how to use a local
    ``bvlc`` folder instead.

There is no fall-back to random weights: a missing or corrupt file raises ``WeightsError``.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from wbc_spark.config import MODEL_SOURCES as SOURCES
from wbc_spark.config import shared_dir
from wbc_spark.model.googlenet import BVLCGoogLeNet, caffe_blob_names

log = logging.getLogger(__name__)

ENV_WEIGHTS_DIR = "WBC_SPARK_WEIGHTS_DIR"


class WeightsError(RuntimeError):
    """Pretrained weights are missing, corrupt or cannot be fetched."""


@dataclass(frozen=True)
class InputConvention:
    """How pixels must be presented to a network: channel order, value range, mean and std."""

    channel_order: str  # "BGR" or "RGB"
    scale: float  # multiply uint8 pixels by this first
    mean: tuple[float, float, float]  # in ``channel_order``, after scaling
    std: tuple[float, float, float]
    size: int = 224

    def to_dict(self) -> dict:
        return {
            "channel_order": self.channel_order,
            "scale": self.scale,
            "mean": list(self.mean),
            "std": list(self.std),
            "size": self.size,
        }

    @classmethod
    def from_dict(cls, d: dict) -> InputConvention:
        return cls(d["channel_order"], float(d["scale"]), tuple(d["mean"]), tuple(d["std"]),
                   int(d["size"]))


CAFFE_CONVENTION = InputConvention("BGR", 1.0, (104.0, 117.0, 123.0), (1.0, 1.0, 1.0))
TORCHVISION_CONVENTION = InputConvention(
    "RGB", 1 / 255, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
)


@dataclass
class PretrainedModel:
    """A network with ImageNet weights, plus what is needed to use and describe them."""

    model: nn.Module
    source: str
    convention: InputConvention
    provenance: dict = field(default_factory=dict)


def default_weight_dirs() -> list[Path]:
    """Candidate BVLC folders after the explicit one, in lookup order."""
    dirs: list[Path] = []
    if os.environ.get(ENV_WEIGHTS_DIR):
        dirs.append(Path(os.environ[ENV_WEIGHTS_DIR]))
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    dirs.append(cache / "wbc_spark" / "bvlc_googlenet")

    shared = shared_dir()
    if shared is not None:
        dirs.append(shared / "weights" / "bvlc_googlenet")
    return dirs


def resolve_bvlc_dir(explicit: str | os.PathLike | None = None) -> Path:
    """Return the first BVLC weight folder in the documented lookup order.

    Raises:
        WeightsError: an explicit folder lacks ``SHA256SUMS``, or no candidate folder has one.
    """
    if explicit:
        path = Path(explicit)
        if not (path / "SHA256SUMS").is_file():
            raise WeightsError(
                f"{path}: not a BVLC GoogLeNet weight folder (no SHA256SUMS). Point "
                f"model.weights_dir at a folder laid out as weights/<layer>/<name>_filter.bin "
                f"with SHA256SUMS."
            )
        return path
    tried = default_weight_dirs()
    for path in tried:
        if (path / "SHA256SUMS").is_file():
            return path
    raise WeightsError(
        "BVLC GoogLeNet weights not found; looked in "
        + ", ".join(str(p) for p in tried)
        + f". Set model.weights_dir or {ENV_WEIGHTS_DIR} to the folder, or use "
        "model.source=torchvision when online."
    )


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def verify_checksums(folder: Path) -> str:
    """Check every blob listed in ``SHA256SUMS``; return the digest of the SHA256SUMS file."""
    sums = folder / "SHA256SUMS"
    base = folder / "weights"
    lines = [ln.split() for ln in sums.read_text().splitlines() if ln.strip()]
    if not lines:
        raise WeightsError(f"{sums}: empty checksum file")
    for digest, name in lines:
        blob = base / name.lstrip("*")
        if not blob.is_file():
            raise WeightsError(f"{blob}: listed in {sums} but missing")
        actual = _sha256(blob)
        if actual != digest:
            raise WeightsError(
                f"{blob}: SHA-256 mismatch (expected {digest[:12]}..., got {actual[:12]}...); "
                "the file is corrupt: copy the weight folder again"
            )
    return _sha256(sums)


def _read_blob(path: Path, shape: tuple[int, ...]) -> np.ndarray:
    data = np.fromfile(path, dtype="<f4")
    if data.size != int(np.prod(shape)):
        raise WeightsError(
            f"{path}: has {data.size} floats, expected {int(np.prod(shape))} for shape {shape}"
        )
    return data.reshape(shape)


def load_bvlc(weights_dir: str | os.PathLike | None = None, *, verify: bool = True
              ) -> PretrainedModel:
    """Build ``BVLCGoogLeNet`` and fill it from the raw Caffe blobs."""
    folder = resolve_bvlc_dir(weights_dir)
    sums_digest = verify_checksums(folder) if verify else None
    model = BVLCGoogLeNet(num_classes=1000)
    modules = dict(model.named_modules())
    state: dict[str, torch.Tensor] = {}
    for module_name, blob in caffe_blob_names().items():
        module = modules[module_name]
        w_shape = tuple(module.weight.shape)
        if isinstance(module, nn.Conv2d):
            out_c, in_c, kh, kw = w_shape
            # Stored as (out, kh, kw, in): the export's layout, not Caffe's own.
            w = _read_blob(folder / "weights" / f"{blob}_filter.bin", (out_c, kh, kw, in_c))
            w = w.transpose(0, 3, 1, 2)
        else:
            w = _read_blob(folder / "weights" / f"{blob}_filter.bin", w_shape)
        b = _read_blob(folder / "weights" / f"{blob}_bias.bin", (w_shape[0],))
        state[f"{module_name}.weight"] = torch.from_numpy(np.ascontiguousarray(w))
        state[f"{module_name}.bias"] = torch.from_numpy(b.copy())
    model.load_state_dict(state, strict=True)
    log.info("loaded BVLC GoogLeNet from %s (%d tensors, checksums %s)", folder, len(state),
             "verified" if verify else "not checked")
    return PretrainedModel(
        model=model,
        source="bvlc",
        convention=CAFFE_CONVENTION,
        provenance={
            "source": "bvlc",
            "name": "bvlc_googlenet (Caffe model zoo, ImageNet-1k)",
            "folder": str(folder),
            "sha256sums_digest": sums_digest or "",
            "licence": "BVLC model zoo: unrestricted",
        },
    )


def _torchvision_models():
    """torchvision.models, an optional dependency (only this source needs it)."""
    try:
        import torchvision.models
    except ImportError as exc:
        raise WeightsError(f"model.source=torchvision needs torchvision ({exc}): pip install "
                           "'wbc_spark[torchvision]', or use model.source=bvlc") from exc
    return torchvision.models


def load_torchvision() -> PretrainedModel:
    """torchvision's ImageNet GoogLeNet; downloads into the torch hub cache when needed."""
    models = _torchvision_models()
    GoogLeNet_Weights, googlenet = models.GoogLeNet_Weights, models.googlenet  # noqa: N806

    weights = GoogLeNet_Weights.IMAGENET1K_V1
    try:
        model = googlenet(weights=weights)
    except Exception as exc:  # urllib/ssl/OSError: no network or a blocked host
        raise WeightsError(
            f"could not fetch torchvision {weights} ({type(exc).__name__}: {exc}). Offline, use "
            f"the BVLC blobs instead: model.source=bvlc and model.weights_dir=<folder> (or "
            f"{ENV_WEIGHTS_DIR}); see README 'Weights'."
        ) from exc
    model.aux_logits = False
    model.aux1 = model.aux2 = None
    return PretrainedModel(
        model=model,
        source="torchvision",
        convention=TORCHVISION_CONVENTION,
        provenance={"source": "torchvision", "name": str(weights), "url": weights.url,
                    "licence": "BSD-3-Clause (torchvision)"},
    )


def build_architecture(source: str, num_classes: int) -> nn.Module:
    """The bare architecture of a source, without weights (for loading a saved artifact)."""
    if source == "bvlc":
        return BVLCGoogLeNet(num_classes=num_classes)
    if source == "torchvision":
        return _torchvision_models().googlenet(weights=None, aux_logits=False,
                                               init_weights=False, num_classes=num_classes,
                                               transform_input=True)
    raise ValueError(f"unknown weight source {source!r}; choose one of {', '.join(SOURCES)}")


def load_pretrained(source: str = "bvlc", weights_dir: str | os.PathLike | None = None
                    ) -> PretrainedModel:
    """Load ImageNet GoogLeNet from ``source`` ("bvlc" or "torchvision")."""
    if source == "bvlc":
        return load_bvlc(weights_dir)
    if source == "torchvision":
        return load_torchvision()
    raise ValueError(f"unknown weight source {source!r}; choose one of {', '.join(SOURCES)}")


class Normalize(nn.Module):
    """uint8 RGB N x H x W x 3 -> the network's float N x 3 x H x W input."""

    def __init__(self, convention: InputConvention) -> None:
        super().__init__()
        self.bgr = convention.channel_order == "BGR"
        self.scale = convention.scale
        self.register_buffer("mean", torch.tensor(convention.mean).view(1, 3, 1, 1),
                             persistent=False)
        self.register_buffer("std", torch.tensor(convention.std).view(1, 3, 1, 1),
                             persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 3, 1, 2).float()
        if self.bgr:
            x = x.flip(1)
        return (x * self.scale - self.mean) / self.std


def to_input(images: torch.Tensor, convention: InputConvention) -> torch.Tensor:
    """uint8 RGB images (N x H x W x 3) -> the network's float input (N x 3 x H x W)."""
    return Normalize(convention)(images)
