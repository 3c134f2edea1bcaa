"""The evaluation harness that the benchmarks use, apart from the pipeline: cross-validation
in one process (``crossval``), the statistics of where the model looks (``activation_maps``)
and the per-lab feature alignment that a lever measures (``align``). No pipeline module
imports it (``tests/test_layout.py``)."""
