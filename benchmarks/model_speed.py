"""The network alone: images per second for each inference variant, same batch, same threads.

    .venv/bin/python benchmarks/model_speed.py [--batch 32] [--threads 2] [--repeats 5]

Variants: torch's stock LocalResponseNorm or wbc_spark's, fp32 or bf16 autocast, NCHW or
channels-last. Prints the median rate of ``--repeats`` timed passes after one warm-up, and the
largest probability difference of each variant from the fp32 stock model on random images.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from wbc_spark.model.googlenet import use_torch_lrn
from wbc_spark.model.transfer import build_classifier, inference_precision
from wbc_spark.model.weights import load_pretrained


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    images = torch.randint(0, 256, (args.batch, 224, 224, 3), dtype=torch.uint8)
    pretrained = load_pretrained("bvlc", None)
    ours = build_classifier(pretrained, 5).eval()
    stock = use_torch_lrn(build_classifier(load_pretrained("bvlc", None), 5).eval())
    stock.load_state_dict(ours.state_dict())
    reference = None
    for lrn, model in (("torch LRN", stock), ("wbc_spark LRN", ours)):
        for layout in ("NCHW", "channels-last"):
            net = model.to(memory_format=torch.channels_last) if layout != "NCHW" else model
            for precision in ("fp32", "bf16"):
                with torch.inference_mode(), inference_precision(precision):
                    out = net(images).float().softmax(1)
                    times = []
                    for _ in range(args.repeats):
                        start = time.perf_counter()
                        net(images)
                        times.append(time.perf_counter() - start)
                reference = out if reference is None else reference
                rate = args.batch / statistics.median(times)
                print(f"{lrn:<14} {layout:<13} {precision}  {rate:6.1f} images/s  "
                      f"max |p - p_ref| {(out - reference).abs().max():.4f}", flush=True)
            model.to(memory_format=torch.contiguous_format)
    return 0


if __name__ == "__main__":
    sys.exit(main())
