import io
import struct
import zlib

import numpy as np
import pytest
from conftest import jpeg_bytes, smear
from PIL import Image

from wbc_spark import images
from wbc_spark.ingest import IngestSettings, process_row
from wbc_spark.preprocessing import Preprocessing


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares a huge size: a decompression bomb's header."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(
            ">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


@pytest.mark.parametrize("data, reason", [
    (b"", "empty file"),
    (b"hello, not an image", "not an image"),
    (jpeg_bytes(smear())[:2000], "truncated"),
    (png_header_only(100_000, 100_000), "decompression bomb|absurd size"),
])
def test_bad_bytes_give_specific_reasons(data, reason):
    with pytest.raises(images.BadImage, match=reason):
        images.decode(data)


def test_tiny_image_refused():
    buf = io.BytesIO()
    Image.new("RGB", (1, 1)).save(buf, format="PNG")
    with pytest.raises(images.BadImage, match="too small 1x1"):
        images.decode(buf.getvalue())


def test_limits_are_configurable():
    data = jpeg_bytes(smear(256))
    with pytest.raises(images.BadImage, match="absurd size"):
        images.decode(data, max_pixels=256 * 255)
    assert images.decode(data).size == (256, 256)


def crops_of(side: int) -> IngestSettings:
    return IngestSettings(Preprocessing(side, 1.5, "none", "fit"))


def test_process_row_good_and_bad():
    settings = crops_of(64)
    good = process_row({"content": jpeg_bytes(smear()), "path": "file:/a.jpg"}, settings)
    assert good["reason"] is None
    assert len(good["crop"]) == 64 * 64 * 3
    assert good["width"] == 256 and good["cell_found"] is True
    assert good["sha256"] == images.sha256(jpeg_bytes(smear()))
    assert (good["crop_size"], good["context"], good["stain"], good["framing"]) == \
        (64, 1.5, "none", "fit")
    bad = process_row({"content": b"xx", "path": "file:/b.jpg"}, settings)
    assert bad["reason"].startswith("not an image") and bad["crop"] is None
    missing = process_row({"content": None, "path": "file:/c.jpg"}, settings)
    assert missing["reason"] == "file listed but not found"
    assert missing["framing"] == "fit"  # a bad row still says how its crop would be made


def test_process_row_crops_as_its_preprocessing_says():
    near_edge = jpeg_bytes(smear(256, (20, 20), radius=18))  # its box reaches outside
    crops = {}
    for framing in ("fit", "reflect"):
        pre = Preprocessing(64, 1.5, "none", framing)
        row = process_row({"content": near_edge, "path": "file:/a.jpg"}, IngestSettings(pre))
        crop, box, _ = pre.crop(near_edge)
        assert row["crop"] == crop.tobytes() and row["framing"] == framing
        assert row["crop_box"] == [box.left, box.top, box.side]
        crops[framing] = row["crop"]
    assert crops["fit"] != crops["reflect"]


def test_mask_is_thresholded_and_scored():
    img = smear(cell_xy=(128, 128), radius=30)
    yy, xx = np.mgrid[:256, :256]
    mask = ((xx - 128) ** 2 + (yy - 128) ** 2 < 42 ** 2).astype(np.uint8) * 255
    mask_img = Image.fromarray(np.where(mask > 0, 255, 40).astype(np.uint8))  # halo of 40
    buf = io.BytesIO()
    mask_img.save(buf, format="JPEG")
    row = process_row({"content": jpeg_bytes(img), "mask_content": buf.getvalue(),
                       "mask_path": "m.jpg"}, crops_of(64))
    assert row["reason"] is None
    stored = np.asarray(Image.open(io.BytesIO(row["mask"])).convert("L"))
    assert set(np.unique(stored)) == {0, 255}  # the halo is gone
    assert row["cell_iou"] > 0.5


def test_process_batch_emits_the_declared_schema():
    import pandas as pd

    from wbc_spark.ingest import DATASET_SCHEMA, PROCESSED_SCHEMA, process_batch

    frame = pd.DataFrame({"path": ["file:/a.jpg", "file:/b.jpg"], "image_id": ["a", "b"],
                          "content": [jpeg_bytes(smear()), b"bad"], "label": ["Basophil", None]})
    (out,) = list(process_batch(iter([frame]), crops_of(32)))
    assert list(out.columns) == PROCESSED_SCHEMA.fieldNames()
    assert PROCESSED_SCHEMA.fieldNames()[:-1] == DATASET_SCHEMA.fieldNames()
    assert out.reason.isna().tolist() == [True, False]
    assert str(out.width.dtype) == "Int32" and out.ingested_at.notna().all()


def test_mask_png_round_trip_is_exact():
    rng = np.random.default_rng(0)
    mask = rng.random((37, 53)) > 0.6
    data = images.encode_png(mask)
    assert Image.open(io.BytesIO(data)).mode == "1"
    back = images.decode_mask(data, (53, 37))
    assert back.dtype == bool and np.array_equal(back, mask)


def test_decode_turns_by_exif_and_converts_to_rgb():
    """EXIF orientation is applied in place (the turned size comes back) and every mode ends
    as 8-bit RGB, greyscale and palette images included."""
    wide = Image.fromarray(np.arange(40 * 60 * 3, dtype=np.uint8).reshape(40, 60, 3))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    buf = io.BytesIO()
    wide.save(buf, format="JPEG", exif=exif)
    turned = images.decode(buf.getvalue())
    assert turned.size == (40, 60) and turned.mode == "RGB"
    assert 0x0112 not in turned.getexif()
    for mode in ("L", "P", "RGBA"):
        buf = io.BytesIO()
        wide.convert(mode).save(buf, format="PNG")
        assert images.decode(buf.getvalue()).mode == "RGB"
