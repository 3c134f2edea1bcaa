"""A corpus of bad and unusual files through ingest and scoring (spark-submit): each is
quarantined with its reason or handled correctly, the good files beside them all arrive, and
no job fails."""

from __future__ import annotations

import io
import os
from urllib.parse import unquote_to_bytes

import numpy as np
import pandas as pd
import pytest
from conftest import jpeg_bytes, smear, spark_submit
from PIL import Image

pytestmark = [pytest.mark.slow, pytest.mark.spark]

# file name -> "ok" (classified like the same smear saved plainly) or a quarantine reason part
EXPECTED = {
    "empty.jpg": "empty file",
    "truncated.jpg": "truncated",
    "truncated.png": "truncated",
    "text.jpg": "not an image",
    "page.html": "not an image",
    "dot.png": "too small 1x1",
    "bomb.png": "decompression bomb",
    "huge.png": "decompression bomb",  # 400 M pixels: over PIL's limit before ours
    "grey.png": "ok",
    "sixteen_bit.png": "ok",
    "rgba.png": "ok",
    "palette.gif": "ok",
    "cmyk.jpg": "ok",
    "exif_rotated.jpg": "ok",
    "pages.tif": "ok",
    "animated.gif": "ok",
    "with spaces.jpg": "ok",
    # Java cannot list this name: quarantined (ingest) and an error row (scoring), not lost.
    "non-utf8-\udce9.jpg": "not valid UTF-8",
    # Symbolic links leading outside the lake (a file, and a folder with a file in it): not
    # read, recorded with the link and where it leads (data/score.outside_links=refuse).
    "outside_link.jpg": "symbolic link leading outside the lake",
    "far.jpg": "symbolic link leading outside the lake",
}


def make_corpus(root):
    root.mkdir(parents=True)
    cell = smear(seed=3)
    good = [smear(seed=s) for s in (11, 12, 13)]
    for i, img in enumerate(good):
        img.save(root / f"good{i}.jpg")
    (root / "empty.jpg").write_bytes(b"")
    (root / "truncated.jpg").write_bytes(jpeg_bytes(cell)[:2000])
    buf = io.BytesIO()
    cell.save(buf, format="PNG")
    (root / "truncated.png").write_bytes(buf.getvalue()[:3000])
    (root / "text.jpg").write_text("this is a text file named .jpg\n")
    (root / "page.html").write_text("<html><body><img src='x.jpg'></body></html>\n")
    Image.new("RGB", (1, 1)).save(root / "dot.png")
    # A decompression bomb: a small PNG declaring 30,000 x 30,000 pixels.
    Image.new("L", (30000, 30000)).save(root / "bomb.png", optimize=True)
    Image.new("L", (20000, 20000), 200).save(root / "huge.png")
    cell.convert("L").save(root / "grey.png")
    arr16 = (np.asarray(cell.convert("L"), np.uint16) * 257)
    Image.fromarray(arr16).save(root / "sixteen_bit.png")
    rgba = cell.convert("RGBA")
    rgba.putalpha(200)
    rgba.save(root / "rgba.png")
    cell.convert("P", palette=Image.ADAPTIVE).save(root / "palette.gif")
    cell.convert("CMYK").save(root / "cmyk.jpg")
    rotated = cell.rotate(90, expand=True)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    rotated.save(root / "exif_rotated.jpg", exif=exif)
    cell.copy().save(root / "pages.tif", save_all=True,
                     append_images=[good[0].copy(), good[1].copy()])
    cell.copy().save(root / "animated.gif", save_all=True, append_images=[good[0].quantize()],
              duration=100, loop=0)
    cell.save(root / "with spaces.jpg")
    cell.save(os.fsencode(root) + b"/non-utf8-\xe9.jpg")
    # A symbolic link loop inside the lake.
    os.symlink(root / "loop", root / "loop")
    elsewhere = root.parent / "elsewhere"
    elsewhere.mkdir()
    smear(seed=21).save(elsewhere / "secret.jpg")
    smear(seed=22).save(elsewhere / "far.jpg")
    os.symlink(elsewhere / "secret.jpg", root / "outside_link.jpg")
    os.symlink(elsewhere, root / "outside_dir")
    return root


def test_bad_input_corpus_through_ingest_and_scoring(tmp_path, tiny_artifact):
    lake = make_corpus(tmp_path / "lake")
    common = ["data.source=folder", f"data.lake={lake}", f"data.dataset={tmp_path / 'ds'}",
              f"data.quarantine={tmp_path / 'q'}", "data.crop_size=64"]
    ingest = spark_submit("ingest", *common)
    assert ingest.returncode == 0, (ingest.stdout + ingest.stderr)[-3000:]
    ds = pd.read_parquet(tmp_path / "ds")
    q = pd.read_parquet(tmp_path / "q")
    def base_name(uri):
        return os.fsdecode(unquote_to_bytes(os.path.basename(uri)))

    names_ok = set(ds.path.map(base_name))
    reasons = dict(zip(q.path.map(base_name), q.reason))
    for i in range(3):
        assert f"good{i}.jpg" in names_ok
    for name, expected in EXPECTED.items():
        shown = os.fsdecode(os.fsencode(name))
        matches = [n for n in names_ok | set(reasons) if n.startswith(shown[:8])]
        assert matches, f"{name}: neither ingested nor quarantined"
        if expected == "ok":
            assert shown in names_ok or matches[0] in names_ok, (name, reasons.get(shown))
        else:
            assert expected in reasons.get(shown, ""), (name, reasons.get(shown))

    # Every good or unusual-but-good image is classified; the bad ones are errors; nothing
    # stops the job.
    score = spark_submit("score", f"score.input={lake}", f"score.model={tiny_artifact}",
                         f"score.results={tmp_path / 'res'}")
    assert score.returncode == 0, (score.stdout + score.stderr)[-3000:]
    res = pd.read_parquet(tmp_path / "res")
    by_name = {base_name(p): r for p, r in zip(res.path, res.itertuples())}
    ok_names = [n for n, e in EXPECTED.items() if e == "ok"] + [f"good{i}.jpg" for i in
                                                                 range(3)]
    for name in ok_names:
        hits = [r for n, r in by_name.items() if n.startswith(name[:8])]
        assert hits and hits[0].predicted_class is not None, name
    for name_, expected in EXPECTED.items():
        if expected != "ok":
            hit = by_name.get(os.fsdecode(os.fsencode(name_)))
            assert hit is not None and hit.error, (name_, "no error row in the results")
    assert "not valid UTF-8" in by_name["non-utf8-\udce9.jpg"].error
    # The same smear saved as grey, 16-bit, palette and rotated-with-EXIF is upright and
    # recognisably the same: its located crop is the same cell.
    ingested = ds.set_index(ds.path.map(os.path.basename))
    base = np.frombuffer(ingested.loc["with spaces.jpg", "crop"], np.uint8).reshape(64, 64, 3)
    turned = np.frombuffer(ingested.loc["exif_rotated.jpg", "crop"], np.uint8).reshape(64, 64, 3)
    assert np.abs(base.astype(int) - turned.astype(int)).mean() < 12
