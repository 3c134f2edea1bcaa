"""int8 frozen layers: PyTorch's eager-mode static quantisation on its x86 (fbgemm) backend.

torch 2.14 has neither ``quantize_fx`` nor the PT2E quantiser outside ``torch.compile``, so
the frozen part is rebuilt for the eager path: each convolution is fused with its ReLU, the
Inception blocks concatenate through ``FloatFunctional`` (so the concatenation has its own
observed scale), and the LocalResponseNorm layers run in float between a dequantise and a
quantise. Activation scales come from calibration images; weights are quantised per channel.

Training calibrates on unaugmented training crops and stores the activation observers'
state in the artifact (``calibration_state``: float tensors only, so the artifact still loads
with ``weights_only=True``); ``score.precision=int8`` rebuilds the same int8 network from it
(``from_calibration``). The weights' scales are recomputed from the float weights, per channel,
so the two give the same network. Accuracy against fp32: ``benchmarks/int8.py``
(docs/PERFORMANCE.md).
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.ao import quantization as tq
from torch.ao.nn.quantized import FloatFunctional

from wbc_spark.model.googlenet import Inception, LocalResponseNorm
from wbc_spark.model.transfer import WBCNet, in_chunks

BACKEND = "x86"


class _QuantInception(nn.Module):
    """An ``Inception`` block whose concatenation carries its own quantisation scale."""

    def __init__(self, block: Inception) -> None:
        super().__init__()
        self.branch1, self.branch2 = block.branch1, block.branch2
        self.branch3, self.branch4 = block.branch3, block.branch4
        self.cat = FloatFunctional()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.cat.cat([self.branch1(x), self.branch2(x), self.branch3(x),
                             self.branch4(x)], 1)


class _FloatIsland(nn.Module):
    """Runs ``module`` in float inside a quantised network."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.dequant, self.module, self.quant = tq.DeQuantStub(), module, tq.QuantStub()
        self.module.qconfig = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.quant(self.module(self.dequant(x)))


class Int8Frozen(nn.Module):
    """uint8 N x H x W x 3 images -> the frozen part's float output, computed in int8."""

    def __init__(self, model: WBCNet) -> None:
        super().__init__()
        self.normalize = copy.deepcopy(model.normalize)
        self.quant = tq.QuantStub()
        self.body = _rebuild(copy.deepcopy(model.frozen))
        self.dequant = tq.DeQuantStub()
        self.chunk_per_thread = model.chunk_per_thread

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.quant(self.normalize(images).contiguous(memory_format=torch.channels_last))
        return self.dequant(self.body(x)).contiguous()

    def embed_frozen(self, images: torch.Tensor) -> torch.Tensor:
        """As ``WBCNet.embed_frozen``: in chunks of ``chunk_per_thread`` x torch threads."""
        return in_chunks(self, images, self.chunk_per_thread * torch.get_num_threads())


def _rebuild(module: nn.Module) -> nn.Module:
    """Swap in the quantisable blocks and fuse every convolution with its ReLU, in place."""
    for name, child in list(module.named_children()):
        if isinstance(child, Inception):
            setattr(module, name, _rebuild(_QuantInception(child)))
        elif isinstance(child, (LocalResponseNorm, nn.LocalResponseNorm)):
            setattr(module, name, _FloatIsland(child))
        elif (isinstance(child, nn.Sequential) and len(child) == 2
              and isinstance(child[0], nn.Conv2d) and isinstance(child[1], nn.ReLU)):
            tq.fuse_modules(child, [["0", "1"]], inplace=True)
        else:
            _rebuild(child)
    return module


def _observed(model: WBCNet) -> Int8Frozen:
    """``model``'s frozen part rebuilt for quantisation, with an observer after each op."""
    engines = torch.backends.quantized.supported_engines
    if BACKEND not in engines:
        raise RuntimeError(f"int8 needs PyTorch's {BACKEND} quantisation engine, which this "
                           f"CPU or build lacks (it has {engines}); use score.precision=fp32 "
                           "or bf16")
    torch.backends.quantized.engine = BACKEND
    net = Int8Frozen(model).eval()
    net.qconfig = tq.get_default_qconfig(BACKEND)
    net.normalize.qconfig = None
    return tq.prepare(net, inplace=True)


def _observe(model: WBCNet, calibration: torch.Tensor, chunk: int) -> Int8Frozen:
    if len(calibration) == 0:
        raise ValueError("int8 calibration needs at least one image")
    net = _observed(model)
    in_chunks(net, calibration, chunk)
    return net


def quantize_frozen(model: WBCNet, calibration: torch.Tensor, *, chunk: int = 16
                    ) -> Int8Frozen:
    """The frozen part of ``model`` in int8, its activation ranges observed on
    ``calibration`` (uint8 N x H x W x 3 images of the kind it will see)."""
    return tq.convert(_observe(model, calibration, chunk), inplace=True)


OBSERVER = "activation_post_process"


def _observer_state(net: Int8Frozen) -> dict[str, torch.Tensor]:
    """The activation observers' entries of an observed network's state."""
    return {k: v for k, v in net.state_dict().items() if f".{OBSERVER}." in f".{k}"}


def calibration_state(model: WBCNet, calibration: torch.Tensor, *, chunk: int = 16
                      ) -> dict:
    """What int8 learns from ``calibration``, for the artifact: the activation observers'
    state (float tensors) and how many images it saw. ``from_calibration`` turns it back
    into ``quantize_frozen(model, calibration)``'s network."""
    net = _observe(model, calibration, chunk)
    observers = {k: v.detach().clone() for k, v in _observer_state(net).items()}
    return {"backend": BACKEND, "images": int(len(calibration)), "observers": observers}


def from_calibration(model: WBCNet, state: dict) -> Int8Frozen:
    """The int8 frozen part of ``model`` from ``calibration_state``'s output; refuses a state
    that does not fit the model's layers."""
    net = _observed(model)
    expected = set(_observer_state(net))
    given = set(state.get("observers", {}))
    if state.get("backend") != BACKEND or given != expected:
        raise ValueError(f"int8 calibration does not fit this model ({len(given)} observer "
                         f"tensors for {len(expected)}, backend {state.get('backend')!r}); "
                         "train the model again")
    net.load_state_dict(state["observers"], strict=False)
    return tq.convert(net, inplace=True)
