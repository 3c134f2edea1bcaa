"""Transfer learning: split GoogLeNet into frozen and trainable stages, replace the head.

``WBCNet`` takes uint8 RGB images (N x H x W x 3) and does the input convention itself, so
every caller (training, scoring, benchmarks) feeds the same thing and no caller can get the
channel order or mean wrong.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections import OrderedDict
from pathlib import Path

import torch
from torch import nn

from wbc_spark.model.blocks import BLOCKS, DEFAULT_FREEZE_UNTIL
from wbc_spark.model.googlenet import BVLCGoogLeNet
from wbc_spark.config import SCORE_DEVICES, SCORE_PRECISIONS
from wbc_spark.model.weights import (InputConvention, Normalize, PretrainedModel,
                                     build_architecture)

log = logging.getLogger(__name__)

#: CPU flags (Linux's /proc/cpuinfo names) of native bfloat16 arithmetic. Without them oneDNN
#: emulates bf16, and the frozen layers ran 5x slower than in fp32 (docs/PERFORMANCE.md).
BF16_FLAGS = ("avx512_bf16", "amx_bf16")


@functools.cache
def cpu_flags(cpuinfo: str = "/proc/cpuinfo") -> frozenset[str]:
    """The CPU's feature flags; empty where the system does not list them (not Linux)."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.partition(":")[2].split())
    return frozenset()


@functools.cache
def resolve_precision(precision: str, flags: frozenset[str] | None = None,
                      device: str = "cpu") -> str:
    """``precision`` as it runs on a CPU with ``flags`` (default: this process's): "auto"
    becomes "bf16" where the CPU has AVX512-BF16 or AMX and "fp32" elsewhere (logged once
    per process); "fp32", "bf16" and "int8" (scoring only) stay as asked. On a CUDA
    ``device`` "auto" is "fp32": bf16 was no faster there (an H200, docs/PERFORMANCE.md) and
    fp32 gives the CPU's predictions; int8 is refused (the CPU's x86 quantisation)."""
    if precision not in SCORE_PRECISIONS:
        raise ValueError(f"precision={precision!r}; choose one of "
                         f"{', '.join(SCORE_PRECISIONS)}")
    if device != "cpu":
        if precision == "int8":
            raise ValueError(f"precision int8 on {device}: int8 is the CPU's x86 "
                             "quantisation; choose fp32, bf16 or auto on a GPU")
        return "fp32" if precision == "auto" else precision
    if precision != "auto":
        return precision
    native = sorted(set(BF16_FLAGS) & (cpu_flags() if flags is None else flags))
    chosen = "bf16" if native else "fp32"
    log.info("precision auto: %s (%s)", chosen,
             f"CPU has {', '.join(native)}" if native else
             "CPU lists neither avx512_bf16 nor amx_bf16: bf16 would be emulated, slower")
    return chosen


def inference_precision(precision: str, device: str = "cpu"
                        ) -> contextlib.AbstractContextManager:
    """Context for a forward pass in ``precision`` on ``device``: "fp32", "bf16"
    (convolutions and matrix products in bfloat16 through autocast; on a CPU fast with
    AVX512-BF16 or AMX, slow elsewhere) or "auto" (``resolve_precision``); training steps use
    it with ``train.step_precision`` (``wbc_spark.train.train_one_epoch``)."""
    if precision == "int8":
        raise ValueError("int8 is not an autocast context: run the frozen layers through "
                         "wbc_spark.model.inference.frozen_pass")
    if resolve_precision(precision, device=device) == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)


@functools.cache
def resolve_device(device: str, gpu: str | None = None) -> str:
    """The torch device this process runs the network on, for ``score.device``: "cpu";
    "cuda": ``cuda:<gpu>`` where the cluster assigned this task GPU ``gpu``, else "cuda"
    (torch's current GPU), refused where torch sees no CUDA device; "auto": as "cuda" where
    torch sees one, else "cpu" (logged once per process)."""
    if device not in SCORE_DEVICES:
        raise ValueError(f"device={device!r}; choose one of {', '.join(SCORE_DEVICES)}")
    if device == "cpu":
        return "cpu"
    if not torch.cuda.is_available():
        build = (f"built for CUDA {torch.version.cuda}" if torch.version.cuda
                 else "a CPU-only build")
        if device == "auto":
            log.info("device auto: cpu (torch %s, %s, sees no CUDA device)",
                     torch.__version__, build)
            return "cpu"
        raise RuntimeError(f"score.device=cuda: torch {torch.__version__} ({build}) sees no "
                           "CUDA device in this worker; set score.device=cpu or auto")
    chosen = f"cuda:{gpu}" if gpu is not None else "cuda"
    # fp32 on the GPU is fp32: PyTorch lets cuDNN's convolutions run in TF32 by default, which
    # moved probabilities by up to 0.0034 from the CPU's on an H200 (0.00000 without it,
    # docs/PERFORMANCE.md). This worker process only scores, so the switch is its own.
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    log.info("device %s: %s (%s)", device, chosen,
             torch.cuda.get_device_name(torch.device(chosen)))
    return chosen


class _TorchvisionInput(nn.Module):
    """torchvision's GoogLeNet re-maps ImageNet-normalised input internally; keep that step."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net._transform_input(x)


def googlenet_stages(net: nn.Module) -> OrderedDict[str, nn.Module]:
    """The network as named stages in forward order; block names are those of ``BLOCKS``."""
    stages: OrderedDict[str, nn.Module] = OrderedDict()
    if isinstance(net, BVLCGoogLeNet):
        stages["conv1"] = net.conv1
        stages["conv2"] = net.conv2
    else:  # torchvision.models.GoogLeNet
        stages["input"] = _TorchvisionInput(net)
        stages["conv1"] = nn.Sequential(net.conv1, net.maxpool1)
        stages["conv2"] = nn.Sequential(net.conv2, net.conv3, net.maxpool2)
    stages["inception3a"] = net.inception3a
    stages["inception3b"] = net.inception3b
    stages["pool3"] = net.pool3 if isinstance(net, BVLCGoogLeNet) else net.maxpool3
    for name in ("inception4a", "inception4b", "inception4c", "inception4d", "inception4e"):
        stages[name] = getattr(net, name)
    stages["pool4"] = net.pool4 if isinstance(net, BVLCGoogLeNet) else net.maxpool4
    stages["inception5a"] = net.inception5a
    stages["inception5b"] = net.inception5b
    stages["avgpool"] = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1))
    return stages


def in_chunks(fn, images: torch.Tensor, chunk: int) -> torch.Tensor:
    """``fn(images)`` without gradient, computed ``chunk`` images at a time."""
    with torch.no_grad():
        if len(images) <= chunk:
            return fn(images)
        return torch.cat([fn(images[i:i + chunk]) for i in range(0, len(images), chunk)])


class WBCNet(nn.Module):
    """GoogLeNet trunk (frozen up to ``freeze_until``), trainable upper blocks, new head."""

    def __init__(self, net: nn.Module, convention: InputConvention, num_classes: int, *,
                 freeze_until: str = DEFAULT_FREEZE_UNTIL, dropout: float = 0.4) -> None:
        super().__init__()
        stages = googlenet_stages(net)
        names = list(stages)
        if freeze_until == "none":
            cut = 0
        elif freeze_until in names:
            cut = names.index(freeze_until) + 1
        else:
            raise ValueError(f"freeze_until={freeze_until!r}; choose none or one of "
                             f"{', '.join(BLOCKS[:-1])}")
        # Pooling stages right after the cut hold no weights: keep them with the frozen part
        # so the cached/frozen output is as small as possible.
        while cut < len(names) and names[cut].startswith("pool"):
            cut += 1
        self.normalize = Normalize(convention)
        self.frozen = nn.Sequential(OrderedDict((n, stages[n]) for n in names[:cut]))
        self.trainable = nn.Sequential(OrderedDict((n, stages[n]) for n in names[cut:]))
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(1024, num_classes)
        self.init_head()
        self.freeze_until = freeze_until
        for p in self.frozen.parameters():
            p.requires_grad_(False)

    def init_head(self) -> None:
        """Draw the new head's weights afresh from torch's global generator (seed it first
        for a reproducible start); the pretrained blocks are not touched."""
        nn.init.normal_(self.fc.weight, std=0.01)
        nn.init.zeros_(self.fc.bias)

    def train(self, mode: bool = True) -> WBCNet:
        super().train(mode)
        self.frozen.eval()  # frozen layers never switch to training behaviour
        return self

    #: Images per pass through the frozen layers, per torch thread. A batch of 64 at 224 x 224
    #: spills the early layers' activations (over 1 MB per image) out of the CPU's L2 cache,
    #: and the memory-bound pooling, ReLU and LRN then cost more than the convolutions: 8 per
    #: thread ran the frozen layers 1.2-1.5x faster (docs/PERFORMANCE.md, "Scoring at the
    #: machine's limit").
    chunk_per_thread = 8

    def embed_frozen(self, images: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
        """Output of the frozen part for uint8 N x H x W x 3 images (no gradient), computed
        ``chunk`` images at a time (default ``chunk_per_thread`` x torch threads)."""
        return in_chunks(lambda x: self.frozen(self.normalize(x)), images,
                         chunk or self.chunk_per_thread * torch.get_num_threads())

    def head(self, frozen_out: torch.Tensor) -> torch.Tensor:
        """Trainable part: frozen-part output -> class logits."""
        return self.fc(self.dropout(self.trainable(frozen_out)))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed_frozen(images))


def parameter_summary(model: WBCNet) -> dict:
    """Frozen and trainable parameter counts, by stage."""
    frozen = {n: sum(p.numel() for p in m.parameters()) for n, m in model.frozen.named_children()}
    trained = {n: sum(p.numel() for p in m.parameters())
               for n, m in model.trainable.named_children()}
    trained["fc"] = sum(p.numel() for p in model.fc.parameters())
    return {
        "frozen_stages": [n for n, c in frozen.items() if c],
        "trainable_stages": [n for n, c in trained.items() if c],
        "frozen_parameters": sum(frozen.values()),
        "trainable_parameters": sum(trained.values()),
    }


def build_classifier(pretrained: PretrainedModel, num_classes: int, *,
                     freeze_until: str = DEFAULT_FREEZE_UNTIL, dropout: float = 0.4) -> WBCNet:
    """Replace the 1000-way ImageNet classifier with a ``num_classes`` head and freeze."""
    model = WBCNet(pretrained.model, pretrained.convention, num_classes,
                   freeze_until=freeze_until, dropout=dropout)
    s = parameter_summary(model)
    log.info("replaced classifier fc (1000 -> %d classes; ImageNet fc weights dropped)",
             num_classes)
    log.info("frozen: %s (%d parameters); trained: %s (%d parameters)",
             ", ".join(s["frozen_stages"]) or "nothing", s["frozen_parameters"],
             ", ".join(s["trainable_stages"]), s["trainable_parameters"])
    return model


def rebuild(source: str, convention: InputConvention, num_classes: int, freeze_until: str,
            dropout: float = 0.4) -> WBCNet:
    """An untrained ``WBCNet`` with the right structure for a saved state dict."""
    return WBCNet(build_architecture(source, 1000), convention, num_classes,
                  freeze_until=freeze_until, dropout=dropout)
