"""Arrange a flat folder of cell images into slide folders, for the demo's per-slide reports.

    python deploy/demo_slides.py SOURCE_FOLDER TARGET_LAKE [--slides 3]

Each image goes to ``TARGET_LAKE/slide-<k>/`` by a hash of its name (a stable, class-blind
split), as a hard link where the file system allows, else a copy. Files already in place are
left alone, so a re-run changes nothing. KRD-WBC publishes no slide IDs: these slides are for
showing the reports, not a measurement.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source")
    parser.add_argument("target")
    parser.add_argument("--slides", type=int, default=3)
    args = parser.parse_args()
    source, target = Path(args.source), Path(args.target)
    files = sorted(p for p in source.iterdir() if p.is_file() and not p.name.startswith("."))
    if not files:
        raise SystemExit(f"{source}: no images to arrange into slides")
    for path in files:
        k = int(hashlib.sha256(path.name.encode()).hexdigest(), 16) % args.slides
        dest = target / f"slide-{k + 1}" / path.name
        if dest.exists():
            continue
        dest.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(path, dest)
        except OSError:
            shutil.copy2(path, dest)
    print(f"{len(files)} images in {args.slides} slide folders under {target}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
