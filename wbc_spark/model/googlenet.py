"""GoogLeNet (Inception v1) in the two flavours wbc_spark can load pretrained weights into.

``BVLCGoogLeNet`` is the original Caffe network (Szegedy et al. 2014) exactly as the BVLC model
zoo trained it. It differs from torchvision's ``googlenet`` in four ways that matter for the
pretrained weights (see ``shared/weights/bvlc_googlenet/PROVENANCE.md``):

* the "5x5" branch of each Inception block is a real 5x5 convolution (torchvision uses 3x3,
  pytorch/vision#906);
* LocalResponseNorm after pool1 and after conv2; without them the activations drift and the
  ImageNet predictions are wrong;
* every max-pool rounds its output size up (Caffe), which ``ceil_mode=True`` reproduces;
* convolutions carry biases and there is no BatchNorm.

Block names follow torchvision (``conv1``, ``conv2``, ``inception3a`` ... ``inception5b``,
``fc``) so that ``freeze_until`` means the same thing for both flavours.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from wbc_spark.model.blocks import BLOCKS, INCEPTION_CONFIG  # noqa: F401 (BLOCKS: re-exported)


class LocalResponseNorm(nn.LocalResponseNorm):
    """Caffe's across-channel LRN, computed a few images at a time for inference.

    Same result as ``nn.LocalResponseNorm`` (to float rounding); that one builds a padded 5-D
    copy and runs ``avg_pool3d`` over the whole batch, which took a third of the network's CPU
    time while the convolutions took half. Here the window sum is four shifted adds, the
    power is ``rsqrt(y) * sqrt(rsqrt(y))`` (= ``y ** -0.75``), and each chunk of images is
    small enough to stay in the CPU's cache. With gradients, or other settings than Caffe's
    odd window and beta 0.75, the stock path runs.
    """

    chunk = 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        odd_window = self.size % 2 == 1
        if self.beta != 0.75 or not odd_window or (torch.is_grad_enabled() and x.requires_grad):
            return F.local_response_norm(x, self.size, self.alpha, self.beta, self.k)
        out = torch.empty_like(x)
        for i in range(0, x.shape[0], self.chunk):
            out[i:i + self.chunk] = self._normalise(x[i:i + self.chunk].float())
        return out

    def _normalise(self, x: torch.Tensor) -> torch.Tensor:
        sq = x * x
        s = sq.clone()
        for d in range(1, self.size // 2 + 1):
            s[:, d:] += sq[:, :-d]
            s[:, :-d] += sq[:, d:]
        s.mul_(self.alpha / self.size).add_(self.k)
        r = s.rsqrt_()
        return x * r * r.sqrt()


def use_torch_lrn(model: nn.Module) -> nn.Module:
    """Put torch's own ``nn.LocalResponseNorm`` in place of this module's (same values, slower):
    the eager baseline the speed benchmark compares against."""
    for parent in list(model.modules()):
        for name, child in parent.named_children():
            if isinstance(child, LocalResponseNorm):
                setattr(parent, name, nn.LocalResponseNorm(child.size, child.alpha, child.beta,
                                                           child.k))
    return model


def _conv_relu(cin: int, cout: int, kernel: int, stride: int = 1, pad: int = 0
               ) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, stride, pad, bias=True),
                         nn.ReLU(inplace=True))


class Inception(nn.Module):
    """One Caffe Inception block: four branches concatenated along channels."""

    def __init__(self, cin: int, c1: int, c3r: int, c3: int, c5r: int, c5: int, pp: int) -> None:
        super().__init__()
        self.branch1 = _conv_relu(cin, c1, 1)
        self.branch2 = nn.Sequential(_conv_relu(cin, c3r, 1), _conv_relu(c3r, c3, 3, pad=1))
        self.branch3 = nn.Sequential(_conv_relu(cin, c5r, 1), _conv_relu(c5r, c5, 5, pad=2))
        self.branch4 = nn.Sequential(
            nn.MaxPool2d(3, stride=1, padding=1, ceil_mode=True), _conv_relu(cin, pp, 1)
        )
        self.out_channels = c1 + c3 + c5 + pp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.branch1(x), self.branch2(x), self.branch3(x), self.branch4(x)], 1)


class BVLCGoogLeNet(nn.Module):
    """The BVLC Caffe GoogLeNet. Input: BGR, 0..255, minus the Caffe mean, 224 x 224."""

    def __init__(self, *, num_classes: int = 1000, dropout: float = 0.4) -> None:
        super().__init__()
        self.conv1 = nn.Sequential(
            _conv_relu(3, 64, 7, stride=2, pad=3),
            nn.MaxPool2d(3, stride=2, ceil_mode=True),
            LocalResponseNorm(5, alpha=1e-4, beta=0.75, k=1.0),
        )
        self.conv2 = nn.Sequential(
            _conv_relu(64, 64, 1),
            _conv_relu(64, 192, 3, pad=1),
            LocalResponseNorm(5, alpha=1e-4, beta=0.75, k=1.0),
            nn.MaxPool2d(3, stride=2, ceil_mode=True),
        )
        for name, cfg in INCEPTION_CONFIG.items():
            self.add_module(name, Inception(*cfg))
        self.pool3 = nn.MaxPool2d(3, stride=2, ceil_mode=True)
        self.pool4 = nn.MaxPool2d(3, stride=2, ceil_mode=True)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(1024, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled 1024-d features of a batch (N x 1024)."""
        x = self.conv2(self.conv1(x))  # N x 192 x 28 x 28
        x = self.inception3b(self.inception3a(x))  # N x 480 x 28 x 28
        x = self.pool3(x)  # N x 480 x 14 x 14
        for name in ("inception4a", "inception4b", "inception4c", "inception4d", "inception4e"):
            x = getattr(self, name)(x)
        x = self.pool4(x)  # N x 832 x 7 x 7
        x = self.inception5b(self.inception5a(x))  # N x 1024 x 7 x 7
        return torch.flatten(self.avgpool(x), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.dropout(self.features(x)))


def caffe_blob_names() -> dict[str, str]:
    """Map each ``BVLCGoogLeNet`` parameter name to its blob path (without ``_filter/_bias``)."""
    names: dict[str, str] = {
        "conv1.0.0": "conv1/7x7_s2",
        "conv2.0.0": "conv2/3x3_reduce",
        "conv2.1.0": "conv2/3x3",
        "fc": "loss3/classifier",
    }
    for block in INCEPTION_CONFIG:
        caffe = f"inception_{block[-2:]}"
        names[f"{block}.branch1.0"] = f"{caffe}/1x1"
        names[f"{block}.branch2.0.0"] = f"{caffe}/3x3_reduce"
        names[f"{block}.branch2.1.0"] = f"{caffe}/3x3"
        names[f"{block}.branch3.0.0"] = f"{caffe}/5x5_reduce"
        names[f"{block}.branch3.1.0"] = f"{caffe}/5x5"
        names[f"{block}.branch4.1.0"] = f"{caffe}/pool_proj"
    return names
