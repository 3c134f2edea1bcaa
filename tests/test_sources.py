import pandas as pd
import pytest
from conftest import CLASSES

from wbc_spark.sources import folder, krd_wbc, manifest


def write_labels(path, text):
    path.write_bytes(text.encode("utf-8-sig"))  # with the byte-order mark, as published
    return path


def test_quirky_krd_label_file(tmp_path):
    f = write_labels(tmp_path / "class labels.csv",
                     "Image ID,Categoriy\nImage1,Lymphocyte\nimage2,Neutrophil\n"
                     "Imaeg405,Neutrophil\nImage7 ,basophil\n\n")
    labels = krd_wbc.read_labels(f, CLASSES)
    assert labels == {1: "Lymphocyte", 2: "Neutrophil", 405: "Neutrophil", 7: "Basophil"}


@pytest.mark.parametrize("body, match", [
    ("Image1,Platelet\n", "not one of"),
    ("Image,Lymphocyte\n", "has no number"),
    ("Image1,Lymphocyte\nimage1,Neutrophil\n", "labelled both"),
])
def test_label_file_errors_name_the_line(tmp_path, body, match):
    f = write_labels(tmp_path / "l.csv", "Image ID,Categoriy\n" + body)
    with pytest.raises(krd_wbc.LabelFileError, match=match):
        krd_wbc.read_labels(f, CLASSES)


def test_wrong_header_is_refused(tmp_path):
    f = write_labels(tmp_path / "l.csv", "id,class\nImage1,Lymphocyte\n")
    with pytest.raises(krd_wbc.LabelFileError, match="header"):
        krd_wbc.read_labels(f, CLASSES)


def test_krd_catalog_groups_known_duplicates(tmp_path):
    write_labels(tmp_path / "class labels.csv",
                 "Image ID,Categoriy\nImage200,Lymphocyte\nImage202,Lymphocyte\n"
                 "Image91,Neutrophil\nImage394,Neutrophil\nImage5,Monocyte\n")
    cat = krd_wbc.catalog(tmp_path, CLASSES).set_index("image_id")
    assert cat.loc["krd-wbc/image200", "group"] == cat.loc["krd-wbc/image202", "group"]
    assert cat.loc["krd-wbc/image91", "group"] == cat.loc["krd-wbc/image394", "group"]
    assert cat.loc["krd-wbc/image5", "group"] == "krd-wbc/image5"
    assert cat.loc["krd-wbc/image5", "mask_path"].endswith("Dataset/mask/mask5.jpg")


def test_folder_paths_give_labels_or_slides():
    m = folder.path_metadata("file:/lake/neutrophil/a.jpg", "/lake", CLASSES)
    assert (m["label"], m["slide"], m["image_id"]) == ("Neutrophil", None, "neutrophil/a.jpg")
    m = folder.path_metadata("file:/lake/slide_07/x/b%20c.png", "/lake", CLASSES)
    assert (m["label"], m["slide"], m["image_id"]) == (None, "slide_07/x", "slide_07/x/b c.png")
    m = folder.path_metadata("file:/lake/top.jpg", "/lake", CLASSES)
    assert (m["label"], m["slide"]) == (None, None)


def test_manifest(tmp_path):
    (tmp_path / "m.csv").write_text("path,label,slide,mask\nimgs/a.jpg,eosinophil,s1,"
                                    "masks/a.png\nimgs/b.jpg,,s2,\n")
    cat = manifest.catalog(tmp_path / "m.csv", CLASSES)
    assert list(cat["label"]) == ["Eosinophil", None]
    assert cat["path"][0] == str(tmp_path / "imgs" / "a.jpg")
    assert cat["mask_path"][0] == str(tmp_path / "masks" / "a.png")
    assert pd.isna(cat["mask_path"][1])


@pytest.mark.parametrize("text, match", [
    ("file,label\na.jpg,Neutrophil\n", "no 'path' column"),
    ("path,label,colour\na.jpg,Neutrophil,red\n", "unknown columns"),
    ("path,label\na.jpg,Platelet\n", "not one of"),
])
def test_bad_manifests(tmp_path, text, match):
    (tmp_path / "m.csv").write_text(text)
    with pytest.raises(manifest.ManifestError, match=match):
        manifest.catalog(tmp_path / "m.csv", CLASSES)


def test_manifest_keeps_other_cell_types_with_their_label(tmp_path):
    from wbc_spark.config import CLASSES, OTHER_LABELS

    (tmp_path / "m.csv").write_text("path,label\na.jpg,Neutrophil\nb.jpg,platelet\n")
    cat = manifest.catalog(tmp_path / "m.csv", list(CLASSES) + list(OTHER_LABELS))
    assert cat.label.tolist() == ["Neutrophil", "Platelet"]
    with pytest.raises(manifest.ManifestError, match="'platelet' is not one of"):
        manifest.catalog(tmp_path / "m.csv", CLASSES)


def test_links_leading_outside_the_lake_are_found_and_named(tmp_path):
    lake, far = tmp_path / "lake", tmp_path / "far"
    (lake / "Neutrophil").mkdir(parents=True)
    far.mkdir()
    (far / "x.jpg").write_bytes(b"x")
    (lake / "Neutrophil" / "a.jpg").write_bytes(b"a")
    (lake / "Neutrophil" / "inside.jpg").symlink_to(lake / "Neutrophil" / "a.jpg")
    (lake / "Neutrophil" / "out.jpg").symlink_to(far / "x.jpg")
    (lake / "linked").symlink_to(far)
    (lake / "up").symlink_to(tmp_path)  # a loop through the lake's parent
    links = folder.outside_links(str(lake))
    assert set(links) == {str(lake / "Neutrophil" / "out.jpg"), str(lake / "linked"),
                          str(lake / "up")}
    assert links[str(lake / "linked")] == str(far.resolve())
    why = folder.outside_problem(f"file:{lake}/linked/x.jpg", links, "data.outside_links")
    assert f"{lake / 'linked'} -> {far.resolve()}" in why and "data.outside_links=follow" in why
    assert folder.outside_problem(f"file:{lake}/Neutrophil/inside.jpg", links, "k") is None
    assert folder.outside_links("s3a://bucket/lake") == {}
