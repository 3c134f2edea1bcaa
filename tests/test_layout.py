"""The package's layering: configuration at the bottom, stages above, no import cycle."""

import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))

import check_imports  # noqa: E402


def test_no_import_cycle_and_no_hidden_imports():
    graph, inner = check_imports.imports()
    assert inner == []
    from graphlib import TopologicalSorter

    list(TopologicalSorter(graph).static_order())  # raises CycleError on a cycle


def test_configuration_imports_no_stage():
    graph, _ = check_imports.imports()
    assert graph["wbc_spark.config"] <= {"wbc_spark.model.blocks"}
    assert not graph["wbc_spark.model.blocks"]


def test_ingest_workers_and_configuration_do_not_import_torch():
    # Each Python worker imports what its UDF needs: torch costs an ingest worker 1.6 s of
    # start-up, and scikit-learn a scoring worker about a second, for nothing they run.
    code = ("import sys, wbc_spark.ingest, wbc_spark.config, wbc_spark.score; "
            "print(sorted(m for m in ('torch', 'sklearn', 'scipy.stats') if m in sys.modules))")
    ingest = subprocess.run([sys.executable, "-c", code.replace(", wbc_spark.score", "")],
                            capture_output=True, text=True, check=True)
    assert ingest.stdout.strip() == "[]"
    scoring = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             check=True)
    assert scoring.stdout.strip() == "['torch']"


def test_the_checker_finds_a_cycle(tmp_path):
    pkg = tmp_path / "wbc_spark"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from wbc_spark import b\n")
    (pkg / "b.py").write_text("def f():\n    from wbc_spark import a\n")
    graph, inner = check_imports.imports(tmp_path)
    assert graph["wbc_spark.a"] == {"wbc_spark.b"} and graph["wbc_spark.b"] == {"wbc_spark.a"}
    assert inner == ["wbc_spark.b:2 imports wbc_spark.a"]


def test_the_pipeline_does_not_import_the_evaluation_harness():
    graph, _ = check_imports.imports()
    pipeline = {m for m in graph if not m.startswith("wbc_spark.evaluation")}
    for module in pipeline:
        assert not {d for d in graph[module] if d.startswith("wbc_spark.evaluation")}, module
