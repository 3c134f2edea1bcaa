"""The pyarrow hotfix is active wherever wbc_spark runs, and does what it promises."""

import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import wbc_spark


class Pickled(pa.PyExtensionType):
    """An extension type pyarrow would rebuild by unpickling: what an attacker ships."""

    def __init__(self):
        super().__init__(pa.int64())

    def __reduce__(self):
        return Pickled, ()


def test_hotfix_is_active_after_importing_the_package():
    assert wbc_spark.hotfix_active()


def test_a_parquet_file_with_a_pickled_extension_type_is_refused(tmp_path):
    path = tmp_path / "evil.parquet"
    storage = pa.array([1, 2, 3], pa.int64())
    table = pa.table({"x": pa.ExtensionArray.from_storage(Pickled(), storage)})
    pq.write_table(table, path)
    # A fresh process that only imports wbc_spark, then reads the file.
    code = ("import wbc_spark, pyarrow.parquet as pq\n"
            f"pq.read_table({str(path)!r})\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode != 0
    assert "Disallowed deserialization of 'arrow.py_extension_type'" in proc.stderr


@pytest.mark.spark
def test_hotfix_is_active_in_spark_python_workers(monkeypatch):
    from pyspark.sql import SparkSession

    monkeypatch.setenv("PYSPARK_PYTHON", sys.executable)
    spark = (SparkSession.builder.master("local[1]").appName("hotfix")
             .config("spark.ui.enabled", "false").getOrCreate())
    try:
        def check(batches):
            import pandas as pd

            from wbc_spark import hotfix_active  # as the scoring and ingest UDFs import it

            for _ in batches:
                yield pd.DataFrame({"active": [hotfix_active()]})

        rows = spark.range(2).mapInPandas(check, "active boolean").collect()
        assert rows and all(r.active for r in rows)
    finally:
        spark.stop()
