"""Shared fixtures: synthetic smear images, a tiny weight folder, a fast model artifact."""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
CLASSES = ["Neutrophil", "Lymphocyte", "Monocyte", "Eosinophil", "Basophil"]


def smear(size: int = 256, cell_xy=(128, 128), radius: int = 30, seed: int = 0,
          hue_shift: int = 0) -> Image.Image:
    """A synthetic Wright-Giemsa field: pale background, pink red cells, one purple nucleus."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    img = np.zeros((size, size, 3), np.float32) + (205, 200, 180)
    for _ in range(12):  # red cells
        cx, cy = rng.integers(0, size, 2)
        r = rng.integers(size // 16, size // 9)
        img[(xx - cx) ** 2 + (yy - cy) ** 2 < r * r] = (190, 150, 160)
    cx, cy = cell_xy
    d2 = (xx - cx) ** 2 + (yy - cy) ** 2
    img[d2 < (1.4 * radius) ** 2] = (190, 170, 200)  # cytoplasm
    img[d2 < radius ** 2] = (120 + hue_shift, 60, 150)  # nucleus
    img += rng.normal(0, 3, img.shape)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def jpeg_bytes(image: Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


@pytest.fixture(scope="session")
def fake_weights(tmp_path_factory) -> Path:
    """A BVLC-layout weight folder with random blobs and a valid SHA256SUMS."""
    import torch

    from wbc_spark.model.googlenet import BVLCGoogLeNet, caffe_blob_names

    root = tmp_path_factory.mktemp("bvlc")
    net = BVLCGoogLeNet()
    modules = dict(net.named_modules())
    lines = []
    torch.manual_seed(0)
    for name, blob in caffe_blob_names().items():
        m = modules[name]
        w = (torch.randn_like(m.weight) * 0.05).numpy()
        if w.ndim == 4:
            w = w.transpose(0, 2, 3, 1)  # to the export's (out, kh, kw, in)
        for suffix, arr in (("filter", w), ("bias", np.zeros(m.weight.shape[0], np.float32))):
            rel = f"{blob}_{suffix}.bin"
            path = root / "weights" / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            data = np.ascontiguousarray(arr, dtype="<f4").tobytes()
            path.write_bytes(data)
            lines.append(f"{hashlib.sha256(data).hexdigest()}  ./{rel}")
    (root / "SHA256SUMS").write_text("\n".join(lines) + "\n")
    return root


@pytest.fixture(scope="session")
def tiny_artifact(tmp_path_factory, fake_weights) -> Path:
    """A model artifact built from the fake weights (untrained head), for scoring tests."""
    return save_tiny_artifact(tmp_path_factory.mktemp("model") / "model.pt", fake_weights)


def save_tiny_artifact(path: Path, fake_weights: Path, freeze_until: str = "inception4e"
                       ) -> Path:
    """Save at ``path`` a model of the fake weights cut at ``freeze_until`` (untrained head),
    with review detectors fitted on synthetic smears and a toy confusion."""
    from wbc_spark import artifact
    from wbc_spark.model.transfer import build_classifier
    from wbc_spark.model.weights import load_bvlc

    pm = load_bvlc(fake_weights)
    model = build_classifier(pm, len(CLASSES), freeze_until=freeze_until)
    model.eval()
    artifact.save(path, model, classes=CLASSES, source="bvlc", convention=pm.convention,
                  preprocessing={"crop_size": 224, "context": 1.5}, config={},
                  provenance=pm.provenance, metrics={}, temperature=1.0,
                  review=smear_review(model).to_state(), confusion=toy_confusion().to_state())
    return path


def toy_confusion():
    """A held-out confusion: 40 cells per class, 36 right, 2 called the next class, 2
    excluded."""
    from wbc_spark.differential import Confusion

    k = len(CLASSES)
    counts = np.zeros((k, k + 1), int)
    for i in range(k):
        counts[i, i], counts[i, (i + 1) % k], counts[i, k] = 36, 2, 2
    return Confusion(tuple(CLASSES), counts)


def smear_review(model, n: int = 40):
    """Review detectors fitted on synthetic smears (random labels): smears are 'known'."""
    import torch

    from wbc_spark import review
    from wbc_spark.config import ReviewConfig
    from wbc_spark.transforms import cell_crop

    crops = np.stack([cell_crop(smear(seed=100 + i, radius=24 + i % 12), 224)[0]
                      for i in range(n)])
    frozen = model.embed_frozen(torch.from_numpy(crops))
    labels = np.arange(n) % len(CLASSES)
    labs = np.array(["synthetic"] * n)
    half = n // 2
    return review.fit(model, *review.training_cells(model, frozen[:half], labels[:half]),
                      frozen[half:], labels[half:], 1.0,
                      len(CLASSES), ReviewConfig(), plain_pooled=review.pooled(frozen[:half]),
                      plain_labels=labels[:half], plain_labs=labs[:half], val_labs=labs[half:])


def krd_root() -> Path | None:
    from wbc_spark.sources.krd_wbc import default_root

    try:
        root = default_root()
    except FileNotFoundError:  # no ../shared and no $WBC_SPARK_KRD_WBC: real-data tests skip
        return None
    return root if (root / "class labels.csv").is_file() else None


def pbc_root() -> Path | None:
    from wbc_spark.config import shared_lake

    try:
        root = shared_lake("PBC-dev", "WBC_SPARK_PBC_DEV")
    except FileNotFoundError:
        return None
    return root if (root / "labels.csv").is_file() else None


def bvlc_dir() -> Path | None:
    from wbc_spark.model.weights import WeightsError, resolve_bvlc_dir

    try:
        return resolve_bvlc_dir()
    except WeightsError:
        return None


def _submit_command(job: str, args, master: str | None) -> tuple[list[str], dict]:
    cmd = ["bash", str(REPO / "deploy" / "submit.sh"), job]
    if master:
        cmd += ["--master", master]
    cmd += list(args)
    env = dict(os.environ, PYSPARK_PYTHON=sys.executable, PYSPARK_DRIVER_PYTHON=sys.executable,
               WBC_SPARK_VENV=str(Path(sys.executable).parents[1]))
    return cmd, env


@contextlib.contextmanager
def local_cluster(state: Path, port: int, **env: str):
    """deploy/local_cluster.sh start, then stop; yields the master URL. ``env`` is added to
    the script's environment (e.g. ISOLATE, WBC_SPARK_VENV)."""
    full = dict(os.environ, WBC_SPARK_CLUSTER_DIR=str(state), SPARK_MASTER_PORT=str(port),
                **env)
    script = str(REPO / "deploy" / "local_cluster.sh")
    start = subprocess.run(["bash", script, "start"], env=full, capture_output=True, text=True,
                           timeout=300)
    try:
        assert start.returncode == 0, start.stdout + start.stderr
        yield f"spark://127.0.0.1:{port}"
    finally:
        subprocess.run(["bash", script, "stop"], env=full, capture_output=True, timeout=120)


def spark_submit(job: str, *args: str, cwd: Path = REPO, master: str | None = None,
                 timeout: int = 900) -> subprocess.CompletedProcess:
    """Run a job through deploy/submit.sh (spark-submit) as a user would."""
    cmd, env = _submit_command(job, args, master)
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


def spark_submit_background(job: str, *args: str, log: Path,
                            master: str | None = None) -> subprocess.Popen:
    """Start a job in its own process group (so a test can kill -9 all of it), output to
    ``log``."""
    cmd, env = _submit_command(job, args, master)
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=open(log, "w"),
                            stderr=subprocess.STDOUT, start_new_session=True)
