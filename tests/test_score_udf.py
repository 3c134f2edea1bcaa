import numpy as np
import pandas as pd
from conftest import CLASSES, jpeg_bytes, smear

from wbc_spark import artifact
from wbc_spark.score import classify_batches, classify_frame


def test_classify_frame_scores_good_and_flags_bad(tiny_artifact):
    model, meta = artifact.load(tiny_artifact)
    data = pd.Series([jpeg_bytes(smear(seed=1)), b"junk", None, jpeg_bytes(smear(seed=2))])
    out = classify_frame(data, model, meta, "image")
    assert list(out["error"].isna()) == [True, False, False, True]
    assert out.loc[1, "error"].startswith("not an image")
    assert out.loc[2, "error"] == "empty file"
    good = out[out.error.isna()]
    probs = good[[f"p_{c}" for c in CLASSES]].to_numpy()
    assert np.allclose(probs.sum(1), 1.0)
    assert set(good.predicted_class) <= set(CLASSES)
    assert good.predicted_class.isna().sum() == 0
    assert out.loc[1, "predicted_class"] is None and np.isnan(out.loc[1, "p_Basophil"])
    assert out.loc[0, "sha256"] and out.loc[1, "sha256"]


def test_stored_crops_are_scored_like_images(tiny_artifact):
    from wbc_spark.transforms import cell_crop

    model, meta = artifact.load(tiny_artifact)
    img = smear(seed=3)
    crop, _, _ = cell_crop(img, 224)
    a = classify_frame(pd.Series([jpeg_bytes(img, 100)]), model, meta, "image")
    b = classify_frame(pd.Series([crop.tobytes(), b"short"]), model, meta, "crop")
    assert b.loc[1, "error"].startswith("stored crop is not")
    assert a.loc[0, "predicted_class"] is not None and b.loc[0, "predicted_class"] is not None


def test_iterator_loads_the_model_once(tiny_artifact, monkeypatch):
    from wbc_spark import score

    score._cached_model.cache_clear()
    calls = []
    real = artifact.load
    monkeypatch.setattr(score.artifact, "load", lambda *a, **k: calls.append(1) or real(*a, **k))
    batches = (pd.Series([jpeg_bytes(smear(seed=s))]) for s in range(3))
    outs = list(classify_batches(batches, str(tiny_artifact), "image"))
    assert len(outs) == 3 and len(calls) == 1
