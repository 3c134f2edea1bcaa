"""Training steps on cached frozen features: which memory layout the head trains fastest in.

    .venv/bin/python benchmarks/head_training.py [--images 2048] [--batch 64] [--threads 2]

Training runs on the frozen layers' cached outputs (``wbc_spark.train``), which
``embed_frozen`` returns channels-last. Times one pass over ``--images`` random cached
features (bf16, as stored) in batches of ``--batch`` (forward, backward and an AdamW step of
the upper blocks and head), best of ``--repeats``, for three layouts:

* features channels-last, parameters contiguous (before ``HeadOnly`` converted them): the
  convolutions' weight gradients come out channels-last, unlike their parameters, which
  DistributedDataParallel copies and warns about ("grad strides do not match bucket view
  strides");
* features and parameters channels-last (``HeadOnly`` now);
* features and parameters contiguous (the other way to make the layouts agree).
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.nn import functional

from wbc_spark.model.transfer import build_classifier
from wbc_spark.model.weights import load_pretrained


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = build_classifier(load_pretrained("bvlc", None), 5)
    with torch.no_grad():
        shape = model.embed_frozen(torch.zeros(1, 224, 224, 3, dtype=torch.uint8)).shape[1:]
    stored = torch.randn(args.images, *shape).to(torch.bfloat16,
                                                 memory_format=torch.channels_last)
    labels = torch.randint(0, 5, (args.images,))
    trained = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trained, 1e-3)
    model.train()
    print(f"{args.images} cached features of shape {tuple(shape)}, batch {args.batch}, "
          f"{args.threads} threads, best of {args.repeats}")
    for name, features, params in (
            ("features channels-last, parameters contiguous", stored, torch.contiguous_format),
            ("features channels-last, parameters channels-last", stored, torch.channels_last),
            ("features contiguous, parameters contiguous", stored.contiguous(),
             torch.contiguous_format)):
        model.trainable.to(memory_format=params)
        best = float("inf")
        for _ in range(args.repeats):
            order = torch.randperm(args.images)
            start = time.perf_counter()
            for i in range(0, args.images, args.batch):
                idx = order[i:i + args.batch]
                optimizer.zero_grad(set_to_none=True)
                loss = functional.cross_entropy(model.head(features[idx].float()), labels[idx])
                loss.backward()
                optimizer.step()
            best = min(best, time.perf_counter() - start)
        match = all(p.grad.stride() == p.stride() for p in trained)
        print(f"{name:50s} {best:6.2f} s ({1000 * best / args.images:5.2f} ms per image); "
              f"gradients {'match' if match else 'do not match'} their parameters' layout")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
