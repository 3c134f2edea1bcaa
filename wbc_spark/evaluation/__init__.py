"""The evaluation harness that the benchmarks use, apart from the pipeline: cross-validation
in one process (``crossval``) and the statistics of where the model looks
(``activation_maps``). No pipeline module imports it (``tests/test_layout.py``)."""
