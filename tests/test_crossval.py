import pandas as pd
import pytest

from wbc_spark.crossval import load_dataset


def test_a_dataset_made_with_another_stain_setting_is_refused(tmp_path):
    rows = pd.DataFrame({"image_id": ["a", "b"], "label": ["Neutrophil", "Lymphocyte"],
                         "group": ["a", "b"], "sha256": ["1", "2"], "crop": [b"x", b"y"],
                         "crop_size": [1, 1], "stain": ["none", "none"], "image": [b"", b""],
                         "mask": [None, None], "crop_box": [[0, 0, 1], [0, 0, 1]]})
    (tmp_path / "batch=1").mkdir()
    rows.to_parquet(tmp_path / "batch=1" / "part.parquet")
    classes = ["Neutrophil", "Lymphocyte"]
    assert len(load_dataset(str(tmp_path), classes, "none")) == 2
    with pytest.raises(ValueError, match="crops were made with stain \\['none'\\].*'field'"):
        load_dataset(str(tmp_path), classes, "field")
