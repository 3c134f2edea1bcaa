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
