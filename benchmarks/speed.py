"""Speed and scale: scoring, ingest and training, each path against its baseline in one run.

    .venv/bin/python benchmarks/speed.py [--images 10000] [--slides 20] [--repeats 3]
    .venv/bin/python benchmarks/speed.py --job-only fp32,int8 [--images 2000] [--repeats 1]
    (each precision: the job's rate, then its fixed cost per run and marginal rate per image;
    FROZEN/TRAINED, e.g. auto/bf16, sets score.trained_precision too)
    .venv/bin/python benchmarks/speed.py --knobs [--images 2000]
    (the job under each scoring setting of KNOBS: Arrow batch, workers x threads, tasks)

1. Builds a benchmark lake of distinct 512 x 512 JPEGs from KRD-WBC (flips, rotations and
   small crops, so no two contents are equal) under runs/bench_lake (kept between runs), in 20
   slide folders; ``--slides K`` times the paths on the first K folders only.
2. Precision: the model's predictions on its held-out test-fold images (``test_predictions.csv``
   beside the model; without it, the 600 KRD-WBC images), each lab's mapped by its stored
   moments, in fp32, in bf16 (the frozen layers, then the trained layers too, where the CPU has
   it natively) and, where the model has its calibration, in int8 (agreement with fp32 of the
   predictions and the review flags, macro-F1 of each per lab), since the scoring job runs in
   ``score.precision`` and ``score.trained_precision`` (``--precision`` sets the first for
   this run).
3. Scoring, in images per second (median of ``--repeats`` runs each, paths interleaved):
   - the scoring job (wbc_spark.score.run_scoring: iterator pandas UDF, model loaded once per
     worker, ``score.precision``, tables written), each repeat into a fresh results table;
   - a naive scoring job: a plain pandas UDF that loads the model for every batch and runs
     the eager fp32 model with torch's stock LocalResponseNorm;
   - the scoring job's inference code (decode, locate, crop, classify) in one plain process.
   While the jobs run, the peak resident memory of every Python worker is sampled.
   Then the network alone at the scoring precision (random crops, two threads) and the job's
   share of it; the job once more on the first slide folder alone, which splits a run's time
   into a fixed cost per run and a marginal rate per image (ingest too, below); and
   ``benchmarks/stages.py``'s breakdown of one worker's time per image by stage
   (``--no-stages`` skips it).
4. The model's FLOPs per image (torch's FlopCounterMode) times images/s over the machine's
   peak (cores x clock x FLOPs per cycle from the CPU's vector width, read from lscpu).
5. Scale-out: ingest and scoring on a local standalone cluster with one and with two one-core
   workers (``--no-cluster`` skips it).
6. Training: with ``--distributed``, the training job through spark-submit with one and with
   two TorchDistributor processes (cache rate, epoch time); the frozen-feature cache per view
   against the naive recipe's per-image epoch cost (full forward and backward every epoch);
   the cross-validation wall time read from the last ``benchmarks/accuracy.py`` run
   (runs/accuracy.json).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image

from wbc_spark import artifact, metrics
from wbc_spark.align import LabAlignment
from wbc_spark.config import SCORE_PRECISIONS, load_config, shared_lake
from wbc_spark.model.googlenet import use_torch_lrn
from wbc_spark.model.inference import frozen_pass
from wbc_spark.model.transfer import resolve_precision
from wbc_spark.score import classify_frame
from wbc_spark.sources.krd_wbc import default_root

REPO = Path(__file__).resolve().parents[1]
SLIDES = 20


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
        out = root / f"slide{i % SLIDES:02d}" / f"cell{i:06d}.jpg"
        out.parent.mkdir(parents=True, exist_ok=True)
        img.resize((512, 512), Image.BILINEAR).save(out, quality=92)
        paths.append(out)
    return paths


def sub_lake(lake: Path, slides: int) -> Path:
    """The first ``slides`` slide folders of the lake, as hard links in a folder of their own
    (same bytes, sizes and times, no copy)."""
    if slides >= SLIDES:
        return lake
    root = lake.parent / f"{lake.name}_{slides}of{SLIDES}"
    for k in range(slides):
        for f in sorted((lake / f"slide{k:02d}").glob("*.jpg")):
            target = root / f.parent.name / f.name
            if not target.exists():
                target.parent.mkdir(parents=True, exist_ok=True)
                os.link(f, target)
    return root


def held_out(model_path: str, classes: list[str]
             ) -> tuple[list[Path], np.ndarray, str, np.ndarray]:
    """The model's test-fold images (``test_predictions.csv`` beside it: images it neither
    trained nor selected on), else the 600 KRD-WBC images; files, labels, a description and
    each image's lab."""
    table = Path(model_path).with_name("test_predictions.csv")
    if not table.exists():
        from wbc_spark.sources.krd_wbc import read_labels

        root = default_root()
        labels = read_labels(root / "class labels.csv", classes)
        files = sorted((root / "Dataset" / "image").glob("image*.jpg"),
                       key=lambda f: int(re.sub(r"\D", "", f.stem)))
        y = np.array([classes.index(labels[int(re.sub(r"\D", "", f.stem))]) for f in files])
        return files, y, (f"the {len(files)} KRD-WBC images ({table.name} not found, so these "
                          "include the model's training images: this measures the arithmetic, "
                          "not the accuracy)"), np.full(len(files), "KRD-WBC")
    test = pd.read_csv(table)
    roots = {"KRD-WBC": default_root() / "Dataset" / "image",
             "PBC-dev": shared_lake("PBC-dev", "WBC_SPARK_PBC_DEV")}
    files = [roots["KRD-WBC"] / f"{i.split('/', 1)[1]}.jpg" if lab == "KRD-WBC"
             else roots[lab] / i.split("/", 1)[1] for i, lab in zip(test.image_id, test.source)]
    counts = ", ".join(f"{lab} {n}" for lab, n in test.source.value_counts().sort_index().items())
    return files, np.array([classes.index(c) for c in test.label]), \
        f"the model's {len(files)} held-out test-fold images ({counts})", test.source.to_numpy()


def precision_parts(spec: str, trained: str = "fp32") -> tuple[str, str]:
    """(score.precision, score.trained_precision) of a precision as this script names it: one
    value for the frozen layers (the trained layers then ``trained``), or "FROZEN/TRAINED"."""
    frozen, _, given = spec.partition("/")
    return frozen, given or trained


def precision_check(model_path: str) -> str:
    """Predictions and review flags on the model's held-out images in fp32, bf16 (the frozen
    layers; then the trained layers too: "bf16/bf16") and, where the model has its
    calibration, int8 arithmetic. A model trained with ``train.align`` maps each lab's images
    by that lab's stored moments (``score.lab``), as the jobs score a training lab."""
    model, meta = artifact.load(model_path)
    classes = list(meta["classes"])
    files, y, what, labs = held_out(model_path, classes)
    data = [f.read_bytes() for f in files]
    alignment = LabAlignment.from_state(meta["alignment"]) if meta.get("alignment") else None
    preds, flags = {}, {}
    # bf16 where the CPU computes it (emulated elsewhere: about 5x slower, and never chosen).
    native_bf16 = resolve_precision("auto") == "bf16"
    for spec in (["fp32"] + ["bf16", "bf16/bf16"] * native_bf16
                 + ["int8"] * bool(meta.get("int8"))):
        frozen, trained = precision_parts(spec)
        preds[spec], flags[spec] = np.zeros(len(y), int), np.zeros(len(y), bool)
        for lab in sorted(set(labs)):
            rows = np.flatnonzero(labs == lab)
            for part in np.array_split(rows, -(-len(rows) // 64)):
                out = classify_frame(pd.Series([data[k] for k in part]), model, meta, "image",
                                     frozen, channel_map=alignment and alignment.map_for(lab),
                                     trained_precision=trained)
                preds[spec][part] = [classes.index(c) for c in out.predicted_class]
                flags[spec][part] = out.needs_review.to_numpy(bool)
    low = [p for p in preds if p != "fp32"]
    lines = [f"precision: {p} and fp32 predictions agree on "
             f"{(preds['fp32'] == preds[p]).mean():.1%} of {what}, review flags on "
             f"{(flags['fp32'] == flags[p]).mean():.1%}" for p in low]
    if not native_bf16:
        lines.append("precision: bf16 not checked (this CPU would emulate it)")
    for lab in sorted(set(labs)):
        at = labs == lab
        f1 = {k: metrics.macro_f1(y[at], v[at], len(classes)) for k, v in preds.items()}
        lines.append(f"  {lab}: macro-F1 fp32 {f1['fp32']:.4f}" + "".join(
            f", {p} {f1[p]:.4f} ({f1[p] - f1['fp32']:+.4f})" for p in low)
            + " (target: within 0.005 of fp32)")
    return "\n".join(lines)


def network_alone(model_path: str, precision: str, threads: int, n: int = 256,
                  trained: str = "fp32") -> float:
    """Images/s of the whole network (frozen layers in ``precision``, the rest in ``trained``,
    as scoring runs it with ``score.trained_precision``) on random crops, batch 64, after a
    warm-up batch."""
    from wbc_spark import review

    torch.set_num_threads(threads)
    model, meta = artifact.load(model_path)
    crops = torch.randint(0, 256, (n, 224, 224, 3), dtype=torch.uint8)

    def batch(x):
        with torch.inference_mode():
            review.embed(model, frozen_pass(model, meta, x, precision), precision=trained)
    batch(crops[:64])
    start = time.perf_counter()
    for i in range(0, n, 64):
        batch(crops[i:i + 64])
    return n / (time.perf_counter() - start)


def per_run_split(big: tuple[int, float], small: tuple[int, float]) -> tuple[float, float]:
    """A run's fixed cost (s) and the job's marginal rate (images/s) from (images, images/s)
    of two runs on different lake sizes, taking a run's time as fixed + images / marginal."""
    (n_big, rate_big), (n_small, rate_small) = big, small
    t_big, t_small = n_big / rate_big, n_small / rate_small
    if n_big <= n_small or t_big <= t_small:
        raise ValueError(f"cannot split {big} and {small}: the larger run must take longer")
    marginal = (n_big - n_small) / (t_big - t_small)
    return t_small - n_small / marginal, marginal


def split_line(kind: str, lake: Path, args_for: Callable[[Path, Path], list[str]], rate: float,
               n: int, alone: float | None = None) -> str:
    """Run ``kind`` (job or ingest) once more on the lake's first slide folder and say how a
    run's time divides into a fixed cost and a per-image (marginal) rate; ``args_for(lake,
    out)`` gives its overrides for a lake and an output table."""
    small = sub_lake(lake, 1)
    n_small = len(list(small.rglob("*.jpg")))
    if n_small >= n:
        return f"  {kind} per run: not split (the timed lake is no larger than one slide folder)"
    out = REPO / "runs" / f"bench_{kind}_small"
    rate_small = run_path(kind, REPO / "conf" / "local.yaml", args_for(small, out),
                          [out, Path(f"{out}_quarantine")])[0]
    fixed, marginal = per_run_split((n, rate), (n_small, rate_small))
    line = (f"  {kind} per run: {fixed:.1f} s fixed (listing, start-up, tables; from {n_small} "
            f"images at {rate_small:.1f} images/s beside {n} at {rate:.1f}), then "
            f"{marginal:.1f} images/s per image")
    if alone:
        line += f": {marginal / alone:.0%} of the network alone ({alone:.1f} images/s)"
    return line


def score_args_for(model: str, precision: str) -> Callable[[Path, Path], list[str]]:
    """The scoring job's overrides for ``precision``: score.precision's value, or
    "FROZEN/TRAINED" for score.precision and score.trained_precision."""
    frozen, trained = precision_parts(precision, "")
    extra = [f"score.trained_precision={trained}"] if trained else []
    return lambda lake, out: [f"score.input={lake}", f"score.model={model}",
                              f"score.results={out}", f"score.precision={frozen}", *extra]


def ingest_args_for(lake: Path, out: Path) -> list[str]:
    return ["data.source=folder", f"data.lake={lake}", f"data.dataset={out}",
            f"data.quarantine={out}_quarantine"]


# Scoring settings timed by --knobs (issue 12: threads per Python worker against workers per
# executor, the Arrow batch size; and how many tasks the images are spread over). Each is one
# job run with these overrides; the rows without overrides are the default, timed first and
# last, and their spread is the run-to-run noise the others are read against.
KNOBS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("default (local[2]: 2 workers x 1 thread, batch 64, 4 tasks per core)", ()),
    ("Arrow batch 16", ("score.batch_size=16",)),
    ("Arrow batch 32", ("score.batch_size=32",)),
    ("Arrow batch 128", ("score.batch_size=128",)),
    ("Arrow batch 256", ("score.batch_size=256",)),
    ("1 worker x 2 threads (local[1])", ("spark.master=local[1]", "score.threads_per_worker=2")),
    ("2 workers x 2 threads", ("score.threads_per_worker=2",)),
    ("1 task per core", ("score.tasks_per_core=1",)),
    ("default again", ()),
)


def knob_table(timed: list[tuple[str, tuple[str, ...], float]]) -> list[str]:
    """Lines for (label, overrides, images/s) runs: each rate against the mean of the default
    runs (those without overrides), and that mean with its runs' range."""
    base = [rate for _, overrides, rate in timed if not overrides]
    if not base:
        raise ValueError("no default run (one without overrides) to compare the settings with")
    mean = statistics.fmean(base)
    lines = [f"  {label:<70} {rate:6.1f} images/s  {rate / mean:5.2f}x"
             for label, _, rate in timed]
    lines.append(f"  default: mean {mean:.1f} images/s over {len(base)} runs "
                 f"(range {min(base):.1f}-{max(base):.1f}); a setting outside that range "
                 "by more than the range's width is a change, otherwise noise")
    return lines


def knob_lines(args_for: Callable[[Path, Path], list[str]], lake: Path, res: Path,
               knobs=KNOBS) -> list[str]:
    """Time the scoring job once per setting of ``knobs`` on ``lake`` (a fresh results table
    each run), after one untimed run that measures and stores the lake's profile (a first
    run's one-off cost), and return knob_table's lines."""
    local = REPO / "conf" / "local.yaml"
    load_config(local, [o for _, overrides in knobs for o in overrides])  # refuse a bad key first
    run_path("job", local, args_for(lake, res), [res])
    timed = []
    for label, overrides in knobs:
        rate = run_path("job", local, [*args_for(lake, res), *overrides], [res])[0]
        print(f"  ... {label}: {rate:.1f} images/s", flush=True)
        timed.append((label, overrides, rate))
    return knob_table(timed)


INGEST_DIR = REPO / "runs" / "bench_ingest"
INGEST_SCRATCH = [INGEST_DIR, Path(f"{INGEST_DIR}_quarantine")]  # removed after each run


def ingest_lines(lake: Path, timed: Path, n: int, repeats: int) -> str:
    """Time the ingest job ``repeats`` times on the ``timed`` part of the lake (a fresh table
    each run), then once on one slide folder for the per-run split; the lines to print."""
    args = ingest_args_for(timed, INGEST_DIR)
    runs = [run_path("ingest", REPO / "conf" / "local.yaml", args, INGEST_SCRATCH)
            for _ in range(repeats)]
    rate = statistics.median(r[0] for r in runs)
    return (f"ingest (local[2]) {rate:7.1f} images/s (runs: "
            f"{', '.join(f'{r[0]:.1f}' for r in runs)}), peak Python worker memory "
            f"{max(r[1] for r in runs):.0f} MiB\n"
            + split_line("ingest", lake, ingest_args_for, rate, n))


def plain_loop(paths: list[Path], model_path: str, batch: int, threads: int,
               precision: str, trained_precision: str = "fp32") -> float:
    torch.set_num_threads(threads)
    model, meta = artifact.load(model_path)
    start = time.perf_counter()
    for i in range(0, len(paths), batch):
        data = pd.Series([p.read_bytes() for p in paths[i:i + batch]])
        classify_frame(data, model, meta, "image", precision,
                       trained_precision=trained_precision)
    return len(paths) / (time.perf_counter() - start)


class WorkerMemory:
    """Samples the peak resident memory (VmHWM) of every PySpark Python worker process."""

    def __init__(self) -> None:
        self.peaks: dict[int, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.5):
            for proc in Path("/proc").iterdir():
                if not proc.name.isdigit():
                    continue
                try:
                    if b"pyspark.daemon" not in (proc / "cmdline").read_bytes():
                        continue
                    found = re.search(r"VmHWM:\s+(\d+) kB", (proc / "status").read_text())
                except OSError:
                    continue
                if found:
                    pid = int(proc.name)
                    self.peaks[pid] = max(self.peaks.get(pid, 0), int(found.group(1)))

    def __enter__(self) -> WorkerMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def peak_mib(self) -> float:
        return max(self.peaks.values(), default=0) / 1024


JOB = """
import sys, time
from wbc_spark.config import load_config
from wbc_spark.session import spark_builder
from wbc_spark import ingest, score
cfg = load_config(sys.argv[1], sys.argv[3:])
spark = spark_builder(cfg).getOrCreate()
spark.sparkContext.setLogLevel("ERROR")
if sys.argv[2] == "naive":
    import pandas as pd
    from pyspark.sql.functions import pandas_udf
    from wbc_spark.model.googlenet import use_torch_lrn
    from wbc_spark import artifact
    def make_udf(model_file, kind, classes, threads, precision, thresholds=None):
        from pyspark import SparkFiles
        @pandas_udf(score.prediction_schema(classes))
        def classify(data: pd.Series) -> pd.DataFrame:
            model, meta = artifact.load(SparkFiles.get(model_file))  # every batch
            use_torch_lrn(model)
            return score.classify_frame(data.reset_index(drop=True), model, meta, kind, "fp32",
                                        thresholds)
        return classify
    score.make_udf = make_udf
start = time.perf_counter()
if sys.argv[2] == "ingest":
    n = ingest.run_ingest(spark, cfg).read
else:
    n = score.run_scoring(spark, cfg)["scored"]
print("RESULT", n, n / (time.perf_counter() - start))
"""


def run_path(kind: str, config: Path, overrides: list[str], scratch: list[Path]
             ) -> tuple[float, float]:
    """Run one job (``kind``: job, naive or ingest) in a fresh driver; images/s and the peak
    memory of its Python workers (MiB). ``scratch`` tables are removed afterwards."""
    env = dict(os.environ, PYSPARK_PYTHON=sys.executable, PYSPARK_DRIVER_PYTHON=sys.executable)
    with WorkerMemory() as memory:
        proc = subprocess.run([sys.executable, "-c", JOB, str(config), kind, *overrides],
                              capture_output=True, text=True, env=env, cwd=REPO)
    for path in scratch:
        for p in (path, Path(f"{path}_per_class")):
            shutil.rmtree(p, ignore_errors=True)
    found = re.search(r"RESULT (\d+) ([0-9.]+)", proc.stdout)
    if not found or int(found.group(1)) == 0:
        raise RuntimeError(f"{kind} run failed or did nothing:\n" + proc.stdout[-2000:]
                           + proc.stderr[-2000:])
    return float(found.group(2)), memory.peak_mib


def local_cluster(action: str, workers: int) -> None:
    env = dict(os.environ, WORKERS=str(workers), PYSPARK_PYTHON=sys.executable,
               WBC_SPARK_CLUSTER_DIR=str(REPO / "runs" / "bench_cluster"),
               WBC_SPARK_VENV=str(Path(sys.executable).parents[1]))
    subprocess.run(["bash", str(REPO / "deploy" / "local_cluster.sh"), action], env=env,
                   check=True, capture_output=True, timeout=300)


def distributed_epochs(processes: int, views: int, epochs: int) -> tuple[float, float]:
    """Run the training job through spark-submit with ``processes`` TorchDistributor
    processes (the machine's cores split between them); return the frozen-feature cache rate
    (views/s, all ranks together) and the median epoch time (s) of rank 0."""
    threads = max(1, (os.cpu_count() or 2) // processes)
    out = REPO / "runs" / f"bench_train_{processes}p"
    cmd = ["bash", str(REPO / "deploy" / "submit.sh"), "train_distributed",
           f"train.num_processes={processes}", f"train.threads_per_process={threads}",
           f"train.views={views}", f"train.epochs={epochs}", f"train.output={out}"]
    env = dict(os.environ, PYSPARK_PYTHON=sys.executable, PYSPARK_DRIVER_PYTHON=sys.executable,
               WBC_SPARK_VENV=str(Path(sys.executable).parents[1]))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    shutil.rmtree(out, ignore_errors=True)
    log = proc.stdout + proc.stderr
    cached = [(int(n), float(t)) for n, t in
              re.findall(r"cached (\d+) augmented views .* in ([0-9.]+) s", log)]
    seconds = [float(x) for x in re.findall(r'rank0 .*epoch \d+: .*"seconds": ([0-9.]+)', log)]
    if proc.returncode != 0 or len(cached) != processes or not seconds:
        raise RuntimeError(f"training with {processes} processes failed:\n{log[-3000:]}")
    rate = sum(n for n, _ in cached) / max(t for _, t in cached)
    return rate, statistics.median(seconds[1:] or seconds)


def training_costs(model_path: str, images: int = 32) -> tuple[float, float]:
    """Seconds per image: one frozen-feature cache view (optimised recipe), and one naive
    epoch step (augment, forward through the whole network in fp32 with stock LRN, backward
    through the trained blocks) on ``images`` KRD-WBC crops."""
    from wbc_spark.augment import augment
    from wbc_spark.model.transfer import inference_precision
    from wbc_spark.preprocessing import Preprocessing

    cfg = load_config(REPO / "conf" / "local.yaml")
    torch.set_num_threads(2)
    model, meta = artifact.load(model_path)
    files = sorted((default_root() / "Dataset" / "image").glob("image*.jpg"))[:images]
    pre = Preprocessing.from_artifact(meta)
    crops = np.stack([pre.crop_image(Image.open(f))[0] for f in files])
    rng = np.random.default_rng(0)
    start = time.perf_counter()
    views = torch.from_numpy(np.stack([augment(c, rng) for c in crops]))
    with torch.no_grad(), inference_precision(cfg.train.frozen_precision):
        model.embed_frozen(views)
    cached = (time.perf_counter() - start) / images
    use_torch_lrn(model).train()
    head = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(head, lr=1e-4)
    start = time.perf_counter()
    views = torch.from_numpy(np.stack([augment(c, rng) for c in crops]))
    loss = torch.nn.functional.cross_entropy(model(views), torch.zeros(images, dtype=torch.long))
    loss.backward()
    optimizer.step()
    naive = (time.perf_counter() - start) / images
    return cached, naive


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
    parser.add_argument("--images", type=int, default=10000, help="benchmark lake size")
    parser.add_argument("--slides", type=int, default=SLIDES,
                        help=f"time the paths on the first K of the {SLIDES} slide folders")
    parser.add_argument("--model", default=str(REPO / "runs" / "model" / "model.pt"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--precision", choices=SCORE_PRECISIONS, default=None,
                        help="score.precision of the scoring job and plain loop (default: "
                             "conf/local.yaml's)")
    parser.add_argument("--job-only", default="", metavar="PRECISIONS",
                        help="time only the scoring job, once per comma-separated precision "
                             "(e.g. fp32,int8; auto/bf16 sets score.trained_precision=bf16 "
                             "too), and stop")
    parser.add_argument("--knobs", action="store_true",
                        help="time only the scoring job under each setting of KNOBS (Arrow "
                             "batch, workers x threads, tasks per core), and stop")
    parser.add_argument("--ingest-only", action="store_true",
                        help="time only the ingest job (and its per-run split), and stop")
    parser.add_argument("--lake", default=str(REPO / "runs" / "bench_lake"))
    parser.add_argument("--no-cluster", action="store_true", help="skip the scale-out runs")
    parser.add_argument("--no-stages", action="store_true",
                        help="skip the per-stage breakdown (benchmarks/stages.py)")
    parser.add_argument("--distributed", action="store_true",
                        help="also time the training job with 1 and 2 TorchDistributor "
                             "processes (2 views, 4 epochs each)")
    parser.add_argument("--accuracy-json", default=str(REPO / "runs" / "accuracy.json"))
    args = parser.parse_args()
    local = REPO / "conf" / "local.yaml"
    cfg = load_config(local, [f"score.precision={args.precision}"] if args.precision else [])
    lake = Path(args.lake)
    t = time.perf_counter()
    build_lake(lake, args.images)
    print(f"benchmark lake: {args.images} distinct 512x512 JPEGs in {lake} "
          f"({time.perf_counter() - t:.0f} s to build or find)")
    timed = sub_lake(lake, args.slides)
    paths = sorted(timed.rglob("*.jpg"))
    print(f"paths timed on {len(paths)} images ({timed})")
    res = REPO / "runs" / "bench_results"
    score_for = score_args_for(args.model, cfg.score.precision)
    score_args = score_for(timed, res)
    if args.ingest_only:
        print(ingest_lines(lake, timed, len(paths), args.repeats), flush=True)
        return 0
    if args.knobs:
        print(f"scoring job on {len(paths)} images, score.precision={cfg.score.precision}, "
              "one run per setting:", flush=True)
        print("\n".join(knob_lines(score_for, timed, res)), flush=True)
        return 0
    if args.job_only:
        for precision in args.job_only.split(","):
            args_for = score_args_for(args.model, precision)
            rates_p = [run_path("job", local, args_for(timed, res), [res])[0]
                       for _ in range(args.repeats)]
            rate = statistics.median(rates_p)
            print(f"scoring job, score.precision={precision}: {rate:.1f} images/s "
                  f"(runs: {', '.join(f'{x:.1f}' for x in rates_p)})")
            frozen, trained = precision_parts(precision, cfg.score.trained_precision)
            print(split_line("job", lake, args_for, rate, len(paths),
                             network_alone(args.model, frozen, threads=2, trained=trained)),
                  flush=True)
        return 0
    print(precision_check(args.model))

    rates: dict[str, list[float]] = {"scoring job": [], "naive job": [], "plain loop": []}
    memory: dict[str, float] = {}
    for _ in range(args.repeats):
        for name, kind in (("scoring job", "job"), ("naive job", "naive")):
            rate, mib = run_path(kind, local, score_args, [res])
            rates[name].append(rate)
            memory[name] = max(memory.get(name, 0), mib)
        rates["plain loop"].append(plain_loop(paths, args.model, cfg.score.batch_size, 2,
                                              cfg.score.precision,
                                              cfg.score.trained_precision))
    med = {k: statistics.median(v) for k, v in rates.items()}
    for k, v in rates.items():
        print(f"{k:<12} {med[k]:7.1f} images/s (runs: {', '.join(f'{x:.1f}' for x in v)})")
    print(f"scoring job / naive job: {med['scoring job'] / med['naive job']:.2f}x "
          "(target >= 6x)")
    print(f"scoring job / plain loop: {med['scoring job'] / med['plain loop']:.0%} "
          "(target >= 80%)")
    alone = network_alone(args.model, cfg.score.precision, threads=2,
                          trained=cfg.score.trained_precision)
    print(f"network alone ({cfg.score.precision}: {resolve_precision(cfg.score.precision)} "
          f"frozen layers, {resolve_precision(cfg.score.trained_precision)} trained layers, "
          "2 threads, "
          f"random 224 x 224 crops): {alone:.1f} images/s; scoring job / network alone: "
          f"{med['scoring job'] / alone:.0%} (target >= 80%)")
    print(split_line("job", lake, score_for, med["scoring job"], len(paths), alone))
    for k, mib in memory.items():
        print(f"{k:<12} peak Python worker memory {mib:.0f} MiB over {len(paths)} images "
              "(target < 1536 MiB)")
    flops = flops_per_image(args.model)
    peak, how = peak_flops()
    print(f"model: {flops / 1e9:.2f} GFLOP per image (FlopCounterMode; multiply-add = 2)")
    print(f"peak: {peak / 1e9:.0f} GFLOP/s = {how}")
    for k in rates:
        print(f"{k:<12} model part reaches {flops * med[k] / peak:.1%} of peak")

    if not args.no_stages:
        print("where each scored image's time goes (benchmarks/stages.py, one worker's thread):",
              flush=True)
        subprocess.run([sys.executable, str(REPO / "benchmarks" / "stages.py"), "--model",
                        args.model, "--images", "300", "--precision", cfg.score.precision,
                        "--trained-precision", cfg.score.trained_precision],
                       check=True, cwd=REPO)

    print(ingest_lines(lake, timed, len(paths), 1), flush=True)
    ingest_args = ingest_args_for(timed, INGEST_DIR)
    if not args.no_cluster:
        cluster = REPO / "conf" / "cluster.yaml"
        out: dict[int, dict[str, float]] = {}
        for workers in (1, 2):
            local_cluster("start", workers)
            try:
                out[workers] = {
                    "ingest": run_path("ingest", cluster, ingest_args, INGEST_SCRATCH)[0],
                    "score": run_path("job", cluster, score_args, [res])[0],
                }
            finally:
                local_cluster("stop", workers)
        for kind in ("ingest", "score"):
            print(f"cluster {kind}: one 1-core worker {out[1][kind]:.1f} images/s, two "
                  f"{out[2][kind]:.1f} images/s: {out[2][kind] / out[1][kind]:.2f}x "
                  "(target >= 1.7x)")

    if args.distributed:
        for processes in (1, 2):
            rate, epoch = distributed_epochs(processes, views=2, epochs=4)
            print(f"train_distributed, {processes} TorchDistributor process(es) x "
                  f"{max(1, (os.cpu_count() or 2) // processes)} thread(s): frozen-feature "
                  f"cache {rate:.1f} views/s, epoch (cached features) {epoch:.2f} s")
    cached, naive = training_costs(args.model)
    print(f"training, per image: frozen-feature cache view {cached * 1000:.0f} ms (once per "
          f"view), naive epoch step {naive * 1000:.0f} ms (every epoch)")
    acc = Path(args.accuracy_json)
    if acc.exists():
        run = json.loads(acc.read_text())
        wall = run["wall_seconds"]
        trainings, epochs = run.get("trainings", 15), run.get("epochs", cfg.train.epochs)
        n_train = run.get("train_images", 384)
        estimate = trainings * epochs * n_train * naive
        print(f"cross-validation ({acc.name}): {wall:.0f} s wall for {trainings} trainings "
              f"(target < 600 s); the naive recipe would need about {estimate:.0f} s "
              f"({trainings} x {epochs} epochs x {n_train} images x {naive * 1000:.0f} ms): "
              f"{estimate / wall:.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
