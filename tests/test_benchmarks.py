"""The arithmetic the benchmarks print (their timings are measured by running them)."""

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _benchmark(name: str):
    """A script of benchmarks/ loaded as a module (benchmarks/ is no package)."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def speed():
    return _benchmark("speed")


def test_per_run_split_recovers_fixed_cost_and_marginal_rate(speed):
    fixed, marginal = 17.0, 26.0

    def run(n):  # (images, images/s) of a run that costs fixed + n / marginal seconds
        return n, n / (fixed + n / marginal)

    got_fixed, got_marginal = speed.per_run_split(run(2000), run(100))
    assert got_fixed == pytest.approx(fixed)
    assert got_marginal == pytest.approx(marginal)


def test_per_run_split_refuses_runs_that_cannot_be_split(speed):
    with pytest.raises(ValueError, match="larger run must take longer"):
        speed.per_run_split((100, 10.0), (2000, 20.0))
    with pytest.raises(ValueError, match="larger run must take longer"):
        speed.per_run_split((2000, 400.0), (100, 10.0))  # 5 s against 10 s


def test_the_lowpass_lever_removes_fine_detail_and_keeps_the_coarse():
    levers = _benchmark("crosslab_levers")
    yy, xx = np.mgrid[:64, :64]
    checker = np.repeat((((yy + xx) % 2) * 255).astype(np.uint8)[..., None], 3, axis=2)
    ramp = np.repeat((xx * 4).astype(np.uint8)[..., None], 3, axis=2)
    out = levers.low_passed(checker)
    assert out.shape == checker.shape and out.dtype == np.uint8
    assert out.std() < 3 and abs(float(out.mean()) - 127.5) < 3  # period-2 detail: grey
    assert np.abs(levers.low_passed(ramp).astype(int) - ramp).max() <= 6  # a slope stays


def test_the_random_convolution_levers_keep_each_channels_level_and_the_shared_one_polarity():
    levers = _benchmark("crosslab_levers")
    yy, xx = np.mgrid[:64, :64]
    disc = (yy - 32) ** 2 + (xx - 32) ** 2 < 15 ** 2  # a dark purple cell on a light field
    image = np.where(disc[..., None], [90, 40, 140], [225, 210, 220]).astype(np.uint8)
    grey_in = image.astype(float).mean(axis=2)
    for seed in range(20):
        for shared in (False, True):
            out = levers.random_convolution(image, np.random.default_rng(seed), shared=shared)
            assert out.shape == image.shape and out.dtype == np.uint8
            # Each channel is brought back to the view's own mean (clipping aside).
            level = np.abs(out.reshape(-1, 3).mean(0) - image.reshape(-1, 3).mean(0))
            assert level.max() < 25
            if shared:  # the cell stays darker than its field, its colour purple
                grey_out = out.astype(float).mean(axis=2)
                assert np.corrcoef(grey_in.ravel(), grey_out.ravel())[0, 1] > 0
                cell = out[disc].astype(float).mean(0)
                assert cell[2] > cell[1] and cell[0] > cell[1]


def test_adaptation_draws_are_summarised_with_their_interval_and_recalls():
    crosslab = _benchmark("crosslab")
    classes = ["A", "B"]
    # Three draws' reports on the same four cells, two of each class.
    y = np.array([0, 0, 1, 1])
    probs = [np.array([[.9, .1], [.8, .2], [.3, .7], [.4, .6]]),    # all right
             np.array([[.9, .1], [.2, .8], [.3, .7], [.4, .6]]),    # one A missed
             np.array([[.9, .1], [.8, .2], [.6, .4], [.7, .3]])]    # both B missed
    reps = [crosslab.evaluate(y, p, classes) for p in probs]
    s = crosslab.draws_summary(reps, classes)
    mean, lo, hi = s["balanced_accuracy"]
    assert mean == pytest.approx((1.0 + 0.75 + 0.5) / 3)
    assert lo < mean < hi
    assert s["recall"] == pytest.approx({"A": (1 + .5 + 1) / 3, "B": (1 + 1 + 0) / 3})
    assert len(s["draws"]) == 3
    text = crosslab.draws_line("adaptation: X + 5/class of Y", "Y", reps, classes)
    assert text.startswith("adaptation: X + 5/class of Y: balanced accuracy on the rest of Y "
                           f"{mean:.3f} [{lo:.3f}, {hi:.3f}] over 3 draws")
    assert text.endswith("recall A 0.83  B 0.67")


def test_the_align_lever_adds_an_aligned_variant_beside_the_plain_training(monkeypatch):
    import torch

    from wbc_spark.evaluation import crossval

    levers = _benchmark("crosslab_levers")
    calls = []

    def fake_train_and_test(model, view_feats, eval_feats, labels, tr, va, te, recipe,
                            num_classes, run=0, labs=None, inspect=None, align=False,
                            keys=None):
        calls.append((align, list(labs[te]), list(keys[te])))
        return {"original": np.full((len(te), 2), len(calls))}, None, None

    for name in ("crops_of", "augment"):
        monkeypatch.setattr(crossval, name, getattr(crossval, name))
    monkeypatch.setattr(crossval, "train_and_test", fake_train_and_test)
    levers.install({"align"}, 0.8)
    labs = np.array(["A"] * 6 + ["B"] * 4)
    feats = torch.ones(10, 2, 1, 1)
    feats[6:] = 5.0  # lab B's features sit far above lab A's
    feats[:6:2] = 0.0
    keys = np.array([f"k{i}" for i in range(10)])
    probs, _, _ = crossval.train_and_test(None, feats[None], {"original": feats},
                                          np.zeros(10, int), np.arange(4), np.arange(4, 6),
                                          np.arange(6, 10), None, 2, labs=labs,
                                          align=True, keys=keys)
    assert set(probs) == {"original", "aligned"}
    assert (probs["original"] == 1).all() and (probs["aligned"] == 2).all()
    # The plain model is trained without alignment whatever train.align says, the variant
    # with it; both get the rows' labs and keys.
    (plain_align, plain_labs, plain_keys), (aligned_align, aligned_labs, aligned_keys) = calls
    assert (plain_align, aligned_align) == (False, True)
    assert plain_labs == aligned_labs == ["B"] * 4
    assert plain_keys == aligned_keys == [f"k{i}" for i in range(6, 10)]


def test_the_gpu_benchmark_times_the_scoring_path_s_arithmetic(tiny_artifact, tmp_path,
                                                               monkeypatch):
    """benchmarks/gpu_scoring.py times its own forward pass on the GPU: on the CPU in fp32 it
    must give the scoring path's logits and pooled features, and its crops the job's."""
    import torch

    from conftest import jpeg_bytes, smear
    from wbc_spark import artifact, images, review
    from wbc_spark.preprocessing import Preprocessing
    from wbc_spark.transforms import cell_crop

    bench = _benchmark("gpu_scoring")
    model, meta = artifact.load(tiny_artifact)
    pre = Preprocessing.from_artifact(meta)
    files = []
    for seed, xy in enumerate([(100, 120), (150, 140), (128, 90)]):
        files.append(tmp_path / f"{seed}.jpg")
        files[-1].write_bytes(jpeg_bytes(smear(cell_xy=xy, seed=seed)))
    data = bench.Crops(files, pre)
    crops = torch.stack([data[i] for i in range(len(files))])
    for i, f in enumerate(files):
        want, _, _ = cell_crop(images.decode(f.read_bytes()), pre.crop_size,
                               context=pre.context, stain=pre.stain, framing=pre.framing)
        assert np.array_equal(crops[i].numpy(), want)

    logits, pooled = bench.network(model, meta, crops, "cpu", "fp32")
    frozen = model.embed_frozen(crops)
    want_logits, _, want_pooled = review.embed(model, frozen)
    assert np.allclose(logits, want_logits, atol=1e-4)
    assert np.allclose(pooled, want_pooled, atol=1e-4)
    bf16_logits, _ = bench.network(model, meta, crops, "cpu", "bf16")
    assert not np.array_equal(bf16_logits, logits)  # the bf16 path really runs in bf16

    # Step 5 runs the job's UDF body on the device and on the CPU; "cpu:0" (let through
    # as a device, as score.device never is) takes the device's path here, and must agree
    # with the CPU's.
    from wbc_spark import score

    monkeypatch.setattr(score, "resolve_device", lambda device, gpu=None: device)
    (tmp_path / "junk.jpg").write_bytes(b"not an image")
    udf = bench.udf_body(str(tiny_artifact), files + [tmp_path / "junk.jpg"], "cpu:0", meta)
    assert udf["images"] == 4 and udf["cpu:0_images_per_s"] > 0 and udf["cpu_images_per_s"] > 0
    assert udf["compared"] == 3 and udf["agreement"] == 1.0 and udf["same_flags"] == 1.0
    assert udf["max_probability_difference"] < 1e-4

    # --udf-only: step 5 alone on the device, its start and end for the processes' sum.
    out = tmp_path / "udf.json"
    monkeypatch.setattr(sys, "argv", ["gpu_scoring.py", "--model", str(tiny_artifact),
                                      "--images", str(tmp_path), "--device", "cpu", "--n", "1",
                                      "--udf", "5", "--udf-only", "--json", str(out)])
    assert bench.main() == 0
    only = json.loads(out.read_text())
    assert "network" not in only and only["udf"]["images"] == 5  # the 4 files, repeated
    assert only["udf"]["cpu_ended_at"] > only["udf"]["cpu_started_at"]
    assert "agreement" not in only["udf"]


def test_adapt_route_draws_k_labelled_cells_per_class_and_keeps_the_rest_apart(tmp_path):
    from wbc_spark.config import CLASSES

    adapt = _benchmark("adapt_route")
    lab = tmp_path / "lab"
    for c, cls in enumerate(CLASSES):
        (lab / cls).mkdir(parents=True)
        for i in range(6 + c):
            (lab / cls / f"{cls[:2]}_{i}.jpg").write_bytes(bytes([c, i]))
        (lab / cls / ".hidden").write_bytes(b"x")
    catalog = adapt.folder_catalog(lab)
    assert len(catalog) == sum(6 + c for c in range(len(CLASSES)))
    picked = []
    for draw in (0, 0, 1):
        work = tmp_path / f"w{len(picked)}"
        rest = adapt.draw_labelled(catalog, 3, draw, work)
        assert rest == {cls: 3 + c for c, cls in enumerate(CLASSES)}
        labelled = {cls: sorted(p.name for p in (work / "labelled" / cls).iterdir())
                    for cls in CLASSES}
        for cls in CLASSES:
            others = {p.name for p in (work / "rest" / cls).iterdir()}
            assert len(labelled[cls]) == 3 and not others & set(labelled[cls])
            assert others | set(labelled[cls]) == {p.name for p in (lab / cls).glob("*.jpg")}
        picked.append(labelled)
    assert picked[0] == picked[1] != picked[2]  # seeded by the draw
    # A class with fewer than 2k images gives half of them; one image is refused.
    rest = adapt.draw_labelled(catalog, 4, 0, tmp_path / "half")
    assert [rest[cls] for cls in CLASSES] == [6 - 3, 7 - 3, 8 - 4, 9 - 4, 10 - 4]
    with pytest.raises(SystemExit, match="need 2 or more"):
        adapt.draw_labelled(catalog[(catalog.label != CLASSES[0])
                                    | catalog.path.str.endswith("_0.jpg")], 3, 0, tmp_path / "one")


def test_adapt_route_draws_a_duplicate_pair_as_one_and_keeps_it_together(tmp_path):
    """``--reverse``: KRD-WBC's label file gives the new lab; a known duplicate pair shares a
    group, and both images land on the same side, whatever the draw."""
    import pandas as pd

    from wbc_spark.config import CLASSES

    adapt = _benchmark("adapt_route")
    rows = []
    for c, cls in enumerate(CLASSES):
        for i in range(8):
            path = tmp_path / "lake" / f"image{c * 10 + i}.jpg"
            path.parent.mkdir(exist_ok=True)
            path.write_bytes(bytes([c, i]))
            rows.append((str(path), cls, "dup" if (c, i) in ((0, 0), (0, 1)) else str(path)))
    catalog = pd.DataFrame(rows, columns=["path", "label", "group"])
    sides = set()
    for draw in range(8):
        work = tmp_path / f"w{draw}"
        rest = adapt.draw_labelled(catalog, 3, draw, work)
        labelled = {p.name for p in (work / "labelled" / CLASSES[0]).iterdir()}
        pair = {"image0.jpg", "image1.jpg"}
        assert pair <= labelled or not pair & labelled
        assert len(labelled) == (4 if pair <= labelled else 3) == 8 - rest[CLASSES[0]]
        sides.add(pair <= labelled)
    assert sides == {True, False}  # eight draws put the pair on both sides


def test_adapt_route_trains_with_the_settings_of_readmes_adapting_command():
    """The route benchmark measures README's command: the same settings, apart from the
    views and the output folder it varies itself."""
    import re
    import shlex

    readme = (BENCHMARKS.parent / "README.md").read_text()
    section = readme.split("### Adapting to your lab", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    command = re.search(r"deploy/submit\.sh train_distributed(.*?)#", block.replace("\\\n", " "),
                        re.S).group(1)
    settings = set(shlex.split(command))
    adapting = set(_benchmark("adapt_route").ADAPTING)
    assert adapting <= settings, adapting - settings
    rest = {s.split("=", 1)[0] for s in settings - adapting}
    assert rest == {"model.test_views", "train.output"}


def test_adapt_route_refuses_a_lever_without_a_tag(capsys):
    """Overrides without ``--tag`` would write over the models of README's own settings."""
    with pytest.raises(SystemExit):
        _benchmark("adapt_route").main(["--k", "25", "train.epochs=20"])
    assert "overrides need a --tag" in capsys.readouterr().err


def test_the_differential_benchmark_draws_slides_from_a_scored_lab(tmp_path, tiny_artifact):
    """``--results``/``--models``: the truth is each cell's folder, unreadable cells, other
    folders and other models' rows are left out, and each table is corrected with its
    model's confusion for the lab most of its cells lie nearest to."""
    import pandas as pd
    import torch

    from wbc_spark.config import CLASSES
    from wbc_spark.differential import Confusion

    bench = _benchmark("differential")
    own = np.zeros((5, 6), int)
    own[np.arange(5), np.arange(5)] = 9
    own[np.arange(5), (np.arange(5) + 1) % 5] = 1
    confusion = Confusion(tuple(CLASSES), own * 10, {"ours": own})
    model = tmp_path / "model.pt"
    payload = torch.load(tiny_artifact, weights_only=True)
    torch.save({**payload, "confusion": confusion.to_state()}, model)
    mid = payload["model_id"]
    rng = np.random.default_rng(0)
    rows = []
    for i in range(300):
        truth = CLASSES[i % 5]
        called = truth if rng.random() < 0.9 else CLASSES[(i + 1) % 5]
        rows.append({"path": f"file:/lab/{truth}/c{i}.jpg", "predicted_class": called,
                     "review_reason": "low_confidence" if i % 7 == 0 else "",
                     "nearest_lab": "ours" if i % 10 else "KRD-WBC", "error": None,
                     "model_id": mid})
    rows.append({"path": "file:/lab/Platelet/p.jpg", "predicted_class": "Basophil",
                 "review_reason": "", "nearest_lab": "ours", "error": None, "model_id": mid})
    rows.append({"path": "file:/lab/Monocyte/bad.jpg", "predicted_class": None,
                 "review_reason": "unreadable", "nearest_lab": None, "error": "not an image",
                 "model_id": mid})
    rows += [{**rows[0], "model_id": "another model"}] * 3
    table = tmp_path / "results" / "run=1"
    table.mkdir(parents=True)
    pd.DataFrame(rows).to_parquet(table / "part-0.parquet")
    pool, lab, left = bench.scored_pool(tmp_path / "results", list(CLASSES), mid)
    assert (lab, left, len(pool.labels)) == ("ours", 2, 300)
    assert np.array_equal(pool.labels, np.arange(300) % 5)
    assert pool.counts.all()  # low_confidence cells stay in the differential
    bare = tmp_path / "bare" / "run=1"
    bare.mkdir(parents=True)
    pd.DataFrame(rows).assign(nearest_lab=None).to_parquet(bare / "part-0.parquet")
    assert bench.scored_pool(tmp_path / "bare", list(CLASSES), mid)[1] is None  # pooled
    with pytest.raises(SystemExit, match="no cell scored by model nobody"):
        bench.scored_pool(tmp_path / "results", list(CLASSES), "nobody")

    classes, settings = bench.scored_settings([str(tmp_path / "results")], [str(model)], False)
    [(kind, _, [(_, used)])] = settings
    assert classes == list(CLASSES) and kind == "in-lab"
    assert np.allclose(used.counts, confusion.for_lab("ours").counts)
    with pytest.raises(SystemExit, match="1 --results tables for 2 --models"):
        bench.scored_settings([str(tmp_path / "results")], [str(model)] * 2, False)
    with pytest.raises(SystemExit):  # argparse's error: models without their tables
        bench.main(["--models", str(model)])
    out = tmp_path / "d.json"
    assert bench.main(["--results", str(tmp_path / "results"), "--models", str(model),
                       "--slides", "4", "--sizes", "50", "--json", str(out)]) == 0
    res = json.loads(out.read_text())["settings"]["scored (1 tables), 50 cells"]
    assert res["slides"] == 4 and set(res["per_class"]) == set(CLASSES)


def test_the_gpu_job_lake_copies_are_new_images_with_the_original_pixels(tmp_path):
    """benchmarks/gpu_job/make_lake.py: every copy has its own SHA-256 (the scoring job scores
    it) and decodes to its original's pixels (the job does its original's work)."""
    from conftest import jpeg_bytes, smear
    from wbc_spark import images

    spec = importlib.util.spec_from_file_location("bench_make_lake",
                                                  BENCHMARKS / "gpu_job" / "make_lake.py")
    lake_module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(lake_module)
    src = tmp_path / "img"
    src.mkdir()
    originals = {}
    for seed in range(2):
        data = jpeg_bytes(smear(seed=seed))
        (src / f"cell{seed}.jpg").write_bytes(data)
        originals[f"cell{seed}"] = np.asarray(images.decode(data))
    assert lake_module.make_lake(src, tmp_path / "lake", 3) == 6
    copies = sorted((tmp_path / "lake").rglob("*.jpg"))
    assert len(copies) == 6
    assert len({p.parent.name for p in copies}) == 3
    assert len({images.sha256(p.read_bytes()) for p in copies}
               | {images.sha256((src / f"cell{s}.jpg").read_bytes()) for s in range(2)}) == 8
    for p in copies:
        original = originals[p.stem.rsplit("_c", 1)[0]]
        assert np.array_equal(np.asarray(images.decode(p.read_bytes())), original)
    with pytest.raises(SystemExit, match="no .jpg files"):
        lake_module.make_lake(tmp_path / "lake", tmp_path / "none", 1)


def test_confusion_crops_counts_each_pair_and_draws_its_cells(tiny_artifact, tmp_path, capsys):
    """benchmarks/confusion_crops.py: the true class comes from the image's folder, a pair's
    count is over every table given, copies of one image are drawn once, and a class the
    model does not have is refused."""
    import pandas as pd
    from PIL import Image

    from conftest import jpeg_bytes, smear
    from wbc_spark import images

    bench = _benchmark("confusion_crops")
    rows = []
    for i, (true, predicted) in enumerate([("Neutrophil", "Monocyte"), ("Neutrophil", "Monocyte"),
                                           ("Neutrophil", "Neutrophil"), ("Monocyte", "Monocyte")]):
        folder = tmp_path / "rest" / true
        folder.mkdir(parents=True, exist_ok=True)
        data = jpeg_bytes(smear(seed=i))
        (folder / f"cell{i}.jpg").write_bytes(data)
        probs = {f"p_{c}": 0.1 for c in ("Neutrophil", "Lymphocyte", "Monocyte", "Eosinophil",
                                          "Basophil")}
        probs[f"p_{predicted}"] = 0.6
        rows.append({"path": f"file:{folder / f'cell{i}.jpg'}", "sha256": images.sha256(data),
                     "predicted_class": predicted, **probs, "needs_review": i == 0,
                     "error": None})
    tables = []
    for draw in range(2):  # the same rows in two tables, as two draws scoring the same cells
        table = tmp_path / f"results{draw}" / "run=r1"
        table.mkdir(parents=True)
        pd.DataFrame(rows).to_parquet(table / "part-0.parquet")
        tables.append(str(table.parent))
    out = tmp_path / "fig.png"
    bench.main(["--results", *tables, "--model", str(tiny_artifact), "--per", "3",
                "--pairs", "Neutrophil:Monocyte,Neutrophil:Eosinophil", "--out", str(out)])
    printed = capsys.readouterr().out
    assert "Neutrophil called Monocyte: 4 of 6 (2 flagged; 2 distinct images)" in printed
    assert "Neutrophil called Eosinophil: 0 of 6" in printed
    width, height = Image.open(out).size
    assert height == 2 * bench.TILE and width == 190 + 3 * (2 * bench.TILE + 4)
    with pytest.raises(SystemExit, match="'Myelocyte' is not one of the model's classes"):
        bench.main(["--results", *tables, "--model", str(tiny_artifact),
                    "--pairs", "Neutrophil:Myelocyte", "--out", str(out)])
    with pytest.raises(SystemExit, match="wants TRUE:PREDICTED"):
        bench.main(["--results", *tables, "--model", str(tiny_artifact),
                    "--pairs", "Neutrophil", "--out", str(out)])


def test_the_review_benchmark_classifies_aligned_outputs_and_compares_the_unaligned(
        tiny_artifact):
    """benchmarks/review.py scores as a model trained with train.align does: the head and the
    cell detector see the aligned frozen outputs, the lab detector the unaligned ones."""
    import torch

    from conftest import smear
    from wbc_spark import artifact, review
    from wbc_spark.transforms import cell_crop

    bench = _benchmark("review")
    model, meta = artifact.load(tiny_artifact)
    detectors = review.ReviewModel.from_state(meta["review"])
    crops = np.stack([cell_crop(smear(seed=i, radius=20 + i), 224)[0] for i in range(4)])
    frozen = model.embed_frozen(torch.from_numpy(crops))
    found = np.ones(4, bool)

    plain = bench.scored(model, detectors, frozen, 1.0, found)
    logits, cell, pooled = review.embed(model, frozen)
    assert np.allclose(plain["probs"], review.softmax(logits, 1.0))

    shift = lambda f: f * 3.0 + 0.5  # noqa: E731 (a stand-in for a lab's channel map)
    aligned = bench.scored(model, detectors, frozen, 1.0, found, shift)
    want_logits, want_cell, _ = review.embed(model, shift(frozen))
    assert np.allclose(aligned["probs"], review.softmax(want_logits, 1.0))
    assert not np.allclose(aligned["probs"], plain["probs"])
    assert np.allclose(aligned["cell_d"], detectors.distances(want_cell, pooled)[0])
    assert np.array_equal(aligned["beyond"], plain["beyond"])  # the lab detector: unaligned


def test_the_scoring_knobs_are_valid_overrides_and_read_against_the_default_runs(speed):
    from wbc_spark.config import load_config

    for _, overrides in speed.KNOBS:
        cfg = load_config(speed.REPO / "conf" / "local.yaml", list(overrides))
        for o in overrides:  # each override reached the config it names
            section, key = o.split("=")[0].split(".")
            value = getattr(getattr(cfg, section), key)
            assert str(value) == o.split("=")[1]
    lines = speed.knob_table([("default", (), 40.0), ("batch 16", ("score.batch_size=16",), 30.0),
                              ("default again", (), 50.0)])
    assert lines[1].split()[-3:] == ["30.0", "images/s", "0.67x"]  # against the mean, 45
    assert "mean 45.0 images/s over 2 runs (range 40.0-50.0)" in lines[-1]
    with pytest.raises(ValueError, match="no default run"):
        speed.knob_table([("batch 16", ("score.batch_size=16",), 30.0)])


def test_stage_alignment_maps_a_shifted_lab_onto_the_reference_stage_by_stage():
    """Two labs of the same cells, one brighter and tinted: after the maps, the new lab's
    outputs at each aligned stage have the reference's channel means (measured after the
    earlier stages' maps, so the later map corrects what is left)."""
    import torch
    from torch import nn

    stage_align = _benchmark("stage_align")
    torch.manual_seed(0)

    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.normalize = lambda x: x.permute(0, 3, 1, 2).float() / 255 - 0.5
            self.frozen = nn.Sequential()
            self.frozen.add_module("a", nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()))
            self.frozen.add_module("b", nn.Sequential(nn.Conv2d(4, 6, 3), nn.ReLU()))

    aligner = stage_align.StageAligner(Tiny(), "fp32")
    assert aligner.names() == ["input", "a", "b"]
    rng = np.random.default_rng(0)
    reference = rng.integers(40, 200, (24, 16, 16, 3)).astype(np.uint8)
    new = np.clip(reference * np.array([1.2, 0.9, 1.1]) + 20, 0, 255).astype(np.uint8)

    def means(images, maps, stage):
        return aligner.moments(images, maps, stage).mean

    plain = {s: np.abs(means(new, {}, s) - means(reference, {}, s)).max() for s in ("a", "b")}
    maps = aligner.maps(reference, new, ["input", "b"])
    assert set(maps) == {"input", "b"}
    after = {s: np.abs(means(new, maps, s) - means(reference, {}, s)).max() for s in ("a", "b")}
    assert after["b"] < 1e-4 < plain["b"]  # the aligned stage matches
    assert after["a"] < plain["a"] / 2  # the input's map already moved the stage between
    out = aligner.features(new, maps)
    assert out.shape == (24, 6, 12, 12) and out.dtype == torch.float16
    with pytest.raises(ValueError, match="unknown stage.*nowhere.*input, a, b"):
        aligner.maps(reference, new, ["a", "nowhere"])
