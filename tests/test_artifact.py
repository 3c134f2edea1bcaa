import pytest
import torch
from conftest import CLASSES

from wbc_spark import artifact


def test_roundtrip_with_weights_only(tiny_artifact):
    raw = torch.load(tiny_artifact, weights_only=True)
    assert raw["classes"] == CLASSES and raw["format"] == artifact.FORMAT
    assert raw["weights_provenance"]["source"] == "bvlc"
    assert "torch" in raw["versions"]
    model, meta = artifact.load(tiny_artifact, expected_classes=CLASSES)
    images = torch.randint(0, 255, (2, 224, 224, 3), dtype=torch.uint8)
    with torch.no_grad():
        assert model(images).shape == (2, 5)
    assert meta["model_id"] == raw["model_id"]


def test_model_for_other_classes_is_refused(tiny_artifact):
    with pytest.raises(artifact.ArtifactError, match="model is for classes"):
        artifact.load(tiny_artifact, expected_classes=["Neutrophil", "Lymphocyte"])


@pytest.mark.parametrize("content, match", [
    (b"not a checkpoint", "not a readable"),
    (None, "not found"),
])
def test_bad_artifacts(tmp_path, content, match):
    path = tmp_path / "model.pt"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(artifact.ArtifactError, match=match):
        artifact.load(path)


def test_incomplete_artifact_refused(tmp_path):
    path = tmp_path / "model.pt"
    torch.save({"format": artifact.FORMAT, "classes": ["a"]}, path)
    with pytest.raises(artifact.ArtifactError, match="lacks"):
        artifact.load(path)


def test_save_is_atomic_on_failure(tmp_path, tiny_artifact, monkeypatch):
    model, meta = artifact.load(tiny_artifact)
    target = tmp_path / "model.pt"
    target.write_bytes(b"old")

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(artifact.os, "fsync", boom)
    with pytest.raises(OSError):
        artifact.save(target, model, classes=CLASSES, source="bvlc",
                      convention=artifact.InputConvention.from_dict(
                          meta["preprocessing"]["input_convention"]),
                      preprocessing={}, config={}, provenance={}, metrics={})
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]


def _resave(source, target, **extra) -> dict:
    model, meta = artifact.load(source)
    artifact.save(target, model, classes=CLASSES, source="bvlc",
                  convention=artifact.InputConvention.from_dict(
                      meta["preprocessing"]["input_convention"]),
                  preprocessing={}, config={}, provenance={}, metrics={}, **extra)
    return artifact.load(target)[1]


def test_test_views_are_recorded_and_change_the_model_id(tmp_path, tiny_artifact):
    one = _resave(tiny_artifact, tmp_path / "one.pt")
    again = _resave(tiny_artifact, tmp_path / "again.pt", test_views=1)
    four = _resave(tiny_artifact, tmp_path / "four.pt", test_views=4)
    assert one["test_views"] == 1 and four["test_views"] == 4
    assert one["model_id"] == again["model_id"] != four["model_id"]


@pytest.mark.parametrize("views", [0, 9, "4", True])
def test_an_artifact_with_impossible_test_views_is_refused(tmp_path, tiny_artifact, views):
    raw = torch.load(tiny_artifact, weights_only=True)
    raw["test_views"] = views
    torch.save(raw, tmp_path / "model.pt")
    with pytest.raises(artifact.ArtifactError, match="test_views="):
        artifact.load(tmp_path / "model.pt")


def test_an_artifact_from_before_test_views_scores_one_view(tmp_path, tiny_artifact):
    raw = torch.load(tiny_artifact, weights_only=True)
    raw.pop("test_views")
    torch.save(raw, tmp_path / "model.pt")
    assert artifact.load(tmp_path / "model.pt")[1]["test_views"] == 1
