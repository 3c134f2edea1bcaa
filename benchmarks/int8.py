"""int8 frozen layers against fp32: the network alone's speed, and what int8 changes.

    .venv/bin/python benchmarks/int8.py [--images 192] [--calibration 256] [--threads 2]
    .venv/bin/python benchmarks/int8.py --model runs/model/model.pt --dataset runs/dataset

The int8 path is ``wbc_spark.model.quantize`` (PyTorch eager static quantisation, x86
backend). Both paths run the frozen layers on the same crops, ``chunk_per_thread`` x threads
images at a time, as the scoring job does; each rate is the median of ``--repeats`` passes
after a warm-up.

Without ``--model``: KRD-WBC's first ``--calibration`` + ``--images`` images, cropped as the
default preprocessing does; the first calibrate, the rest are measured. What int8 changes is
shown on the ImageNet network (pretrained classifier on top of the fp32 upper blocks): top-1
agreement and the largest probability difference, and the frozen output's cosine to fp32.

With ``--model`` and ``--dataset`` (the model's training dataset): the model's test fold (its
``test_predictions.csv``, images it did not train on) is measured; the int8 network is the
scoring job's, from the calibration stored in the model (``train.int8_calibration``), or, for
a model trained without one, calibrated on ``--calibration`` crops drawn from the other rows;
prints macro-F1 and balanced accuracy per lab for both paths and how many
predictions differ. That is the accuracy check a reduced-precision scoring path must pass.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.dataset as pads
import torch

from wbc_spark import artifact, metrics, review
from wbc_spark.config import Config
from wbc_spark.model.quantize import BACKEND, from_calibration, quantize_frozen
from wbc_spark.model.transfer import build_classifier, in_chunks
from wbc_spark.model.weights import load_pretrained
from wbc_spark.preprocessing import Preprocessing
from wbc_spark.sources.krd_wbc import default_root


def chunked(fn, x: torch.Tensor, chunk: int) -> torch.Tensor:
    with torch.inference_mode():
        return in_chunks(fn, x, chunk)


def timed(fn, x: torch.Tensor, chunk: int, repeats: int) -> tuple[torch.Tensor, float]:
    """``fn``'s output on ``x`` (from the warm-up pass) and its median rate in images/s."""
    out = chunked(fn, x, chunk)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        chunked(fn, x, chunk)
        times.append(time.perf_counter() - start)
    return out, len(x) / statistics.median(times)


def krd_crops(n: int) -> torch.Tensor:
    """KRD-WBC's first ``n`` images, cropped as the default configuration does."""
    pre = Preprocessing.from_config(Config())
    files = sorted((default_root() / "Dataset" / "image").glob("image*.jpg"))[:n]
    return torch.from_numpy(np.stack([
        pre.crop(f.read_bytes())[0]
        for f in files]))


def dataset_crops(dataset: str, test_ids: set[str], n_calibration: int, seed: int
                  ) -> tuple[pd.DataFrame, torch.Tensor, torch.Tensor]:
    """The test fold's rows and crops, and ``n_calibration`` crops from the other rows."""
    table = pads.dataset(dataset, format="parquet", partitioning="hive",
                         exclude_invalid_files=True).to_table(
        columns=["image_id", "source", "label", "crop", "crop_size"])
    df = table.to_pandas()
    df["image_id"] = df["image_id"].astype(str)
    test = df[df.image_id.isin(test_ids)].sort_values("image_id")
    rest = df[~df.image_id.isin(test_ids)].sample(n_calibration, random_state=seed)

    def stack(part: pd.DataFrame) -> torch.Tensor:
        return torch.from_numpy(np.stack([np.frombuffer(b, np.uint8).reshape(s, s, 3)
                                          for b, s in zip(part.crop, part.crop_size)]))
    return test, stack(test), stack(rest)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=192)
    parser.add_argument("--calibration", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--model", default="")
    parser.add_argument("--dataset", default="")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if bool(args.model) != bool(args.dataset):
        parser.error("--model and --dataset go together")
    torch.set_num_threads(args.threads)
    if args.model:
        model, meta = artifact.load(args.model)
        preds = pd.read_csv(Path(args.model).parent / "test_predictions.csv",
                            dtype={"image_id": str})
        test, x, calibration = dataset_crops(args.dataset, set(preds.image_id),
                                             args.calibration, args.seed)
        what = f"{len(x)} test-fold crops of {args.model} (calibration: {len(calibration)} " \
               f"crops of its other folds)"
    else:
        pretrained = load_pretrained("bvlc", None)
        model = build_classifier(pretrained, 5).eval()
        crops = krd_crops(args.calibration + args.images)
        calibration, x = crops[:args.calibration], crops[args.calibration:]
        what = f"{len(x)} KRD-WBC crops (calibration: the {len(calibration)} before them)"
    model.eval()
    start = time.perf_counter()
    if args.model and meta.get("int8"):
        int8 = from_calibration(model, meta["int8"])
        what = (f"{len(x)} test-fold crops of {args.model} (calibration: the model's own, "
                f"{meta['int8']['images']} training crops)")
    else:
        int8 = quantize_frozen(model, calibration)
    calibrate_s = time.perf_counter() - start
    chunk = model.chunk_per_thread * args.threads
    print(f"{what}; torch threads {args.threads}, {chunk} images per pass; quantised engine "
          f"{BACKEND}, CPU capability {torch.backends.cpu.get_cpu_capability()}; "
          f"quantisation with calibration {calibrate_s:.1f} s")
    f32, rate32 = timed(model.embed_frozen, x, chunk, args.repeats)
    i8, rate8 = timed(int8, x, chunk, args.repeats)
    print(f"frozen layers fp32: {rate32:6.1f} images/s")
    print(f"frozen layers int8: {rate8:6.1f} images/s")
    print(f"int8 / fp32: {rate8 / rate32:.2f}x")
    cosine = torch.nn.functional.cosine_similarity(f32.flatten(1), i8.flatten(1))
    print(f"frozen output cosine to fp32: median {cosine.median():.4f}, min {cosine.min():.4f}")
    if not args.model:
        fc = pretrained.model.fc
        with torch.inference_mode():
            p32 = fc(model.trainable(f32)).softmax(1)
            p8 = fc(model.trainable(i8)).softmax(1)
        agree = (p32.argmax(1) == p8.argmax(1)).float().mean()
        print(f"ImageNet classifier on top: top-1 agreement {agree:.3f}, largest |p - p_fp32| "
              f"{(p32 - p8).abs().max():.4f}")
        return 0
    classes = list(meta["classes"])
    labels = test.label.map({c: i for i, c in enumerate(classes)}).to_numpy()
    predicted = {}
    for name, frozen in (("fp32", f32), ("int8", i8)):
        logits = review.embed(model, frozen)[0]
        predicted[name] = metrics.softmax(logits, float(meta["temperature"])).argmax(1)
    changed = int((predicted["fp32"] != predicted["int8"]).sum())
    print(f"predictions changed by int8: {changed} of {len(labels)}")
    print(f"{'lab':<10} {'n':>5} {'path':<5} {'bal. acc.':>22} {'macro-F1':>22}")
    for lab in ["all", *sorted(test.source.unique())]:
        keep = np.ones(len(test), bool) if lab == "all" else (test.source == lab).to_numpy()
        for name, p in predicted.items():
            r = metrics.classification_report(labels[keep], p[keep], classes)
            (bl, bh), (fl, fh) = r["balanced_accuracy_ci"], r["macro_f1_ci"]
            print(f"{lab:<10} {keep.sum():>5} {name:<5} {r['balanced_accuracy']:.3f} "
                  f"[{bl:.3f}, {bh:.3f}] {r['macro_f1']:.3f} [{fl:.3f}, {fh:.3f}]")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
