"""An image folder: one sub-folder per class (labelled) or any folders (unlabelled).

``lake/Neutrophil/a.jpg`` is labelled Neutrophil (folder names match classes case-insensitively);
``lake/slide_017/a.jpg`` is unlabelled and its slide is ``slide_017`` (the path of its folder
relative to the lake). Spark lists and reads the files; this module only interprets paths.
"""

from __future__ import annotations

import os
from pathlib import PurePosixPath
from urllib.parse import quote_from_bytes, unquote, unquote_to_bytes, urlparse

UNREADABLE_NAME = ("file name is not valid UTF-8, so Spark cannot list or read it; rename the "
                   "file")


def unlistable(lake: str) -> list[str]:
    """Files under a local ``lake`` whose names Spark's (Java's) file listing cannot represent
    (not valid UTF-8), as ``file:`` URIs with the name's bytes percent-encoded, so they are
    recorded instead of silently missing. Empty for lakes on other file systems."""
    parsed = urlparse(lake)
    if parsed.scheme not in ("", "file") or not os.path.isdir(parsed.path or lake):
        return []
    out = []
    for folder, _, names in os.walk(os.fsencode(parsed.path or lake)):
        for name in names:
            full = os.path.join(folder, name)
            try:
                full.decode("utf-8")
            except UnicodeDecodeError:
                out.append("file:" + quote_from_bytes(full, safe="/"))
    return sorted(out)


def outside_links(lake: str) -> dict[str, str]:
    """Symbolic links under a local ``lake`` that lead outside it: {link: real target}. Spark's
    listing follows them (a linked folder's files are listed below the link), so without this
    a link could make a job read files the user never pointed it at. Links that stay inside
    the lake are ordinary (copies of one image are scored once). Empty for other file
    systems."""
    parsed = urlparse(lake)
    path = parsed.path or lake
    if parsed.scheme not in ("", "file") or not os.path.isdir(path):
        return {}
    root = os.path.realpath(path)
    out = {}
    # followlinks=False: a linked folder is judged by where it leads, never walked into.
    for folder, dirs, names in os.walk(path):
        for name in dirs + names:
            full = os.path.join(folder, name)
            if os.path.islink(full):
                target = os.path.realpath(full)
                if target != root and not target.startswith(root + os.sep):
                    out[full] = target
    return out


def outside_problem(uri: str, links: dict[str, str], setting: str) -> str | None:
    """Why a listed file is not read: it was reached through one of ``links``; else None."""
    path = local_path(uri)
    for link, target in links.items():
        if path == link or path.startswith(link + "/"):
            return (f"reached through a symbolic link leading outside the lake ({link} -> "
                    f"{target}); not read: move the file into the lake, or set {setting}=follow")
    return None


def name_problem(uri: str) -> str | None:
    """``UNREADABLE_NAME`` for a path from ``unlistable``, else None."""
    try:
        unquote_to_bytes(urlparse(uri).path).decode("utf-8")
    except UnicodeDecodeError:
        return UNREADABLE_NAME
    return None


def local_path(uri: str) -> str:
    """``file:/a/b%20c.jpg`` (as Spark reports paths) -> ``/a/b c.jpg``; other URIs unchanged."""
    parsed = urlparse(uri)
    if parsed.scheme in ("", "file"):
        return unquote(parsed.path)
    return uri


def path_metadata(path: str, lake_root: str, classes: list[str] | tuple[str, ...]
                  ) -> dict[str, str | None]:
    """image_id, label, group and slide of a file in a folder lake (the reference that
    ``wbc_spark.ingest.path_columns``, which the jobs run, is tested against)."""
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
