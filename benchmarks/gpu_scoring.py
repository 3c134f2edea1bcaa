"""The scoring path's work per image with the network on a CUDA GPU (issue 12's GPU check).

    python benchmarks/gpu_scoring.py --model runs/model/model.pt --images DIR [--n 2000]
                                     [--workers 16,8] [--batches 64,256] [--udf 512]
                                     [--json FILE]

The scoring job needs Spark and Java. The lent GPU machine has neither, and pyspark (over
300 MB) does not fit in what may travel to it. So this times, with the job's own functions,
what each of the job's Python workers does per Arrow batch (``wbc_spark.score.classify_frame``)
with the network moved to the GPU:

1. preprocessing (file read, JPEG decode, cell location, crop and resize, stain
   standardisation: ``Preprocessing.crop``, as the job's) on one CPU core, ms/image;
2. the same in ``--workers`` processes through torch's DataLoader, as that many Python
   workers would run it, images/s;
3. the network alone on the GPU (the uint8 crops copied in, the frozen layers, the trained
   layers and head, the pooled features and logits copied back) per precision (fp32; bf16
   autocast on the frozen layers as on the CPU path, the trained layers in fp32) and batch
   size, images/s, with its predictions against the CPU's fp32 ones on the same crops;
4. both together, the DataLoader's batches fed to the GPU, images/s, and which side limits;
5. the scoring job's UDF body itself (``wbc_spark.score.classify_batches``) with
   ``score.device`` "cuda" and then "cpu", in this one process on one thread as one Python
   worker of the job runs it: ``--udf`` images in Arrow-sized batches (``score.batch_size``),
   images/s, and the GPU's predictions against the CPU's (fp32 both; a model trained with
   ``train.align`` is mapped by its first training lab's stored moments). Needs pyspark's
   Python package (not its jars, nor Java); ``--udf 0`` leaves it out. ``--udf-only``
   runs step 5 alone on the device, without the CPU's pass: started as N processes at once,
   it stands for N Python workers of one GPU executor (each prints its start and end).

Left out: the rest of ``classify_frame``'s per-batch work on the CPU (review distances, the
results frame, Arrow), and the lab alignment (one multiply-add per channel). On the CPU
``stages.py`` put the review distances and the Arrow and Parquet write at under 1% of an
image's time, and ``classify_frame`` within about 1% of its stages' sum when nothing else ran
(docs/PERFORMANCE.md).
The script runs on a CPU too (``--device cpu``); that is how it is tested without a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from wbc_spark import artifact, review  # noqa: E402
from wbc_spark.model.inference import frozen_pass  # noqa: E402
from wbc_spark.preprocessing import Preprocessing  # noqa: E402

SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff"}


class Crops(Dataset):
    """The crops the scoring job would feed its network: file -> uint8 crop."""

    def __init__(self, files: list[Path], pre: Preprocessing) -> None:
        self.files, self.pre = files, pre

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> torch.Tensor:
        crop, _, _ = self.pre.crop(self.files[i].read_bytes())
        return torch.from_numpy(np.ascontiguousarray(crop))


def network(model, meta: dict, crops: torch.Tensor, device: str, precision: str
            ) -> tuple[np.ndarray, np.ndarray]:
    """(logits, pooled frozen features) on the host for uint8 host ``crops``: the scoring
    path's network (``frozen_pass`` in ``precision``, then ``review.head`` in fp32)."""
    with torch.inference_mode():
        frozen = frozen_pass(model, meta, crops, precision, device)
    logits, _ = review.head(model, frozen)
    return logits, review.pooled(frozen)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def network_rate(model, meta: dict, crops: torch.Tensor, device: str, precision: str, batch: int,
                 repeats: int = 3) -> float:
    """Images/s of ``network`` over ``crops`` in batches of ``batch``, best of ``repeats``
    after one warm-up pass."""
    best = float("inf")
    for r in range(repeats + 1):
        sync(device)
        start = time.perf_counter()
        for i in range(0, len(crops), batch):
            network(model, meta, crops[i:i + batch], device, precision)
        sync(device)
        if r:
            best = min(best, time.perf_counter() - start)
    return len(crops) / best


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="runs/model/model.pt")
    ap.add_argument("--images", required=True, help="folder of images (searched recursively)")
    ap.add_argument("--n", type=int, default=2000, help="images (the folder's, repeated)")
    ap.add_argument("--workers", default=str(os.cpu_count() or 1),
                    help="comma-separated DataLoader worker counts (the first keeps the crops)")
    ap.add_argument("--batches", default="64,256", help="GPU batch sizes")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--udf", type=int, default=512,
                    help="images for step 5, the scoring job's UDF body (0: leave it out)")
    ap.add_argument("--udf-only", action="store_true",
                    help="step 5 alone, on --device only (--udf images, repeated as needed)")
    ap.add_argument("--json", help="write the figures here too")
    args = ap.parse_args()

    found = sorted(p for p in Path(args.images).rglob("*") if p.suffix.lower() in SUFFIXES)
    if not found:
        raise SystemExit(f"{args.images}: no images found")
    files = [found[i % len(found)] for i in range(max(args.n, args.udf))]
    model, meta = artifact.load(args.model)
    model.eval()
    pre = Preprocessing.from_artifact(meta)
    dev = args.device
    out: dict = {"device": torch.cuda.get_device_name(0) if dev.startswith("cuda") else "cpu",
                 "torch": torch.__version__, "cpu_cores": os.cpu_count(), "images": len(files),
                 "distinct_images": len(found), "model_id": meta["model_id"]}
    print(f"device {out['device']}, torch {out['torch']}, {out['cpu_cores']} CPU cores; "
          f"{len(files)} images ({len(found)} distinct) from {args.images}; "
          f"model {meta['model_id']}", flush=True)

    if args.udf_only:
        out["udf"] = udf_body(args.model, files[:args.udf], dev, meta, compare=False)
        if args.json:
            Path(args.json).write_text(json.dumps(out, indent=1))
        return 0

    # 1. preprocessing on one core
    torch.set_num_threads(1)
    data = Crops(files, pre)
    m = min(200, len(files))
    start = time.perf_counter()
    one = [data[i] for i in range(m)]
    ms = (time.perf_counter() - start) / m * 1e3
    out["preprocess_ms_per_image_one_core"] = ms
    print(f"1. preprocessing on one core: {ms:.2f} ms/image ({1e3 / ms:.1f} images/s)",
          flush=True)

    # 2. preprocessing in --workers processes: a first pass (cold: worker start, file cache)
    # that keeps the crops for step 3, then a pass per worker count that only reads them
    batches = [int(b) for b in args.batches.split(",")]
    batch, counts = max(batches), [int(w) for w in args.workers.split(",")]
    pin = dev.startswith("cuda")
    start = time.perf_counter()
    crops = torch.cat(list(DataLoader(data, batch_size=batch, num_workers=counts[0])))
    out["preprocess_cold_images_per_s"] = len(files) / (time.perf_counter() - start)
    print(f"2. preprocessing, first pass in {counts[0]} DataLoader workers (worker start and "
          f"cold file cache included): {out['preprocess_cold_images_per_s']:.1f} images/s",
          flush=True)
    out["preprocess_images_per_s"] = {}
    for w in counts:
        start = time.perf_counter()
        for _ in DataLoader(data, batch_size=batch, num_workers=w, pin_memory=pin):
            pass
        rate = len(files) / (time.perf_counter() - start)
        out["preprocess_images_per_s"][w] = rate
        print(f"2. preprocessing in {w} DataLoader workers: {rate:.1f} images/s", flush=True)

    # 3. the network alone, from crops already in host memory
    ref_logits, _ = network(model, meta, torch.stack(one), "cpu", "fp32")
    model.to(dev)
    out["network"] = {}
    for precision in ("fp32", "bf16"):
        logits, _ = network(model, meta, torch.stack(one), dev, precision)
        agree = float((logits.argmax(1) == ref_logits.argmax(1)).mean())
        diff = float(np.abs(logits - ref_logits).max())
        for b in batches:
            r = network_rate(model, meta, crops, dev, precision, b)
            out["network"][f"{precision}_batch{b}"] = r
            print(f"3. network alone on {dev}, {precision}, batch {b}: {r:.0f} images/s",
                  flush=True)
        out["network"][f"{precision}_agreement_with_cpu_fp32"] = agree
        out["network"][f"{precision}_max_logit_difference"] = diff
        print(f"   {precision}: predictions equal to the CPU's fp32 on {agree:.1%} of {m} "
              f"crops; largest logit difference {diff:.4f}", flush=True)

    # 4. both together: the loader's batches straight into the network
    best = max(out["network"][f"bf16_batch{b}"] for b in batches)
    out["end_to_end_images_per_s"] = {}
    for w in counts:
        sync(dev)
        start = time.perf_counter()
        for crops_batch in DataLoader(data, batch_size=batch, num_workers=w, pin_memory=pin):
            network(model, meta, crops_batch, dev, "bf16")
        sync(dev)
        rate_all = len(files) / (time.perf_counter() - start)
        out["end_to_end_images_per_s"][w] = rate_all
        alone = out["preprocess_images_per_s"][w]
        limit = "preprocessing (CPU)" if alone < best else f"the network ({dev})"
        print(f"4. preprocessing in {w} workers feeding the network (bf16, batch {batch}): "
              f"{rate_all:.1f} images/s; the limit is {limit}: preprocessing alone "
              f"{alone:.1f} images/s, the network alone {best:.0f}", flush=True)
    if args.udf:
        out["udf"] = udf_body(args.model, files[:args.udf], dev, meta)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return 0


def udf_body(model_path: str, files: list[Path], device: str, meta: dict,
             compare: bool = True) -> dict:
    """Step 5: ``score.classify_batches`` over ``files`` on ``device`` and (``compare``) on
    the CPU."""
    try:
        from wbc_spark import score
    except ImportError as exc:
        raise SystemExit(f"step 5 needs pyspark's Python package ({exc}); pass --udf 0 to "
                         "leave it out") from exc
    import pandas as pd

    from wbc_spark.align import LabAlignment
    from wbc_spark.config import ScoreConfig

    channel_map, how = None, "none (model trained without train.align)"
    if meta.get("alignment"):
        alignment = LabAlignment.from_state(meta["alignment"])
        lab = sorted(alignment.labs)[0]
        channel_map, how = alignment.map_for(lab), f"training lab {lab}'s stored moments"
    size = ScoreConfig().batch_size
    blobs = [f.read_bytes() for f in files]
    result: dict = {"images": len(blobs), "batch_size": size, "channel_map": how}
    frames = {}
    for where in (device, "cpu") if compare else (device,):
        torch.set_num_threads(1)
        batches = (pd.Series(blobs[i:i + size]) for i in range(0, len(blobs), size))
        start, result[f"{where}_started_at"] = time.perf_counter(), time.time()
        frames[where] = pd.concat(score.classify_batches(
            batches, model_path, "image", threads=1, precision="fp32",
            channel_map=channel_map, device=where), ignore_index=True)
        sync(device)
        rate = len(blobs) / (time.perf_counter() - start)  # the model's load included
        result[f"{where}_ended_at"] = time.time()
        result[f"{where}_images_per_s"] = rate
        errors = int(frames[where].error.notna().sum())
        print(f"5. the scoring job's UDF body, score.device={where}, fp32, one thread, "
              f"batches of {size}: {rate:.1f} images/s ({errors} unreadable; lab alignment: "
              f"{how})", flush=True)
        if where == "cpu":
            break
    if compare and device != "cpu":
        read = frames[device].error.isna() & frames["cpu"].error.isna()
        gpu, cpu = frames[device][read], frames["cpu"][read]
        probs = [c for c in gpu.columns if c.startswith("p_")]
        same = float((gpu.predicted_class == cpu.predicted_class).mean())
        diff = float((gpu[probs].to_numpy(float) - cpu[probs].to_numpy(float)).__abs__().max())
        flags = float((gpu.needs_review == cpu.needs_review).mean())
        result.update(compared=len(gpu), agreement=same, max_probability_difference=diff,
                      same_flags=flags)
        print(f"   {device} against cpu: the same class for {same:.1%} of {len(gpu)} readable "
              f"images, "
              f"the same review flag for {flags:.1%}; largest probability difference "
              f"{diff:.5f}", flush=True)
    return result


if __name__ == "__main__":
    raise SystemExit(main())
