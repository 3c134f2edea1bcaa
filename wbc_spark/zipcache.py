"""Keep ``importlib.invalidate_caches()`` cheap in Spark's Python workers on Python < 3.13.

PySpark's worker calls ``importlib.invalidate_caches()`` before every task (Spark 3.5's
``worker.py``). On Python 3.10-3.12 that makes every ``zipimporter`` in
``sys.path_importer_cache`` read its archive's whole directory again (CPython issue gh-103200,
fixed in 3.13; SPARK-54744 on Spark's side, after 3.5). A worker's path holds Spark's
``pyspark.zip`` (793 files) and py4j's zip, with one importer per package imported from them,
so every task paid about 0.18 s here before it ran a line of ours: an ingest of 2,000 images
(63 tasks) spent 6-8 s on it on two cores.

``install`` wraps ``zipimporter.invalidate_caches`` so that it reads an archive's directory
again only when the archive changed on disk (its size, modification time or inode) since that
importer last read it, which is the case the invalidation exists for; an unchanged archive keeps
its cached directory. Each importer keeps its own record: one archive has several importers
(one per package in it), and each must see a change.
"""

from __future__ import annotations

import os
import sys
import zipimport

_ORIGINAL = zipimport.zipimporter.invalidate_caches


def _signature(archive: str) -> tuple[int, int, int] | None:
    try:
        st = os.stat(archive)
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns, st.st_ino


def _invalidate_if_changed(self: zipimport.zipimporter) -> None:
    now = _signature(self.archive)
    if now is not None and getattr(self, "_wbc_read_at", None) == now:
        return  # unchanged on disk since this importer read it: its directory is still right
    _ORIGINAL(self)
    self._wbc_read_at = now


def needed() -> bool:
    """Whether this Python re-reads zip directories on every invalidation."""
    return (3, 10) <= sys.version_info[:2] < (3, 13)


def install() -> bool:
    """Install the wrapper where it is needed (idempotent); whether it is installed."""
    if needed() and zipimport.zipimporter.invalidate_caches is _ORIGINAL:
        zipimport.zipimporter.invalidate_caches = _invalidate_if_changed
    return zipimport.zipimporter.invalidate_caches is _invalidate_if_changed
