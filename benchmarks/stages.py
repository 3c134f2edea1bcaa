"""Where each scored image's time goes: the scoring path's stages, each timed alone.

    .venv/bin/python benchmarks/stages.py [--images 300] [--threads 1] [--model runs/model/model.pt]
                                          [--precision auto] [--ingest]

On the same images (the first ``--images`` of KRD-WBC, or ``--lake``) and the same number of
torch threads as one scoring worker (``score.threads_per_worker``, default 1), times each
stage of ``wbc_spark.score.classify_frame`` on its own: file read, JPEG decode (with the
conversion to RGB), cell location (downscale and stain mask), crop and resize, stain
standardisation, the frozen layers (in fp32, bf16 and, where the model has its calibration,
int8; and in the scoring precision with the whole batch in one pass instead of
``WBCNet.chunk_per_thread`` images per thread), the
trained layers and head, the review distances, and turning the result into Arrow and Parquet.
The stages add up along the path the scoring job takes: ``--precision`` (default ``auto``,
as ``score.precision``: bf16 on CPUs with AVX512-BF16 or AMX, fp32 elsewhere; or int8); the
other precisions' frozen layers are shown beside it. Prints each stage's
seconds per image and its share of the sum, the whole ``classify_frame`` for comparison, the
network alone at the scoring batch size in each precision, the frozen layers' operators by
share of CPU time (torch.profiler), and the instruction set oneDNN reports
(``ONEDNN_VERBOSE``), so the figures say whether AVX-512, AVX512-BF16 or AMX ran;
with ``--ingest``, the same for the ingest job's per-file work. int8 is the scoring job's own
path (``wbc_spark.model.inference.frozen_pass``: eager static quantisation of the frozen
layers from the model's calibration; torch 2.14 has no ``quantize_fx``, and its PT2E path
runs through ``torch.compile``, which failed on this network with freezing on);
``benchmarks/int8.py`` checks its accuracy (docs/PERFORMANCE.md).
"""

from __future__ import annotations

import argparse
import io
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from wbc_spark import artifact, images, review
from wbc_spark.config import PRECISIONS, SCORE_PRECISIONS, load_config
from wbc_spark.model.inference import frozen_pass, int8_frozen
from wbc_spark.model.transfer import resolve_precision
from wbc_spark.preprocessing import Preprocessing
from wbc_spark.score import classify_frame, review_model
from wbc_spark.sources.krd_wbc import default_root
from wbc_spark.stain import CROP_STAINS
from wbc_spark.transforms import crop_box, frame_box, locate_cell

REPO = Path(__file__).resolve().parents[1]


def timed(fn, *args, repeat: int = 1):
    start = time.perf_counter()
    for _ in range(repeat):
        out = fn(*args)
    return out, (time.perf_counter() - start) / repeat


def onednn_isa(precision: str) -> str:
    """The ISA oneDNN reports for a convolution in ``precision`` (a fresh process)."""
    code = ("import torch\n"
            "from wbc_spark.model.transfer import inference_precision\n"
            "conv = torch.nn.Conv2d(64, 64, 3).eval()\n"
            "x = torch.randn(8, 64, 56, 56)\n"
            f"with torch.no_grad(), inference_precision({precision!r}):\n"
            "    conv(x)\n")
    env = dict(os.environ, ONEDNN_VERBOSE="1", DNNL_VERBOSE="1")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    isa = re.findall(r"isa:([^\n,]+)", out.stdout + out.stderr)
    impl = re.findall(r"exec,cpu,convolution,([^,]+),", out.stdout + out.stderr)
    return f"{isa[0].strip() if isa else 'not reported'}; convolution kernel " \
           f"{impl[0] if impl else 'not reported (not a oneDNN convolution)'}"


def ingest_breakdown(files: list[Path]) -> None:
    """The ingest job's per-file work (``ingest.process_row``), stage by stage, on KRD-WBC's
    images with their masks: read, sha256, decode (with the size checks), cell location and
    crop, the mask's decode and IoU, the mask's PNG, and ``process_row`` whole."""
    from wbc_spark.ingest import IngestSettings, process_row
    from wbc_spark.transforms import mask_iou

    settings = IngestSettings.from_config(load_config())  # the default crops
    masks = [f.parents[1] / "mask" / f"mask{f.stem.removeprefix('image')}.jpg" for f in files]
    t: dict[str, float] = {}
    data, t["file read (image and mask)"] = timed(
        lambda: [(f.read_bytes(), m.read_bytes()) for f, m in zip(files, masks)])
    _, t["sha256"] = timed(lambda: [images.sha256(d) for d, _ in data])
    decoded, t["decode (+ size checks)"] = timed(lambda: [images.decode(d) for d, _ in data])
    crops, t["locate, crop, stain"] = timed(
        lambda: [settings.preprocessing.crop_image(im) for im in decoded])
    truths, t["mask decode"] = timed(
        lambda: [images.decode_mask(m, im.size) for (_, m), im in zip(data, decoded)])
    _, t["mask IoU"] = timed(lambda: [mask_iou(c[2], tr) for c, tr in zip(crops, truths)])
    _, t["mask PNG"] = timed(lambda: [images.encode_png(tr) for tr in truths])
    total = sum(t.values())
    rows = [{"path": str(f), "content": d, "mask_content": m, "mask_path": str(mp)}
            for f, (d, m), mp in zip(files, data, masks)]
    _, whole = timed(lambda: [process_row(r, settings) for r in rows])
    n = len(files)
    print(f"ingest, {n} KRD-WBC images with masks, one thread")
    print(f"{'stage':<36} {'ms/image':>9} {'share':>7}")
    for k, v in t.items():
        print(f"{k:<36} {1000 * v / n:9.2f} {v / total:6.1%}")
    print(f"{'sum of the stages':<36} {1000 * total / n:9.2f}   -> {n / total:.1f} images/s")
    print(f"{'process_row, as the job runs it':<36} {1000 * whole / n:9.2f}   -> "
          f"{n / whole:.1f} images/s")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--model", default=str(REPO / "runs" / "model" / "model.pt"))
    parser.add_argument("--lake", default="", help="image folder (default: KRD-WBC's images)")
    parser.add_argument("--precision", default="auto", choices=SCORE_PRECISIONS,
                        help="the path the stages add up along (auto: as the scoring job "
                             "chooses on this CPU)")
    parser.add_argument("--trained-precision", default="auto", choices=PRECISIONS,
                        help="the trained layers' arithmetic (score.trained_precision; auto: "
                             "as the scoring job chooses on this CPU)")
    parser.add_argument("--ingest", action="store_true",
                        help="also the ingest job's per-file stages (KRD-WBC, with masks)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    chosen = resolve_precision(args.precision)
    trained = resolve_precision(args.trained_precision)
    model, meta = artifact.load(args.model)
    # The chosen one last, so ``run`` is left in it.
    precisions = [p for p in ("fp32", "bf16", "int8")
                  if p != chosen and (p != "int8" or meta.get("int8"))] + [chosen]
    pre = Preprocessing.from_artifact(meta)
    detectors = review_model(meta)
    folder = Path(args.lake) if args.lake else default_root() / "Dataset" / "image"
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in (".jpg", ".png"))
    files = files[:args.images]
    n = len(files)
    t: dict[str, float] = {}

    data, t["file read"] = timed(lambda: [f.read_bytes() for f in files])
    decoded, t["decode (+ to RGB)"] = timed(lambda: [images.decode(d) for d in data])
    located, t["locate (downscale + stain mask)"] = timed(
        lambda: [locate_cell(im, context=pre.context, stain=pre.stain)[0] for im in decoded])
    crops, t["crop and resize"] = timed(
        lambda: [crop_box(im, frame_box(box, *im.size, pre.framing), pre.crop_size)
                 for im, box in zip(decoded, located)])
    if pre.stain in CROP_STAINS:
        crops, t[f"stain standardisation ({pre.stain})"] = timed(
            lambda: [CROP_STAINS[pre.stain](c) for c in crops])
    batch = torch.from_numpy(np.stack(crops))
    frozen = {}
    for precision in precisions:
        def run(p=precision):
            with torch.inference_mode():
                return torch.cat([frozen_pass(model, meta, batch[i:i + args.batch], p)
                                  for i in range(0, n, args.batch)])
        run()  # warm-up (oneDNN primitive creation)
        frozen[precision], t[f"frozen layers ({precision})"] = timed(run)
    with torch.profiler.profile() as prof:
        run()
    ops = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
    op_total = sum(e.self_cpu_time_total for e in ops)
    frozen_net = int8_frozen(model, meta) if chosen == "int8" else model
    chunk = frozen_net.chunk_per_thread
    frozen_net.chunk_per_thread = args.batch  # the whole scoring batch in one pass, as before
    _, t[f"frozen layers ({chosen}, unchunked)"] = timed(run)
    frozen_net.chunk_per_thread = chunk
    (logits, cell_f, lab_f), t[f"trained layers + head ({trained})"] = timed(
        lambda: review.embed(model, frozen[chosen], precision=trained))
    _, t["review distances"] = timed(lambda: detectors.distances(cell_f, lab_f))
    out = classify_frame(pd.Series(data[:args.batch]), model, meta, "image", chosen,
                         trained_precision=trained)

    def arrow_and_write():
        frame = pd.concat([out] * (n // len(out) + 1)).iloc[:n]
        table = pa.Table.from_pandas(frame, preserve_index=False)
        pq.write_table(table, io.BytesIO())
    _, t["Arrow + Parquet write"] = timed(arrow_and_write)

    whole_stages = {k: v for k, v in t.items()
                    if not any(f"({p})" in k for p in precisions[:-1]) and "unchunked" not in k}
    total = sum(whole_stages.values())
    _, whole = timed(lambda: [classify_frame(pd.Series(data[i:i + args.batch]), model, meta,
                                             "image", chosen, trained_precision=trained)
                              for i in range(0, n, args.batch)])
    print(f"{n} images from {folder}, torch threads {args.threads}, batch {args.batch} "
          f"(frozen layers {model.chunk_per_thread * args.threads} at a time), "
          f"model {meta['model_id']} (crop {pre.crop_size}, stain {pre.stain}); scoring path "
          f"in {chosen} (--precision {args.precision}), trained layers in {trained}")
    print(f"{'stage':<36} {'ms/image':>9} {'share':>7}")
    for k, v in t.items():
        share = f"{v / total:6.1%}" if k in whole_stages else "   (alt)"
        print(f"{k:<36} {1000 * v / n:9.2f} {share}")
    print(f"{f'sum of the stages ({chosen} path)':<36} {1000 * total / n:9.2f}   -> "
          f"{n / total:.1f} images/s")
    print(f"{f'classify_frame, {chosen}, as the UDF runs':<36} {1000 * whole / n:9.2f}   -> "
          f"{n / whole:.1f} images/s")
    for precision in sorted(precisions):
        rate = n / t[f"frozen layers ({precision})"]
        isa = (f"quantised engine {torch.backends.quantized.engine} (fbgemm kernels)"
               if precision == "int8" else f"oneDNN: {onednn_isa(precision)}")
        print(f"network alone, frozen layers {precision}: {rate:.1f} images/s; {isa}")
    print(f"frozen layers ({chosen}) by operator, share of self CPU time: " + ", ".join(
        f"{e.key.removeprefix('aten::')} {e.self_cpu_time_total / op_total:.0%}" for e in ops[:7]))
    print(f"torch CPU capability: {torch.backends.cpu.get_cpu_capability()}; mkldnn available: "
          f"{torch.backends.mkldnn.is_available()}"
          + ("" if meta.get("int8") else "; int8: the model has no calibration"))
    if args.ingest:
        krd = sorted((default_root() / "Dataset" / "image").glob("image*.jpg"))
        ingest_breakdown(krd[:args.images])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
