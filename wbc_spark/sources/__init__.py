"""Readers that turn an image lake into a catalog: one row per image with its metadata.

A catalog is a pandas DataFrame (metadata only, no pixels) with the columns in
``CATALOG_COLUMNS``. Ingest joins it with the files' bytes, read in parallel by Spark.
"""

CATALOG_COLUMNS = ("image_id", "path", "label", "group", "slide", "mask_path", "source")
