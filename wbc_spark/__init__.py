"""wbc_spark: white blood cell classification at hospital scale.

Importing the package installs ``pyarrow_hotfix`` first: pyarrow 14 (which petastorm pins) is
in the range of PYSEC-2024-161 / CVE-2023-47248 (arbitrary code execution when reading an
untrusted Arrow IPC or Parquet file with a ``PyExtensionType`` column), and the hotfix is the
published mitigation for versions that cannot upgrade. Every process that runs our code (the
jobs' drivers, the Python workers of the scoring UDF and ingest, the training processes and
their petastorm readers) imports this package before it reads a table.

It also hides the FutureWarnings raised from inside petastorm: petastorm 0.12 calls pyarrow APIs
that pyarrow has deprecated, and its readers repeat the warning for every row group they read
(314 such warnings, two thirds of ``make demo``'s output, buried the training job's own log).
They are for petastorm to fix, not for our users; warnings from any other module still show.

And on Python 3.10-3.12 it keeps the per-task ``importlib.invalidate_caches()`` of Spark's
Python workers from re-reading ``pyspark.zip`` every task (``wbc_spark.zipcache``).
"""

import warnings

import pyarrow_hotfix  # noqa: F401  (installs itself on import)

from wbc_spark import zipcache

warnings.filterwarnings("ignore", category=FutureWarning, module=r"petastorm(\.|$)")
zipcache.install()


def hotfix_active() -> bool:
    """Whether pyarrow refuses to unpickle ``arrow.py_extension_type`` in this process."""
    import pyarrow

    return bool(getattr(pyarrow, "_hotfix_installed", False))
