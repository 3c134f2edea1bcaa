"""The per-task ``importlib.invalidate_caches()`` of Spark's workers keeps zip directories."""

from __future__ import annotations

import importlib
import sys
import zipfile
import zipimport

import pytest

from wbc_spark import zipcache

pytestmark = pytest.mark.skipif(not zipcache.needed(),
                                reason="this Python's zipimport invalidates lazily")


def _write_zip(path, modules: dict[str, str]) -> None:
    with zipfile.ZipFile(path, "w") as z:
        for name, source in modules.items():
            z.writestr(f"{name}.py", source)


def test_an_unchanged_zip_keeps_its_directory_and_a_changed_one_is_read_again(tmp_path,
                                                                              monkeypatch):
    archive = tmp_path / "lib.zip"
    _write_zip(archive, {"zc_first": "VALUE = 1\n"})
    monkeypatch.syspath_prepend(str(archive))
    monkeypatch.delitem(sys.modules, "zc_first", raising=False)
    monkeypatch.delitem(sys.modules, "zc_second", raising=False)
    assert zipcache.install()
    assert importlib.import_module("zc_first").VALUE == 1

    importlib.invalidate_caches()  # the first invalidation reads the directory once
    directory = zipimport._zip_directory_cache[str(archive)]
    for _ in range(3):
        importlib.invalidate_caches()
        assert zipimport._zip_directory_cache[str(archive)] is directory  # not read again

    _write_zip(archive, {"zc_first": "VALUE = 1\n", "zc_second": "VALUE = 2\n"})
    importlib.invalidate_caches()
    assert zipimport._zip_directory_cache[str(archive)] is not directory
    assert importlib.import_module("zc_second").VALUE == 2


def test_the_package_installs_it():
    import wbc_spark  # noqa: F401

    assert zipimport.zipimporter.invalidate_caches is zipcache._invalidate_if_changed


def test_every_importer_of_a_changed_zip_sees_the_change(tmp_path, monkeypatch):
    # Importing a package from a zip adds a second importer for the same archive (its
    # package folder); a change must reach both, not only the first one invalidated.
    archive = tmp_path / "pkg.zip"
    _write_zip(archive, {"zc_pkg/__init__": "", "zc_pkg/first": "VALUE = 1\n"})
    monkeypatch.syspath_prepend(str(archive))
    for name in ("zc_pkg", "zc_pkg.first", "zc_pkg.second"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    assert zipcache.install()
    assert importlib.import_module("zc_pkg.first").VALUE == 1
    importers = [f for f in sys.path_importer_cache.values()
                 if isinstance(f, zipimport.zipimporter) and f.archive == str(archive)]
    assert len(importers) >= 2
    importlib.invalidate_caches()

    _write_zip(archive, {"zc_pkg/__init__": "", "zc_pkg/first": "VALUE = 1\n",
                         "zc_pkg/second": "VALUE = 2\n"})
    importlib.invalidate_caches()
    assert importlib.import_module("zc_pkg.second").VALUE == 2
