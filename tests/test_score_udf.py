import numpy as np
import pandas as pd
import pytest
from conftest import CLASSES, jpeg_bytes, save_tiny_artifact, smear

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
    assert list(out.precision) == ["fp32", None, None, "fp32"]  # null where nothing ran


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


def test_int8_scoring_needs_the_model_s_calibration_and_follows_fp32(tiny_artifact, tmp_path):
    import torch

    from wbc_spark.model import inference
    from wbc_spark.model.quantize import calibration_state
    from wbc_spark.model.weights import InputConvention
    from wbc_spark.transforms import cell_crop

    model, meta = artifact.load(tiny_artifact)
    data = pd.Series([jpeg_bytes(smear(seed=s)) for s in (4, 5, 6)])
    with pytest.raises(artifact.ArtifactError, match="no int8 calibration"):
        classify_frame(data, model, meta, "image", "int8")

    calibration = torch.from_numpy(np.stack([cell_crop(smear(seed=200 + i), 224)[0]
                                             for i in range(6)]))
    path = tmp_path / "int8.pt"
    model_id = artifact.save(
        path, model, classes=CLASSES, source=meta["architecture"]["source"],
        convention=InputConvention.from_dict(meta["preprocessing"]["input_convention"]),
        preprocessing=meta["preprocessing"], config={},
        provenance={}, metrics={}, review=meta["review"], confusion=meta["confusion"],
        int8=calibration_state(model, calibration))
    assert model_id != meta["model_id"]  # the calibration is part of the model's identity
    model8, meta8 = artifact.load(path)
    assert meta8["int8"]["images"] == 6
    fp32 = classify_frame(data, model8, meta8, "image", "fp32")
    int8 = classify_frame(data, model8, meta8, "image", "int8")
    assert model_id in inference._INT8
    probs = [f"p_{c}" for c in CLASSES]
    assert int8.error.isna().all()
    assert (int8.precision == "int8").all() and (fp32.precision == "fp32").all()
    assert np.abs(int8[probs].to_numpy() - fp32[probs].to_numpy()).max() < 0.05
    assert not np.array_equal(int8[probs].to_numpy(), fp32[probs].to_numpy())


def test_a_channel_map_moves_the_classes_not_the_lab_detector(tiny_artifact):
    """With a lab's channel map the head classifies the mapped outputs; the lab detector
    still compares the unaligned ones (a lab's shift is what it detects)."""
    import torch

    from wbc_spark.align import ChannelMap

    model, meta = artifact.load(tiny_artifact)
    data = pd.Series([jpeg_bytes(smear(seed=s)) for s in (1, 2, 3)])
    probs = [f"p_{c}" for c in CLASSES]
    plain = classify_frame(data, model, meta, "image")
    # One scale and shift broadcast over every channel.
    same = classify_frame(data, model, meta, "image",
                          channel_map=ChannelMap(torch.ones(1), torch.zeros(1)))
    moved = classify_frame(data, model, meta, "image",
                           channel_map=ChannelMap(torch.full((1,), 3.0), torch.full((1,), 0.5)))
    np.testing.assert_allclose(same[probs].to_numpy(float), plain[probs].to_numpy(float),
                               rtol=1e-5, atol=1e-6)
    assert not np.allclose(moved[probs].to_numpy(float), plain[probs].to_numpy(float))
    np.testing.assert_array_equal(moved.lab_distance, plain.lab_distance)
    assert list(moved.nearest_lab) == list(plain.nearest_lab)


def test_score_device_cuda_is_refused_without_a_gpu(tiny_artifact, monkeypatch):
    from wbc_spark import score

    monkeypatch.setattr(score.torch.cuda, "is_available", lambda: False)
    score.resolve_device.cache_clear()
    batches = iter([pd.Series([jpeg_bytes(smear(seed=1))])])
    with pytest.raises(RuntimeError, match="score.device=cuda: .*set score.device=cpu or auto"):
        next(classify_batches(batches, str(tiny_artifact), "image", device="cuda"))
    score.resolve_device.cache_clear()


def test_trained_layers_in_bf16_run_in_bf16_and_follow_fp32(tiny_artifact):
    """score.trained_precision=bf16: every convolution and matrix product after the frozen
    layers computes in bfloat16, the table's probabilities stay fp32 and near fp32's, and the
    precision column names both parts."""
    import torch

    model, meta = artifact.load(tiny_artifact)
    data = pd.Series([jpeg_bytes(smear(seed=s)) for s in range(8)] + [b"junk"])
    seen = []
    layers = [m for m in [*model.trainable.modules(), model.fc]
              if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    hooks = [m.register_forward_hook(lambda m, i, o: seen.append(o.dtype)) for m in layers]
    fp32 = classify_frame(data, model, meta, "image", "fp32")
    assert layers and set(seen) == {torch.float32}
    seen.clear()
    bf16 = classify_frame(data, model, meta, "image", "fp32", trained_precision="bf16")
    for h in hooks:
        h.remove()
    assert set(seen) == {torch.bfloat16} and len(seen) >= len(layers)
    assert list(bf16.precision) == [*["fp32/bf16"] * 8, None]
    probs = [f"p_{c}" for c in CLASSES]
    a, b = fp32[probs].to_numpy(float)[:8], bf16[probs].to_numpy(float)[:8]
    np.testing.assert_allclose(b.sum(1), 1.0, atol=1e-6)
    np.testing.assert_allclose(a, b, atol=0.03)
    assert np.isfinite(bf16.cell_distance.to_numpy(float)[:8]).all()


def test_the_accelerator_path_gives_the_cpu_path_s_results(tiny_artifact):
    """Off the CPU the network takes the batch whole and its outputs come back to the host
    for the tables; run here on the device "cpu:0", that path gives the CPU path's numbers."""
    import torch

    from wbc_spark.align import ChannelMap

    model, meta = artifact.load(tiny_artifact)
    data = pd.Series([jpeg_bytes(smear(seed=s)) for s in range(20)] + [b"junk"])
    moved = ChannelMap(torch.full((1,), 2.0), torch.full((1,), 0.25))
    probs = [f"p_{c}" for c in CLASSES]
    host = classify_frame(data, model, meta, "image", "fp32", channel_map=moved)
    other = classify_frame(data, model, meta, "image", "auto", channel_map=moved,
                           device="cpu:0")
    assert list(other.precision) == [*["fp32"] * 20, None]  # "auto" off the CPU: fp32
    assert other.error.notna().sum() == 1 and list(other.error) == list(host.error)
    np.testing.assert_allclose(other[probs].to_numpy(float), host[probs].to_numpy(float),
                               atol=1e-5)
    # Squared distances in the thousands: float32 sums in another order differ in the 4th digit.
    for column in ("cell_distance", "lab_distance"):
        np.testing.assert_allclose(other[column].to_numpy(float), host[column].to_numpy(float),
                                   rtol=1e-3)
    assert list(other.predicted_class) == list(host.predicted_class)


def test_task_gpu_reads_the_address_spark_assigned(monkeypatch):
    import pyspark
    from pyspark.resource import ResourceInformation

    from wbc_spark.score import task_gpu

    assert task_gpu() is None  # not in a Spark task

    class Task:
        def __init__(self, resources):
            self._resources = resources

        def resources(self):
            return self._resources

    monkeypatch.setattr(pyspark.TaskContext, "get",
                        lambda: Task({"gpu": ResourceInformation("gpu", ["2", "3"])}))
    assert task_gpu() == "2"
    monkeypatch.setattr(pyspark.TaskContext, "get", lambda: Task({}))
    assert task_gpu() is None


@pytest.mark.parametrize("cut, channels", [("inception4d", 528), ("inception4c", 512)])
def test_a_model_cut_below_inception4e_is_saved_loaded_and_scored_at_its_own_cut(
        fake_weights, tmp_path, cut, channels):
    """README's adapting recipe trains inception4d and 4e too (session 33's recipe: 4e only):
    its frozen outputs are the cut's channels, which its review detectors are fitted on and
    scoring must feed them."""
    import torch

    path = save_tiny_artifact(tmp_path / "model.pt", fake_weights, freeze_until=cut)
    loaded, meta = artifact.load(path)
    assert meta["architecture"]["freeze_until"] == cut
    assert loaded.freeze_until == cut
    frozen = loaded.embed_frozen(torch.zeros(1, 224, 224, 3, dtype=torch.uint8))
    assert frozen.shape[1] == channels
    data = pd.Series([jpeg_bytes(smear(seed=s)) for s in (7, 8)] + [b"junk"])
    out = classify_frame(data, loaded, meta, "image")
    assert list(out.error.isna()) == [True, True, False]
    good = out[out.error.isna()]
    assert np.allclose(good[[f"p_{c}" for c in CLASSES]].to_numpy(float).sum(1), 1.0)
    assert np.isfinite(good.lab_distance.to_numpy(float)).all()


def test_a_model_with_test_views_scores_the_mean_of_the_flips(tiny_artifact):
    from wbc_spark.transforms import cell_crop, dihedral

    model, meta = artifact.load(tiny_artifact)
    crops = np.stack([cell_crop(smear(seed=s), 224)[0] for s in (7, 8, 9)])
    cols = [f"p_{c}" for c in CLASSES]
    # each flip scored alone by the one-view model, then the same crops by a four-view one
    alone = [classify_frame(pd.Series([c.tobytes() for c in dihedral(crops, k)]), model, meta,
                            "crop") for k in range(4)]
    four = classify_frame(pd.Series([c.tobytes() for c in crops]), model,
                          {**meta, "test_views": 4}, "crop")
    expected = np.mean([a[cols].to_numpy(float) for a in alone], axis=0)
    assert np.allclose(four[cols].to_numpy(float), expected, atol=1e-5)
    assert not np.allclose(expected, alone[0][cols].to_numpy(float), atol=1e-4)
    assert list(four.predicted_class) == [CLASSES[i] for i in expected.argmax(1)]
    assert np.allclose(four.confidence, expected.max(1), atol=1e-5)
    # the detectors compare the image itself
    assert np.allclose(four.cell_distance, alone[0].cell_distance)
    assert np.allclose(four.lab_distance, alone[0].lab_distance)


def test_threads_beyond_the_cores_spark_counts_per_task_are_warned_about():
    from wbc_spark.score import thread_warning

    assert thread_warning(1, 1) is None
    assert thread_warning(2, 2) is None
    assert thread_warning(1, 4) is None
    text = thread_warning(2, 1)
    assert "score.threads_per_worker=2 but spark.task.cpus=1" in text
    assert "2 torch threads" in text and "spark.task.cpus=2" in text
    assert "1.5 torch threads" in thread_warning(3, 2)


def test_a_folder_of_one_class_is_told_from_a_lab_s_folder():
    from wbc_spark.score import one_class_folder

    classes = ["Neutrophil", "Lymphocyte", "Platelet"]
    north = "/labs/north"
    assert one_class_folder(f"{north}/Lymphocyte", classes) == ("Lymphocyte",
                                                                f"{north}/Lymphocyte")
    assert one_class_folder(f"{north}/lymphocyte/", classes) == ("Lymphocyte",
                                                                 f"{north}/lymphocyte")
    assert one_class_folder("hdfs://nn/labs/NEUTROPHIL", classes)[0] == "Neutrophil"
    assert one_class_folder(f"{north}/platelet/*.jpg", classes) == ("Platelet",
                                                                    f"{north}/platelet")
    # days under one class's folder are still that class alone
    assert one_class_folder(f"{north}/Lymphocyte/day[12]/*.jpg", classes) == (
        "Lymphocyte", f"{north}/Lymphocyte")
    assert one_class_folder(north, classes) is None
    assert one_class_folder("/labs/Lymphocyte/north", classes) is None  # a lab under it
    assert one_class_folder(f"{north}/*/*.jpg", classes) is None
    assert one_class_folder(f"{north}/lymphocytes", classes) is None
