"""Table helpers against Hadoop's own answers."""

from __future__ import annotations

import os

import pytest

pytestmark = pytest.mark.spark


@pytest.fixture(scope="module")
def spark():
    from pyspark.sql import SparkSession

    return (SparkSession.builder.master("local[1]").appName("tables")
            .config("spark.ui.enabled", "false").getOrCreate())


def test_local_empty_files_match_hadoop_s_listing(spark, tmp_path):
    from wbc_spark import tables

    lake = tmp_path / "lake"
    for name in ("a/empty.jpg", "a/full.jpg", "b c/sp ace#1%.png", "b c/é.jpg", "_hidden",
                 "d/.dot.jpg", "d/e/deep.jpg"):
        (lake / name).parent.mkdir(parents=True, exist_ok=True)
        (lake / name).write_bytes(b"" if "full" not in name else b"x")
    os.symlink(lake / "a", lake / "linked")  # a link inside the lake is listed below it
    fs, jpath = tables._fs(spark, str(lake))
    hadoop = tables._hadoop_empty_files(fs, jpath)
    local = tables.empty_files(spark, str(lake))
    assert local == hadoop
    assert [p.rsplit("/lake/", 1)[1] for p, _ in local] == [
        "a/empty.jpg", "b c/sp ace#1%.png", "b c/é.jpg", "d/e/deep.jpg", "linked/empty.jpg"]
    assert tables.empty_files(spark, str(tmp_path / "absent")) == []


def test_path_columns_match_path_metadata(spark):
    from pyspark.sql import functions as F

    from wbc_spark.ingest import path_columns
    from wbc_spark.sources.folder import path_metadata

    classes = ["Neutrophil", "Basophil"]
    root = "/lake/a b"
    paths = ["file:/lake/a%20b/slide%201/x+y.jpg", "file:///lake/a%20b/s/t/%25z%23.png",
             "file:/lake/a%20b/top.jpg", "file:/lake/a%20b/neutrophil/n.jpg",
             "file:/lake/a%20b/BASOPHIL/deeper/b.jpg",
             "file:/lake/a%20b/Slide%C3%A9/%C3%A9.jpg", "file:/elsewhere/q.jpg",
             "hdfs://nn/lake/a b/s/h.jpg"]
    for base in (root, "file:" + root, "hdfs://nn" + root):
        named = path_columns(F.col("path"), base, classes)
        rows = (spark.createDataFrame([(p,) for p in paths], "path string")
                .select("path", *[c.alias(n) for n, c in named.items()]).collect())
        for r in rows:
            assert r.asDict() == {"path": r.path, **path_metadata(r.path, base, classes)}


def test_an_absent_table_reads_as_a_known_empty_frame_that_joins_without_a_shuffle(spark,
                                                                                  tmp_path):
    from pyspark.sql import types as T

    from wbc_spark import tables

    schema = T.StructType([T.StructField("path", T.StringType()),
                           T.StructField("file_length", T.LongType()),
                           T.StructField("blob", T.BinaryType())])
    empty = tables.read(spark, str(tmp_path / "absent"), schema)
    assert empty.schema == schema
    assert empty.count() == 0
    files = spark.createDataFrame([(f"p{i}", i, b"x") for i in range(50)], schema).repartition(4)
    fresh = files.join(empty.select("path", "file_length"), ["path", "file_length"], "left_anti")
    assert fresh.count() == 50
    plan = fresh._jdf.queryExecution().executedPlan().toString()
    assert "SortMergeJoin" not in plan and "BroadcastHashJoin" not in plan, plan
