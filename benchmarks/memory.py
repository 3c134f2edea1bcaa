"""Memory at scale: the scoring job over a large lake, as a user runs it, with its processes'
memory sampled from start to end.

    .venv/bin/python benchmarks/memory.py [--images 100000] [--model runs/model/model.pt]

1. Builds a lake of ``--images`` distinct files under runs/memory_lake (kept between runs):
   copies of the benchmark lake's 512 x 512 JPEGs (``benchmarks/speed.py`` builds it) each
   with its own number appended after the JPEG's end marker. Decoders stop at the end marker,
   so every file shows the same cell as its source, but no two files have the same bytes
   (the scoring job scores each content once: copies with equal bytes would be skipped).
2. Runs ``deploy/submit.sh score`` on it (local mode, ``conf/local.yaml``) into a fresh
   results table, sampling every 2 s the resident memory of the driver's Python process, the
   Spark JVM and each Python worker (``pyspark.daemon``).
3. Prints the wall time, images per second, each Python worker's peak (target under 1.5 GiB)
   and the driver's and the JVM's memory at each tenth of the run (flat: no growth with the
   number of images).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SLIDES = 100


def build_lake(root: Path, source: Path, n: int) -> int:
    """``n`` distinct files in ``SLIDES`` folders, copies of ``source``'s JPEGs (see above)."""
    sources = sorted(source.rglob("*.jpg"))
    if not sources:
        raise SystemExit(f"{source}: no JPEGs (run benchmarks/speed.py once to build it)")
    have = sum(1 for _ in root.rglob("*.jpg")) if root.exists() else 0
    if have == n:
        return n
    if have:
        raise SystemExit(f"{root} holds {have} files, not {n}: remove it first")
    blobs = [p.read_bytes() for p in sources]
    for i in range(n):
        out = root / f"slide{i % SLIDES:03d}" / f"cell{i:07d}.jpg"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(blobs[i % len(blobs)] + f"wbc_spark memory lake {i}".encode())
    return n


def rss_kib(pid: int) -> int:
    try:
        found = re.search(r"VmRSS:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text())
    except OSError:
        return 0
    return int(found.group(1)) if found else 0


def descendants(pid: int) -> list[int]:
    children = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            children += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    return children + [d for c in children for d in descendants(c)]


def cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


class Sampler:
    """Every ``every`` seconds: resident memory (KiB) of the driver's Python, the JVM and the
    largest Python worker among ``root``'s descendants."""

    def __init__(self, root: int, every: float = 2.0) -> None:
        self.root, self.every = root, every
        self.samples: list[tuple[float, int, int, int]] = []
        self.worker_peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        start = time.perf_counter()
        while not self._stop.wait(self.every):
            driver = jvm = worker = 0
            for pid in [self.root, *descendants(self.root)]:
                cmd = cmdline(pid)
                if b"pyspark.daemon" in cmd or b"pyspark/daemon" in cmd:
                    worker = max(worker, rss_kib(pid))
                elif b"java" in cmd.split(b"\0")[0]:
                    jvm = max(jvm, rss_kib(pid))
                elif b"jobs/score.py" in cmd:
                    driver = max(driver, rss_kib(pid))
            self.worker_peak = max(self.worker_peak, worker)
            self.samples.append((time.perf_counter() - start, driver, jvm, worker))

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=100_000)
    parser.add_argument("--model", default=str(REPO / "runs" / "model" / "model.pt"))
    parser.add_argument("--source", default=str(REPO / "runs" / "bench_lake"))
    parser.add_argument("--lake", default=str(REPO / "runs" / "memory_lake"))
    args = parser.parse_args()
    lake, results = Path(args.lake), REPO / "runs" / "memory_results"
    t = time.perf_counter()
    n = build_lake(lake, Path(args.source), args.images)
    print(f"lake: {n} distinct files in {lake} ({time.perf_counter() - t:.0f} s to build or "
          "find)", flush=True)
    for p in (results, Path(f"{results}_per_class")):
        shutil.rmtree(p, ignore_errors=True)
    cmd = ["bash", "deploy/submit.sh", "score", "--config", "conf/local.yaml",
           f"score.input={lake}", f"score.model={args.model}", f"score.results={results}"]
    start = time.perf_counter()
    log = REPO / "runs" / "memory_score.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
        with Sampler(proc.pid) as sampler:
            code = proc.wait()
    wall = time.perf_counter() - start
    tail = log.read_text()[-3000:]
    if code != 0:
        print(tail)
        raise SystemExit(f"scoring job failed (exit {code}); log: {log}")
    scored = re.search(r"scored (\d+)", tail)
    done = int(scored.group(1)) if scored else n
    print(f"scoring job (deploy/submit.sh score, local mode): {done} images in {wall:.0f} s "
          f"({done / wall:.1f} images/s, fixed start-up included); log: {log}")
    print(f"largest Python worker: peak resident {sampler.worker_peak / 1024:.0f} MiB "
          "(target < 1536 MiB)")
    print("resident memory over the run (MiB): elapsed s, driver Python, JVM, largest worker")
    samples = sampler.samples
    for k in range(1, 11):
        at, driver, jvm, worker = samples[min(len(samples) - 1, k * len(samples) // 10 - 1)]
        print(f"  {k * 10:>3}%  {at:7.0f}  {driver / 1024:7.0f}  {jvm / 1024:7.0f}  "
              f"{worker / 1024:7.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
