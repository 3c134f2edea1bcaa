"""Per-slide reports (wbc_spark/report.py, jobs/report.py): the pages, the job through
spark-submit, and the page as a real browser (headless Chromium) renders it."""

from __future__ import annotations

import re
import shutil
import subprocess

import numpy as np
import pandas as pd
import pytest
from conftest import smear, spark_submit
from PIL import Image

from wbc_spark.report import ALL, index_page, page_name, slide_page, summary_frame

CLASSES = ["Neutrophil", "Lymphocyte", "Monocyte", "Eosinophil", "Basophil"]


def summary(scope: str = "s1", alarm: bool = False) -> pd.DataFrame:
    shares = [0.6, 0.3, 0.06, 0.03, 0.01]
    return pd.DataFrame([{
        "_scope": scope, "slide": None if scope == ALL else scope, "class": c,
        "corrected_fraction": s, "corrected_low": max(0.0, s - 0.05),
        "corrected_high": s + 0.05, "counted": int(200 * s), "counted_total": 200,
        "excluded": 3, "count": int(200 * s) + 1, "classified": 203, "fraction": s + 0.01,
        "ci_low": s - 0.06, "ci_high": s + 0.07, "errors": 1, "flagged": 2,
        "shift_cells": 203, "shift_score": 0.4 if alarm else 0.05, "shift_alarm": alarm}
        for c, s in zip(CLASSES, shares)])


def test_page_names_are_safe_and_distinct():
    names = {page_name(s) for s in ("a/b", "a_b", "../../etc", "<x>", ALL)}
    assert len(names) == 5
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+\.html", n) for n in names)
    assert not any(n.startswith(".") for n in names)


def test_slide_page_shows_the_differential_escapes_names_and_fetches_nothing():
    scope = '<script>alert("x")</script>'
    page = slide_page(scope, summary(scope, alarm=True), [], [{"path": "file:/l/b.jpg",
                      "error": "corrupt or truncated"}], "m1", "now", 64)
    assert "<script>" not in page and "&lt;script&gt;" in page
    assert "SHIFT ALARM: 40.0% of 203 cells" in page
    assert "60.0%" in page and "55.0% - 65.0%" in page  # corrected share and its interval
    assert page.count('class="bar"') == 5 and "corrupt or truncated" in page
    assert not re.search(r'(src|href)="(https?:)?//', page)


def test_summary_from_json_keeps_names_and_reads_nan():
    rows = summary("s1").drop(columns="_scope").assign(confusion_lab="KRD-WBC")
    rows.loc[0, "corrected_fraction"] = float("nan")
    text = rows.to_json(orient="records").replace("null", '"NaN"')  # as Spark writes NaN
    frame = summary_frame(text, CLASSES[::-1])
    assert list(frame["class"]) == CLASSES[::-1]  # the model's class order
    assert (frame.confusion_lab == "KRD-WBC").all() and frame.slide.eq("s1").all()
    assert frame.corrected_fraction.isna().sum() == 1 and frame.counted.dtype.kind in "if"
    page = slide_page("s1", frame, [], [], "m1", "now", 64)
    assert "held-out confusion of KRD-WBC" in page


def test_index_links_every_page_and_flags_alarms():
    both = pd.concat([summary("s1"), summary("s2", alarm=True), summary(ALL)])
    pages = {"s1": page_name("s1"), "s2": page_name("s2"), ALL: page_name(ALL)}
    page = index_page(both, pages, "m1", "now")
    for name in pages.values():
        assert f'href="{name}"' in page
    assert page.count("ALARM (40.0%)") == 1 and "every image" in page


def browser() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return name
    pytest.fail("no Chromium: `make test` installs it (make browser; Debian: apt-get install "
                "chromium)")


@pytest.mark.slow
@pytest.mark.spark
def test_report_job_writes_pages_a_browser_renders(tmp_path, tiny_artifact):
    lake = tmp_path / "lake"
    for slide, n in (("s1", 4), ("ward 2/s2", 3)):
        (lake / slide).mkdir(parents=True)
        for i in range(n):
            smear(seed=40 + 7 * i + n, radius=22 + 3 * i).save(lake / slide / f"c{i}.jpg")
    (lake / "s1" / "broken.jpg").write_bytes(b"\xff\xd8 not really")
    common = [f"score.input={lake}", f"score.model={tiny_artifact}",
              f"score.results={tmp_path / 'res'}", "review.cell_threshold=1e9"]
    scored = spark_submit("score", *common)
    assert scored.returncode == 0, scored.stderr[-3000:]
    # Cells that count: the corrected differential is a distribution with its intervals.
    per = pd.read_parquet(tmp_path / "res_per_class")
    assert (per.counted_total > 0).all() and per.corrected_fraction.notna().all()
    assert np.allclose(per.groupby(per.slide.fillna("*")).corrected_fraction.sum(), 1.0)
    assert ((per.corrected_low <= per.corrected_fraction)
            & (per.corrected_fraction <= per.corrected_high)).all()

    out = tmp_path / "report"
    proc = spark_submit("report", *common, f"report.output={out}", "report.per_class=2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"index: {out / 'index.html'}" in proc.stdout
    shown = re.search(r"report: model \w+, 3 pages, (\d+) cells shown \(0 could not be shown\)",
                      proc.stdout)
    assert shown and int(shown.group(1)) >= 7, proc.stdout[-500:]
    pages = sorted(p.name for p in out.glob("*.html"))
    assert pages == sorted(["index.html", "all-images.html", page_name("s1"),
                            page_name("ward 2/s2")])
    s1 = (out / page_name("s1")).read_text()
    assert s1.count("data:image/jpeg;base64,") == 2 * 4  # crop and map for each cell
    assert "not really" not in s1 and "broken.jpg" in s1  # listed as unreadable
    assert "held-out confusion of pooled" in s1  # the toy model has no per-lab confusion
    # Re-running rewrites the same pages; a slide without results loses its page.
    (out / page_name("gone")).write_text("old")
    again = spark_submit("report", *common, f"report.output={out}", "report.per_class=2")
    assert again.returncode == 0, again.stderr[-3000:]
    assert sorted(p.name for p in out.glob("*.html")) == pages

    # A real browser: the page's text after rendering, and a screenshot.
    chrome = browser()
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
             "--allow-file-access-from-files"]
    dom = subprocess.run([chrome, *flags, "--dump-dom", (out / page_name("s1")).as_uri()],
                         capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    text = dom.stdout
    assert "Slide s1" in text and "Differential" in text
    assert all(c in text for c in CLASSES)
    assert len(re.findall(r"<img ", text)) == 8 and 'class="bar"' in text
    shot = tmp_path / "page.png"
    run = subprocess.run([chrome, *flags, "--hide-scrollbars", "--window-size=1100,1400",
                          f"--screenshot={shot}", (out / page_name("s1")).as_uri()],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and shot.is_file(), run.stderr[-2000:]
    pixels = np.asarray(Image.open(shot).convert("RGB")).reshape(-1, 3).astype(int)
    bar = np.abs(pixels - (0x2B, 0x6C, 0xB0)).sum(1) < 30     # the chart's bars rendered
    stained = (pixels[:, 2] - pixels[:, 1] > 40) & (pixels[:, 0] - pixels[:, 1] > 20)  # smears
    assert bar.sum() > 500 and stained.sum() > 500, (bar.sum(), stained.sum())
    index = subprocess.run([chrome, *flags, "--dump-dom", (out / "index.html").as_uri()],
                           capture_output=True, text=True, timeout=120).stdout
    assert "every image" in index and "ward 2/s2" in index
