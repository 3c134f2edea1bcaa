"""Make a lake of many distinct files from a few real images, for timing the scoring job.

    python benchmarks/gpu_job/make_lake.py IMAGES LAKE COPIES

Each copy is an image's bytes with a short tag appended after the JPEG's end: the pixels are
the original's, but the file's SHA-256 differs, so the scoring job (one result per model and
SHA-256) scores every copy. Copies go to four slide folders. The predictions are the
originals'; only the timings mean anything.
"""

from __future__ import annotations

import sys
from pathlib import Path


def make_lake(images: Path, lake: Path, copies: int) -> int:
    """Write ``copies`` tagged copies of each JPEG in ``images`` under ``lake``; their number."""
    sources = sorted(images.glob("*.jpg"))
    if not sources:
        raise SystemExit(f"make_lake: no .jpg files in {images}")
    n = 0
    for v in range(copies):
        slide = lake / f"slide{v % 4}"
        slide.mkdir(parents=True, exist_ok=True)
        for p in sources:
            (slide / f"{p.stem}_c{v:03d}.jpg").write_bytes(p.read_bytes() + b"copy%05d" % v)
            n += 1
    return n


if __name__ == "__main__":
    src, dst, k = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
    print(f"lake: {make_lake(src, dst, k)} files from {len(list(src.glob('*.jpg')))} images "
          f"in {dst}")
