"""Only where pandas 2.3 does not import on the GPU machine (benchmarks/gpu_job/step2.sh).

pyspark 3.5's Arrow serializers call two pandas helpers that pandas 3 removed; this gives them
back as pandas 2 defined them, in that machine's Python processes and nowhere else.
"""
try:
    import pandas as pd
    import pandas.api.types as _types
    import pandas.core.dtypes.common as _common

    def _is(dtype_class):
        return lambda obj: isinstance(getattr(obj, "dtype", obj), dtype_class)

    for _module in (_types, _common):
        if not hasattr(_module, "is_categorical_dtype"):
            _module.is_categorical_dtype = _is(pd.CategoricalDtype)
        if not hasattr(_module, "is_datetime64tz_dtype"):
            _module.is_datetime64tz_dtype = _is(pd.DatetimeTZDtype)
except ImportError:
    pass
