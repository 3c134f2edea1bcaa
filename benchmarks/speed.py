"""Scoring speed: the scoring job against a naive UDF and a plain Python loop, in one run.

    .venv/bin/python benchmarks/speed.py [--images 10000] [--model runs/model/model.pt]

1. Builds a benchmark lake of distinct 512 x 512 JPEGs from KRD-WBC (flips, rotations and
   small crops, so no two contents are equal) under runs/bench_lake (kept between runs).
2. Times, on the same cores, in images per second (median of --repeats runs each):
   - the scoring job (wbc_spark.score.run_scoring: iterator pandas UDF, model loaded once per
     worker, tables written), each repeat into a fresh results table;
   - a naive scoring job: a plain pandas UDF that loads the model for every batch;
   - the same inference code (decode, locate, crop, classify) in one plain Python process.
3. Counts the model's FLOPs per image (torch's FlopCounterMode) and divides the achieved
   FLOP/s by the machine's peak (cores x max clock x FLOPs per cycle from the CPU's vector
   width, read from lscpu).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image

from wbc_spark import artifact
from wbc_spark.config import load_config
from wbc_spark.score import classify_frame
from wbc_spark.sources.krd_wbc import default_root

REPO = Path(__file__).resolve().parents[1]


def build_lake(root: Path, n: int) -> list[Path]:
    """n distinct 512 x 512 JPEGs from KRD-WBC: dihedral views and small offset crops."""
    existing = sorted(root.rglob("*.jpg"))
    if len(existing) >= n:
        return existing[:n]
    src = sorted((default_root() / "Dataset" / "image").glob("image*.jpg"))
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        base = Image.open(src[i % len(src)]).convert("RGB")
        k = (i // len(src)) % 8
        arr = np.rot90(np.asarray(base), k % 4)
        arr = arr[:, ::-1] if k >= 4 else arr
        dx, dy = rng.integers(0, 24, 2)
        img = Image.fromarray(np.ascontiguousarray(arr)).crop((dx, dy, dx + 488, dy + 488))
        out = root / f"slide{i % 20:02d}" / f"cell{i:06d}.jpg"
        out.parent.mkdir(parents=True, exist_ok=True)
        img.resize((512, 512), Image.BILINEAR).save(out, quality=92)
        paths.append(out)
    return paths


def plain_loop(paths: list[Path], model_path: str, batch: int, threads: int) -> float:
    torch.set_num_threads(threads)
    model, meta = artifact.load(model_path)
    start = time.perf_counter()
    for i in range(0, len(paths), batch):
        data = pd.Series([p.read_bytes() for p in paths[i:i + batch]])
        classify_frame(data, model, meta, "image")
    return len(paths) / (time.perf_counter() - start)


def spark_job(lake: Path, model_path: str, naive: bool, results: Path) -> float:
    """Run the scoring job (or the naive variant) in a fresh process; return images/s."""
    code = f"""
import sys, time
from wbc_spark.config import load_config
from wbc_spark.session import spark_builder
from wbc_spark import score
cfg = load_config("{REPO / 'conf' / 'local.yaml'}", ["score.input={lake}",
    "score.model={model_path}", "score.results={results}"])
spark = spark_builder(cfg).getOrCreate()
spark.sparkContext.setLogLevel("ERROR")
if {naive}:
    import pandas as pd
    from pyspark.sql.functions import pandas_udf
    from wbc_spark import artifact
    def make_udf(model_file, kind, classes, threads):
        from pyspark import SparkFiles
        @pandas_udf(score.prediction_schema(classes))
        def classify(data: pd.Series) -> pd.DataFrame:
            model, meta = artifact.load(SparkFiles.get(model_file))  # every batch
            return score.classify_frame(data.reset_index(drop=True), model, meta, kind)
        return classify
    score.make_udf = make_udf
start = time.perf_counter()
out = score.run_scoring(spark, cfg)
print("RESULT", out["scored"] / (time.perf_counter() - start))
"""
    env = dict(os.environ, PYSPARK_PYTHON=sys.executable, PYSPARK_DRIVER_PYTHON=sys.executable)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          cwd=REPO)
    match = re.search(r"RESULT ([0-9.]+)", proc.stdout)
    if not match:
        raise RuntimeError(proc.stdout[-2000:] + proc.stderr[-2000:])
    shutil.rmtree(results, ignore_errors=True)
    shutil.rmtree(f"{results}_per_class", ignore_errors=True)
    return float(match.group(1))


def flops_per_image(model_path: str) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    model, meta = artifact.load(model_path)
    size = int(meta["preprocessing"]["crop_size"])
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.zeros(1, size, size, 3, dtype=torch.uint8))
    return float(counter.get_total_flops())


def peak_flops() -> tuple[float, str]:
    info = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    field = dict(re.findall(r"^([^:]+):\s*(.*)$", info, re.M))
    cores = os.cpu_count() or 1
    mhz = float(field.get("CPU max MHz") or field.get("CPU MHz") or 0)
    if not mhz:  # virtual machines often hide the clock from lscpu; /proc/cpuinfo has it
        found = re.search(r"cpu MHz\s*:\s*([0-9.]+)", Path("/proc/cpuinfo").read_text())
        mhz = float(found.group(1)) if found else 2000.0
    flags = field.get("Flags", "")
    amd_zen4 = "AMD" in field.get("Model name", "") and field.get("CPU family") == "25"
    if "avx512f" in flags and amd_zen4:
        per_cycle, isa = 32, "AVX-512 on Zen 4: 2 FMA pipes x 8 fp32 (256-bit halves) x 2"
    elif "avx512f" in flags:
        per_cycle, isa = 64, "AVX-512: 2 FMA units x 16 fp32 x 2"
    elif "avx2" in flags and "fma" in flags:
        per_cycle, isa = 32, "AVX2+FMA: 2 FMA units x 8 fp32 x 2"
    else:
        per_cycle, isa = 8, "SSE: 4 fp32 x 2"
    how = (f"{field.get('Model name', '?').strip()}: {cores} cores x {mhz:.0f} MHz x "
           f"{per_cycle} FLOP/cycle ({isa})")
    return cores * mhz * 1e6 * per_cycle, how


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=10000)
    parser.add_argument("--model", default=str(REPO / "runs" / "model" / "model.pt"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--lake", default=str(REPO / "runs" / "bench_lake"))
    args = parser.parse_args()
    cfg = load_config(REPO / "conf" / "local.yaml")
    batch = cfg.score.batch_size
    lake = Path(args.lake)
    t = time.perf_counter()
    paths = build_lake(lake, args.images)
    print(f"benchmark lake: {len(paths)} distinct 512x512 JPEGs in {lake} "
          f"({time.perf_counter() - t:.0f} s to build or find)")
    res = REPO / "runs" / "bench_results"
    rates = {"scoring job": [], "naive job": [], "plain loop": []}
    for _ in range(args.repeats):
        rates["scoring job"].append(spark_job(lake, args.model, False, res))
        rates["naive job"].append(spark_job(lake, args.model, True, res))
        rates["plain loop"].append(plain_loop(paths, args.model, batch, 2))
    med = {k: statistics.median(v) for k, v in rates.items()}
    for k, v in rates.items():
        print(f"{k:<12} {med[k]:7.1f} images/s (runs: {', '.join(f'{x:.1f}' for x in v)})")
    print(f"scoring job / naive job: {med['scoring job'] / med['naive job']:.2f}x "
          "(target >= 6x)")
    print(f"scoring job / plain loop: {med['scoring job'] / med['plain loop']:.0%} "
          "(target >= 80%)")
    flops = flops_per_image(args.model)
    peak, how = peak_flops()
    print(f"model: {flops / 1e9:.2f} GFLOP per image (FlopCounterMode; multiply-add = 2)")
    print(f"peak: {peak / 1e9:.0f} GFLOP/s = {how}")
    for k in rates:
        print(f"{k:<12} model part reaches {flops * med[k] / peak:.1%} of peak")
    return 0


if __name__ == "__main__":
    sys.exit(main())
