"""An image folder: one sub-folder per class (labelled) or any folders (unlabelled).

``lake/Neutrophil/a.jpg`` is labelled Neutrophil (folder names match classes case-insensitively);
``lake/slide_017/a.jpg`` is unlabelled and its slide is ``slide_017`` (the path of its folder
relative to the lake). Spark lists and reads the files; this module only interprets paths.
"""

from __future__ import annotations

from pathlib import PurePosixPath
from urllib.parse import unquote, urlparse


def local_path(uri: str) -> str:
    """``file:/a/b%20c.jpg`` (as Spark reports paths) -> ``/a/b c.jpg``; other URIs unchanged."""
    parsed = urlparse(uri)
    if parsed.scheme in ("", "file"):
        return unquote(parsed.path)
    return uri


def path_metadata(path: str, lake_root: str, classes: list[str] | tuple[str, ...]
                  ) -> dict[str, str | None]:
    """image_id, label, group and slide of a file in a folder lake."""
    canonical = {c.lower(): c for c in classes}
    root = PurePosixPath(local_path(lake_root).rstrip("/"))
    p = PurePosixPath(local_path(path))
    try:
        rel = p.relative_to(root)
    except ValueError:
        rel = PurePosixPath(p.name)
    parent = rel.parent
    label = None
    slide = None
    if parent.parts and parent.parts[0].lower() in canonical:
        label = canonical[parent.parts[0].lower()]
    elif str(parent) not in ("", "."):
        slide = str(parent)
    return {"image_id": str(rel), "label": label, "group": str(rel), "slide": slide}
