"""Per-slide HTML reports a hematologist reads: the differential, the flags, the cells.

``run_report`` reads the scoring tables of ``score.model``'s model (``score.results`` and its
per-class table) and writes, under ``report.output``:

- ``index.html``: every slide (and "every image" of the model) with its cell counts, review
  flags, shift alarm and corrected differential, each linking to its page;
- one page per slide: the corrected differential as a chart (bars with 95% intervals, the raw
  share of top predictions beside them) and as a table, the counts, the review flags and
  shift alarm, and a gallery of the flagged cells and a sample of each predicted class, each
  cell shown as the model is fed it and with its class activation map
  (``wbc_spark.explain``); unreadable files are listed with their reason.

Pages are self-contained (inline CSS and SVG, images as data URIs, no script, nothing
fetched), so they open offline and can be mailed. The galleries are rendered on the
executors (one pandas group per slide, ``applyInPandas``), which read the images from their
paths: ``report.output`` and the lake must be reachable from every executor (any local path in
local mode). Pages are written atomically; a re-run rewrites them and removes the pages of
slides that no longer have results.
"""

from __future__ import annotations

import base64
import hashlib
import html
import io
import json
import logging
import os
import re
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image
from pyspark.sql import DataFrame, SparkSession, Window
from pyspark.sql import functions as F
from pyspark.sql import types as T

from wbc_spark import artifact, explain, images, score, tables
from wbc_spark.config import Config
from wbc_spark.model.inference import frozen_pass, require_int8
from wbc_spark.preprocessing import Preprocessing
from wbc_spark.sources.folder import local_path

log = logging.getLogger(__name__)

ALL = "\x00all"  # the scope of every image the model scored (slide null in the tables)
PAGE_SCHEMA = T.StructType([T.StructField("_scope", T.StringType()),
                            T.StructField("file", T.StringType()),
                            T.StructField("cells_shown", T.IntegerType()),
                            T.StructField("not_shown", T.IntegerType())])
GALLERY_COLUMNS = ["path", "image_id", "sha256", "predicted_class", "confidence",
                   "review_reason", "error"]
SUMMARY_COLUMNS = [c for c in score.PER_CLASS_SCHEMA.fieldNames()
                   if c not in ("model_id", "updated_at")]
BAR, RAW = "#2b6cb0", "#c05621"

STYLE = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:24px;color:#1a202c}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:24px 0 8px}
.meta{color:#4a5568;font-size:13px}
.alarm{background:#fff5f5;border:2px solid #c53030;color:#9b2c2c;padding:10px;margin:12px 0;
font-weight:600}
.ok{background:#f0fff4;border:1px solid #68d391;color:#22543d;padding:8px;margin:12px 0}
table{border-collapse:collapse;font-size:14px}th,td{border-bottom:1px solid #e2e8f0;
padding:4px 10px;text-align:right}th:first-child,td:first-child{text-align:left}
.note{font-size:13px;color:#4a5568;max-width:900px}
.gallery{display:flex;flex-wrap:wrap;gap:10px}
.tile{border:1px solid #e2e8f0;padding:4px;font-size:12px;width:min-content}
.tile img{display:block}.pair{display:flex;gap:2px}
.flag{color:#9b2c2c}
"""


# --- pure rendering (no Spark) ----------------------------------------------------------------
def page_name(scope: str) -> str:
    """A file name for a scope: readable, safe, and distinct for distinct slide names."""
    if scope == ALL:
        return "all-images.html"
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", scope).strip("._")[:60] or "slide"
    return f"slide-{slug}-{hashlib.sha256(scope.encode()).hexdigest()[:8]}.html"


def scope_title(scope: str) -> str:
    return "Every image scored by this model" if scope == ALL else f"Slide {scope}"


def pct(x: float) -> str:
    return "n/a" if x is None or not np.isfinite(x) else f"{100 * x:.1f}%"


def differential_svg(summary: pd.DataFrame, width: int = 640) -> str:
    """Horizontal bars: the corrected share with its 95% interval (whisker), and the raw
    share of top predictions (a diamond)."""
    rows = summary.to_dict("records")
    left, right, row_h = 110, 20, 34
    plot = width - left - right
    height = 30 + row_h * len(rows) + 30
    x = lambda v: left + plot * min(max(float(v), 0.0), 1.0)  # noqa: E731
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'role="img" aria-label="differential chart" font-size="12">']
    for t in range(0, 101, 20):
        xt = x(t / 100)
        parts.append(f'<line x1="{xt:.1f}" y1="20" x2="{xt:.1f}" y2="{height - 25}" '
                     f'stroke="#e2e8f0"/><text x="{xt:.1f}" y="{height - 10}" '
                     f'text-anchor="middle" fill="#4a5568">{t}%</text>')
    for i, r in enumerate(rows):
        y = 25 + i * row_h
        parts.append(f'<text x="{left - 8}" y="{y + 15}" text-anchor="end">'
                     f'{html.escape(str(r["class"]))}</text>')
        share = r.get("corrected_fraction")
        if share is not None and np.isfinite(share):
            parts.append(f'<rect class="bar" x="{left}" y="{y + 4}" width="'
                         f'{x(share) - left:.1f}" height="16" fill="{BAR}"/>')
            lo, hi = x(r["corrected_low"]), x(r["corrected_high"])
            parts.append(f'<line x1="{lo:.1f}" y1="{y + 12}" x2="{hi:.1f}" y2="{y + 12}" '
                         f'stroke="#1a202c" stroke-width="2"/>'
                         f'<line x1="{lo:.1f}" y1="{y + 6}" x2="{lo:.1f}" y2="{y + 18}" '
                         f'stroke="#1a202c" stroke-width="2"/>'
                         f'<line x1="{hi:.1f}" y1="{y + 6}" x2="{hi:.1f}" y2="{y + 18}" '
                         f'stroke="#1a202c" stroke-width="2"/>')
        raw = r.get("fraction")
        if raw is not None and np.isfinite(raw):
            xr = x(raw)
            parts.append(f'<path d="M{xr:.1f} {y + 5} l6 7 l-6 7 l-6 -7 z" fill="white" '
                         f'stroke="{RAW}" stroke-width="2"/>')
    parts.append("</svg>")
    return "".join(parts)


def differential_table(summary: pd.DataFrame) -> str:
    head = ("<tr><th>class</th><th>corrected share</th><th>95% interval</th>"
            "<th>counted</th><th>top predictions</th><th>raw share</th>"
            "<th>raw 95% (sampling only)</th><th>flagged</th></tr>")
    body = "".join(
        f"<tr><td>{html.escape(str(r['class']))}</td><td>{pct(r['corrected_fraction'])}</td>"
        f"<td>{pct(r['corrected_low'])} - {pct(r['corrected_high'])}</td>"
        f"<td>{int(r['counted'])}</td><td>{int(r['count'])}</td><td>{pct(r['fraction'])}</td>"
        f"<td>{pct(r['ci_low'])} - {pct(r['ci_high'])}</td><td>{int(r['flagged'])}</td></tr>"
        for r in summary.to_dict("records"))
    return f'<table class="differential">{head}{body}</table>'


def alarm_block(first: dict, min_cells: int) -> str:
    cells, share = int(first["shift_cells"] or 0), first["shift_score"]
    if cells < min_cells:
        return (f'<div class="ok">Too few cells for the shift alarm ({cells}; it needs '
                f"{min_cells}): {pct(share)} of them lie beyond the training labs' range.</div>")
    if first["shift_alarm"]:
        return (f'<div class="alarm">SHIFT ALARM: {pct(share)} of {cells} cells lie beyond the '
                "range of the labs the model was trained on. The model and its corrected "
                "differential assume cells like those labs'; check these results against a "
                "manual count before use.</div>")
    return (f'<div class="ok">No shift alarm: {pct(share)} of {cells} cells beyond the '
            "training labs' range.</div>")


READ_ME = ("<p class=\"note\">Read the <b>corrected share</b> (bars) and its 95% interval "
           "(whiskers). It counts every classified cell in which a cell was found, corrects "
           "for the confusions the model made on its held-out test images of the lab these "
           "cells lie nearest to, and its interval holds both the sampling of this slide's "
           "cells and the uncertainty of that correction. The diamond is the raw share of top "
           "predictions: it carries every systematic confusion, and its interval covers cell "
           "sampling only. Flagged cells are counted apart (<i>flagged</i>) and shown below; "
           "those flagged <i>no_cell_found</i> are left out of the differential, the others "
           "stay in it, their errors being part of the correction. Under a shift alarm the "
           "model's measured confusion is not this lab's: neither estimate is to be trusted. "
           "For scale, a manual 100-cell count's own 95% interval for a 60% share is about "
           "&plusmn;10 points.</p>")


def tile_html(tile: dict, size: int) -> str:
    caption = html.escape(f"{tile['predicted_class']} {pct(tile['confidence'])}")
    reason = tile.get("review_reason")
    flag = f'<div class="flag">{html.escape(reason)}</div>' if reason else ""
    name = html.escape(str(tile["image_id"] or tile["path"]))
    if tile.get("crop"):
        pics = (f'<div class="pair"><img alt="cell" width="{size}" height="{size}" '
                f'src="{tile["crop"]}"><img alt="class activation map" width="{size}" '
                f'height="{size}" src="{tile["cam"]}"></div>')
    else:
        pics = f'<div class="flag">image not shown: {html.escape(tile["problem"])}</div>'
    return (f'<div class="tile" title="{html.escape(str(tile["path"]))}">{pics}'
            f"<div>{caption}</div>{flag}<div class=\"meta\">{name}</div></div>")


def slide_page(scope: str, summary: pd.DataFrame, tiles: list[dict], errors: list[dict],
               model_id: str, generated: str, size: int, min_cells: int = 10) -> str:
    """One slide's page (``summary``: its per-class rows; ``tiles``: rendered cells)."""
    first = summary.iloc[0].to_dict()
    title = html.escape(scope_title(scope))
    flagged = [t for t in tiles if t["kind"] == "flagged"]
    sample = [t for t in tiles if t["kind"] == "sample"]
    counts = (f"{int(first['classified'])} cells classified: {int(first['counted_total'])} "
              f"counted in the differential (corrected with the held-out confusion of "
              f"{html.escape(str(first.get('confusion_lab') or 'pooled'))}), "
              f"{int(first['excluded'])} left out (no cell found), "
              f"{int(summary['flagged'].sum())} flagged for review; "
              f"{int(first['errors'])} unreadable file(s).")
    parts = [f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">"
             f"<title>{title}: white-cell differential</title><style>{STYLE}</style></head>"
             f"<body><p class=\"meta\"><a href=\"index.html\">all slides</a></p>"
             f"<h1>{title}</h1><p class=\"meta\">model {html.escape(model_id)}; report "
             f"written {html.escape(generated)}</p>",
             alarm_block(first, min_cells), f"<p>{counts}</p>",
             "<h2>Differential</h2>", differential_svg(summary),
             f'<p class="note"><span style="color:{BAR}">&#9632;</span> corrected share with '
             f'95% interval &nbsp; <span style="color:{RAW}">&#9671;</span> raw share of top '
             "predictions</p>", differential_table(summary), READ_ME,
             f"<h2>Flagged for review ({len(flagged)} shown of "
             f"{int(summary['flagged'].sum())})</h2>",
             "<p class=\"note\">Each cell as the model is fed it (located, cropped, colour "
             "balanced), and its class activation map: where the evidence for the predicted "
             "class lies (red).</p>",
             '<div class="gallery" id="flagged">'
             + "".join(tile_html(t, size) for t in flagged) + "</div>"]
    for c in summary["class"]:
        mine = [t for t in sample if t["predicted_class"] == c]
        if mine:
            parts.append(f"<h2>{html.escape(str(c))}: a sample of unflagged cells</h2>"
                         f'<div class="gallery">'
                         + "".join(tile_html(t, size) for t in mine) + "</div>")
    if errors:
        parts.append(f"<h2>Unreadable files ({len(errors)} listed of {int(first['errors'])})"
                     "</h2><table><tr><th>file</th><th>reason</th></tr>"
                     + "".join(f"<tr><td>{html.escape(str(e['path']))}</td><td>"
                               f"{html.escape(str(e['error']))}</td></tr>" for e in errors)
                     + "</table>")
    parts.append("</body></html>")
    return "".join(parts)


def index_page(summary: pd.DataFrame, pages: dict[str, str], model_id: str, generated: str
               ) -> str:
    """The list of slides: counts, flags, alarm and corrected shares, each linking its page."""
    classes = list(dict.fromkeys(summary["class"]))
    head = ("<tr><th>slide</th><th>classified</th><th>counted</th><th>flagged</th>"
            "<th>unreadable</th><th>shift alarm</th>"
            + "".join(f"<th>{html.escape(c)}</th>" for c in classes) + "</tr>")
    rows = []
    for scope, part in summary.groupby("_scope", sort=True):
        part = part.set_index("class").loc[classes].reset_index()
        first = part.iloc[0]
        name = "every image" if scope == ALL else str(scope)
        link = (f'<a href="{html.escape(pages[scope])}">{html.escape(name)}</a>'
                if scope in pages else html.escape(name))
        alarm = (f'<span class="flag">ALARM ({pct(first["shift_score"])})</span>'
                 if first["shift_alarm"] else "no")
        shares = "".join(
            f"<td>{pct(r['corrected_fraction'])} <span class=\"meta\">"
            f"[{pct(r['corrected_low'])}, {pct(r['corrected_high'])}]</span></td>"
            for r in part.to_dict("records"))
        rows.append(f"<tr><td>{link}</td><td>{int(first['classified'])}</td>"
                    f"<td>{int(first['counted_total'])}</td><td>{int(part['flagged'].sum())}"
                    f"</td><td>{int(first['errors'])}</td><td>{alarm}</td>{shares}</tr>")
    return (f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>"
            f"White-cell differentials</title><style>{STYLE}</style></head><body>"
            f"<h1>White-cell differentials</h1><p class=\"meta\">model {html.escape(model_id)}"
            f"; report written {html.escape(generated)}; {len(pages)} pages</p>"
            f"<p class=\"note\">Corrected shares with their 95% intervals; open a slide for "
            f"its chart, counts, flags and cells.</p><table class=\"slides\">{head}"
            + "".join(rows) + "</table>" + READ_ME + "</body></html>")


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def data_uri(rgb: np.ndarray, size: int) -> str:
    img = Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8)).resize((size, size),
                                                                       Image.BILINEAR)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=88)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def render_cells(rows: pd.DataFrame, model, meta: dict, size: int, precision: str = "auto"
                 ) -> list[dict]:
    """Each gallery row with its crop and class activation map as data URIs, or the reason it
    cannot be shown (file gone, changed since scoring, unreadable)."""
    pre = Preprocessing.from_artifact(meta)
    tiles, crops = [], []
    for r in rows.to_dict("records"):
        tile = {**r, "crop": None, "cam": None, "problem": None}
        try:
            data = Path(local_path(str(r["path"]))).read_bytes()
            if r.get("sha256") and images.sha256(data) != r["sha256"]:
                raise images.BadImage("the file changed since it was scored")
            crop, _, _ = pre.crop(data)
            crops.append(crop)
        except (OSError, images.BadImage) as exc:
            tile["problem"] = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        tiles.append(tile)
    if crops:
        with torch.inference_mode():
            # As scoring computed them, so the map explains the prediction in the table.
            frozen = frozen_pass(model, meta, torch.from_numpy(np.stack(crops)), precision)
        maps, _ = explain.class_activation_maps(model, frozen.float())
        up = explain.upsample(maps, pre.crop_size)
        shown = iter(range(len(crops)))
        for tile in tiles:
            if tile["problem"] is None:
                i = next(shown)
                tile["crop"] = data_uri(crops[i], size)
                tile["cam"] = data_uri(explain.heat_overlay(crops[i], up[i]), size)
    return tiles


# --- the Spark job ----------------------------------------------------------------------------
def summary_frame(text: str, classes: list[str]) -> pd.DataFrame:
    """A scope's per-class rows from their JSON, in the model's class order (NaN, which JSON
    carries as a string, back to a number)."""
    frame = pd.DataFrame(json.loads(text)).set_index("class").reindex(classes).reset_index()
    for name in frame.columns:
        if name not in ("class", "slide", "shift_alarm", "confusion_lab"):
            frame[name] = pd.to_numeric(frame[name], errors="coerce")
    return frame


def gallery_rows(results: DataFrame, settings) -> DataFrame:
    """Per scope: the least confident flagged cells, a sample of each predicted class's
    unflagged cells (by sha256: stable, unrelated to the class) and the unreadable files."""
    scoped = score.with_scopes(results, "_scope", ALL)
    rank = F.row_number()
    flagged = (scoped.where(F.col("needs_review") & F.col("predicted_class").isNotNull())
               .withColumn("_rank", rank.over(Window.partitionBy("_scope")
                                              .orderBy("confidence", "sha256")))
               .where(F.col("_rank") <= settings.flagged).withColumn("_kind", F.lit("flagged")))
    sample = (scoped.where(~F.col("needs_review") & F.col("predicted_class").isNotNull())
              .withColumn("_rank", rank.over(Window.partitionBy("_scope", "predicted_class")
                                             .orderBy("sha256", "path")))
              .where(F.col("_rank") <= settings.per_class)
              .withColumn("_kind", F.lit("sample")))
    errors = (scoped.where(F.col("error").isNotNull())
              .withColumn("_rank", rank.over(Window.partitionBy("_scope").orderBy("path")))
              .where(F.col("_rank") <= settings.errors).withColumn("_kind", F.lit("error")))
    cols = ["_scope", "_kind", "_rank", *GALLERY_COLUMNS]
    return flagged.select(cols).unionByName(sample.select(cols)).unionByName(errors.select(cols))


def make_renderer(model_file: str, out_dir: str, classes: list[str], model_id: str,
                  generated: str, size: int, precision: str, min_cells: int):
    """The ``applyInPandas`` body: one scope's rows (its per-class summary as JSON, its
    gallery rows) -> its page, written atomically."""

    def render(pdf: pd.DataFrame) -> pd.DataFrame:
        from pyspark import SparkFiles

        scope = pdf["_scope"].iloc[0]
        summary = summary_frame(pdf["_summary"].iloc[0], classes)
        gallery = pdf[pdf["_kind"].notna()].sort_values(["_kind", "_rank"])
        cells = gallery[gallery["_kind"].isin(["flagged", "sample"])]
        model, meta = score.load_model_once(SparkFiles.get(model_file))
        tiles = render_cells(cells[GALLERY_COLUMNS + ["_kind"]].rename(
            columns={"_kind": "kind"}), model, meta, size, precision)
        errors = gallery[gallery["_kind"] == "error"][["path", "error"]].to_dict("records")
        name = page_name(scope)
        write_atomic(Path(out_dir) / name, slide_page(scope, summary, tiles, errors, model_id,
                                                      generated, size, min_cells))
        return pd.DataFrame({"_scope": [scope], "file": [name],
                             "cells_shown": [sum(t["crop"] is not None for t in tiles)],
                             "not_shown": [sum(t["crop"] is None for t in tiles)]})

    return render


def run_report(spark: SparkSession, config: Config) -> dict:
    """Write the index and one page per slide for ``score.model``'s results."""
    s, r = config.score, config.report
    model_path = str(Path(s.model).resolve())
    _, meta = artifact.load(model_path, expected_classes=list(config.classes))
    if s.precision == "int8":  # refused here, not in every Python worker
        require_int8(meta, model_path)
    model_id, classes = meta["model_id"], list(meta["classes"])
    schema = score.results_schema(classes)
    stored = tables.read(spark, s.results, T.StructType(
        schema.fields + [T.StructField("run", T.StringType())]))
    results = score.latest(stored).where(F.col("model_id") == model_id)
    summary = (tables.read(spark, f"{s.results}_per_class", score.PER_CLASS_SCHEMA)
               .where(F.col("model_id") == model_id)
               .withColumn("_scope", F.coalesce(F.col("slide"), F.lit(ALL))))
    summary_pd = summary.drop("updated_at").toPandas()
    if summary_pd.empty:
        raise ValueError(f"{s.results}_per_class: no results of model {model_id} (from "
                         f"{model_path}); run jobs/score.py with this model first")
    out = Path(r.output).resolve()
    out.mkdir(parents=True, exist_ok=True)
    generated = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    spark.sparkContext.addFile(model_path)
    per_scope = (summary.groupBy("_scope")
                 .agg(F.to_json(F.collect_list(F.struct(*SUMMARY_COLUMNS))).alias("_summary")))
    gallery = gallery_rows(results, r)
    render = make_renderer(Path(model_path).name, str(out), classes, model_id, generated,
                           r.thumbnail, s.precision, config.review.alarm_min_cells)
    pages = (per_scope.join(gallery, "_scope", "left")
             .groupBy("_scope").applyInPandas(render, PAGE_SCHEMA).toPandas())
    page_of = dict(zip(pages["_scope"], pages["file"]))
    write_atomic(out / "index.html", index_page(summary_pd, page_of, model_id, generated))
    # Pages of slides that no longer have results of this model go.
    current = set(page_of.values())
    for old in [*out.glob("slide-*.html"), *out.glob("all-images.html")]:
        if old.name not in current:
            old.unlink()
    log.info("report: %d pages, %d cells shown, %d not shown", len(pages),
             int(pages["cells_shown"].sum()), int(pages["not_shown"].sum()))
    return {"index": str(out / "index.html"), "pages": len(pages), "model_id": model_id,
            "cells_shown": int(pages["cells_shown"].sum()),
            "not_shown": int(pages["not_shown"].sum()),
            "alarms": int(summary_pd.drop_duplicates("_scope")["shift_alarm"].sum())}
