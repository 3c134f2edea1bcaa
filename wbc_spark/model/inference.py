"""The frozen layers' forward pass as scoring runs it: fp32, bf16 or int8, on a CPU or a GPU.

One function for the scoring job, the report and the benchmarks, kept apart from
``wbc_spark.score`` so that code without Spark (``benchmarks/gpu_scoring.py`` on a machine
without Java) runs the same pass.
"""

from __future__ import annotations

import torch

from wbc_spark.artifact import ArtifactError
from wbc_spark.model import quantize
from wbc_spark.model.transfer import inference_precision

_INT8: dict[str, torch.nn.Module] = {}


def require_int8(meta: dict, what: str) -> None:
    if not meta.get("int8"):
        raise ArtifactError(
            f"{what}: no int8 calibration in the model (trained with train.int8_calibration=0, "
            "or before int8 existed); score with score.precision=fp32, bf16 or auto, or train "
            "it again")


def int8_frozen(model, meta: dict) -> torch.nn.Module:
    """The model's frozen layers in int8, built once per process from the calibration its
    training stored; refuses a model trained without one."""
    model_id = meta["model_id"]
    if model_id not in _INT8:
        require_int8(meta, f"model {model_id}")
        _INT8.clear()  # one model per worker at a time
        _INT8[model_id] = quantize.from_calibration(model, meta["int8"]).eval()
    return _INT8[model_id]


def frozen_pass(model, meta: dict, crops: torch.Tensor, precision: str,
                device: str = "cpu") -> torch.Tensor:
    """The frozen layers' output for uint8 host ``crops``, in ``precision`` ("int8" or as
    ``inference_precision``), on ``device`` (the model's; the output stays there)."""
    if precision == "int8":
        return int8_frozen(model, meta).embed_frozen(crops)
    # A GPU takes the whole batch at once; the CPU's chunks only bound its cache footprint.
    chunk = None if device == "cpu" else len(crops)
    with inference_precision(precision, device):
        return model.embed_frozen(crops.to(device, non_blocking=True), chunk)
