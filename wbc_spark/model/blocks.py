"""GoogLeNet's block names and Inception widths, without torch: configuration validates
``model.freeze_until`` against them, and the ingest's and scoring's Python workers import
configuration without needing torch for it."""

from __future__ import annotations

# (in, 1x1, 3x3_reduce, 3x3, 5x5_reduce, 5x5, pool_proj) for each Inception block.
INCEPTION_CONFIG: dict[str, tuple[int, int, int, int, int, int, int]] = {
    "inception3a": (192, 64, 96, 128, 16, 32, 32),
    "inception3b": (256, 128, 128, 192, 32, 96, 64),
    "inception4a": (480, 192, 96, 208, 16, 48, 64),
    "inception4b": (512, 160, 112, 224, 24, 64, 64),
    "inception4c": (512, 128, 128, 256, 24, 64, 64),
    "inception4d": (512, 112, 144, 288, 32, 64, 64),
    "inception4e": (528, 256, 160, 320, 32, 128, 128),
    "inception5a": (832, 256, 160, 320, 32, 128, 128),
    "inception5b": (832, 384, 192, 384, 48, 128, 128),
}

#: The network's blocks in forward order; ``freeze_until`` names one of them.
BLOCKS: tuple[str, ...] = ("conv1", "conv2", *INCEPTION_CONFIG, "fc")

#: The default ``model.freeze_until``: this block and every one before it stay frozen, so
#: inception4d, 4e, 5a, 5b and the head are trained (inception4e until session 53:
#: docs/RESULTS.md, "Session 53").
DEFAULT_FREEZE_UNTIL = "inception4c"
