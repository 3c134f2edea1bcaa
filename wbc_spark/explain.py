"""Where the model looks: class activation maps of the trained head, scored against the masks.

The trainable part ends with global average pooling and one linear layer, so Grad-CAM at the
last Inception block reduces to the class activation map (Zhou et al. 2016): the block's
1024 feature maps weighted by the predicted class's row of ``fc``. It is computed from the
cached frozen-part outputs, so it costs one pass through the trained blocks. The reports
lay the maps over their crops (``heat_overlay``); the benchmarks' statistics of where the
maps fall are in ``wbc_spark.evaluation.activation_maps``.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.nn import functional as F


@torch.no_grad()
def class_activation_maps(model, frozen_out: torch.Tensor, batch: int = 64
                          ) -> tuple[np.ndarray, np.ndarray]:
    """(N x h x w maps of the predicted class, clipped at 0; predicted classes)."""
    model.eval()
    blocks = model.trainable[:-1]  # everything before the global average pooling
    maps, preds = [], []
    for i in range(0, len(frozen_out), batch):
        a = blocks(frozen_out[i:i + batch].float())  # N x 1024 x h x w
        logits = model.fc(a.mean((2, 3)))
        k = logits.argmax(1)
        cam = torch.einsum("nchw,nc->nhw", a, model.fc.weight[k])
        maps.append(cam.clamp(min=0))
        preds.append(k)
    return torch.cat(maps).numpy(), torch.cat(preds).numpy()


def upsample(maps: np.ndarray, size: int) -> np.ndarray:
    t = torch.from_numpy(maps).float()[:, None]
    return F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False)[:, 0].numpy()


def heat_overlay(crop: np.ndarray, upsampled_map: np.ndarray, strength: float = 0.6
                 ) -> np.ndarray:
    """The crop (float RGB) with a map of its size laid over it in red, scaled to its peak."""
    m = upsampled_map
    heat = m / m.max() if m.max() > 0 else m
    rgb = crop.astype(np.float32)
    rgb[..., 0] = rgb[..., 0] * (1 - strength * heat) + 255 * strength * heat
    rgb[..., 1:] *= (1 - strength * heat)[..., None]
    return rgb
