"""Configuration: dataclass defaults, then a YAML file, then ``section.key=value`` overrides.

Unknown sections or keys are errors, so a misspelt option never silently does nothing.
Relative paths in the file are resolved against the current directory (the jobs are run
from the repository root, as the README shows).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from wbc_spark.model.blocks import BLOCKS, DEFAULT_FREEZE_UNTIL  # block names (no torch)

CLASSES: tuple[str, ...] = ("Neutrophil", "Lymphocyte", "Monocyte", "Eosinophil", "Basophil")

# The choices each stage offers; the stages import them from here, so that configuration
# sits at the bottom of the package and validating it imports no stage.
STAIN_MODES: tuple[str, ...] = ("none", "field", "white", "surround", "reinhard",
                                 "lightness")  # wbc_spark/stain.py
FRAMINGS: tuple[str, ...] = ("fit", "reflect")  # wbc_spark.transforms.frame_box
# Frozen layers' arithmetic (model/transfer.py); "auto" is bf16 where the CPU computes it
# natively (AVX512-BF16 or AMX), fp32 elsewhere.
PRECISIONS: tuple[str, ...] = ("auto", "fp32", "bf16")
# Scoring may also run the frozen layers in int8 (model/quantize.py), from the calibration a
# model was trained with; never chosen by "auto".
SCORE_PRECISIONS: tuple[str, ...] = PRECISIONS + ("int8",)
# Where scoring runs the network (model/transfer.py, resolve_device): "auto" is a CUDA GPU
# where torch sees one, else the CPU.
SCORE_DEVICES: tuple[str, ...] = ("cpu", "cuda", "auto")
MODEL_SOURCES: tuple[str, ...] = ("bvlc", "torchvision")  # pretrained weights (model/weights.py)
# How the epoch is chosen on the validation split: "pooled" (macro-F1 over all its images),
# "lab_mean" (each lab's macro-F1, averaged over the labs: a small lab counts as much as a
# large one, as the cross-lab targets count them), "loss" (the lowest cross-entropy: less
# noisy than macro-F1 on a small split) or "last" (the last epoch, where the learning rate's
# cosine decay ends; the validation split then only fits the temperature).
SELECTIONS: tuple[str, ...] = ("pooled", "lab_mean", "loss", "last")
SAMPLINGS: tuple[str, ...] = ("shuffle", "balanced", "lab_class",
                             "lab_class_equal")  # wbc_spark/train.py


def shared_dir() -> Path | None:
    """The ``shared/`` folder beside the repository, where this project's development machines
    and CI keep KRD-WBC and the BVLC weights (``$WBC_SPARK_SHARED`` overrides).

    Looked for next to the current directory and next to the package, a few levels up, so it
    is found whether the package runs from the checkout or from a zip shipped to executors.
    """
    if os.environ.get("WBC_SPARK_SHARED"):
        return Path(os.environ["WBC_SPARK_SHARED"])
    for base in (Path.cwd(), Path(__file__).resolve().parent):
        for p in [base, *base.parents][:5]:
            if (p / "shared").is_dir() and p != Path(p.anchor):
                return p / "shared"
    return None


def shared_lake(name: str, env: str) -> Path:
    """A lake this project's machines keep in ``shared/data/<name>``: ``$env`` if set, else
    that folder (for the demo and the benchmarks; jobs take ``data.lake``)."""
    if os.environ.get(env):
        return Path(os.environ[env])
    shared = shared_dir()
    if shared is None or not (shared / "data" / name).is_dir():
        raise FileNotFoundError(f"{name} not found: set {env} to its folder (see README "
                                "'Data and weights')")
    return shared / "data" / name


class ConfigError(ValueError):
    """A configuration file or override is invalid."""


@dataclass
class SparkConfig:
    master: str = "local[2]"
    app_name: str = "wbc_spark"
    # Extra spark.* settings, e.g. {"spark.executor.memory": "2g"}.
    conf: dict = field(default_factory=dict)


@dataclass
class DataConfig:
    # What ingest reads: "krd_wbc" (published layout), "folder" (one sub-folder per class, or
    # unlabelled folders) or "manifest" (a CSV with path[,label,group,slide,mask]).
    source: str = "krd_wbc"
    # The lake: KRD-WBC's root, an image folder, or a manifest CSV. Empty: KRD-WBC from
    # $WBC_SPARK_KRD_WBC or ../shared/data/KRD-WBC.
    lake: str = ""
    # The lab the lake comes from, written into the dataset's ``source`` column (training
    # balances and splits by it; results are reported per lab). Empty: "KRD-WBC" for
    # source=krd_wbc, else the name of the lake's folder (a manifest's: the folder it is in).
    lab: str = ""
    dataset: str = "runs/dataset"  # ingested Parquet table (one batch=<run> folder per run)
    quarantine: str = "runs/quarantine"  # files that could not be ingested, with the reason
    crop_size: int = 224  # side of the cell crop stored for training and scoring
    context: float = 1.5  # crop side / located cell's larger side (fixed cell scale)
    # Colour standardisation of each crop (wbc_spark/stain.py): "surround" (the default)
    # scales each channel so the red cells and plasma around the white cell average one
    # reference colour; "white" white-balances the field on its background; "field" maps the
    # field's hue, saturation and brightness to KRD-WBC's; "reinhard" matches each crop's CIELAB
    # mean and spread to KRD-WBC's; "lightness" is "surround" and then the crop's CIELAB
    # lightness mean and spread matched to KRD-WBC's; "none" keeps the colours as imaged.
    stain: str = "surround"
    # Where the crop's box (context x the cell) reaches outside the image: "fit" moves it
    # inside, shrunk to the image's shorter side where larger; "reflect" fills the outside
    # by reflecting the image (how every crop was made before this setting existed; a model
    # whose artifact names no framing is scored so).
    framing: str = "fit"
    min_side: int = 32  # smaller images are quarantined
    max_pixels: int = 40_000_000  # larger images are quarantined (decompression bombs)
    # Symbolic links in a folder lake that lead outside it: "refuse" (quarantined, with the
    # link and its target) or "follow" (read, with a warning that names how many).
    outside_links: str = "refuse"


@dataclass
class ModelConfig:
    source: str = "bvlc"  # "bvlc" (raw Caffe blobs, offline) or "torchvision" (download)
    weights_dir: str = ""  # explicit BVLC folder; empty: the documented lookup order
    freeze_until: str = DEFAULT_FREEZE_UNTIL  # this block and every block before it stay frozen
    dropout: float = 0.4
    # Each image scored on the mean of its first test_views flips and rotations
    # (wbc_spark.transforms.dihedral; 1: the image alone). A property of the model: its
    # temperature, review thresholds and confusion are fitted on that mean, and scoring costs
    # test_views times the network's time.
    test_views: int = 1


@dataclass
class TrainConfig:
    num_processes: int = 2  # TorchDistributor processes
    use_gpu: bool = False  # refused for now: see validate()
    local_mode: bool = True  # True: processes on the driver; False: on executors
    epochs: int = 10
    # Augmented views of each training image passed once through the frozen layers and
    # cached; epochs then train on the cache (each epoch draws one view per image).
    views: int = 4
    # Memory for those cached outputs per process (200.7 KB a view at inception4c, 81.5 KB at
    # inception4e): on a large dataset fewer views are cached, and a logged warning says so.
    cache_gib: float = 4.0
    # Views per training step, all processes together (each draws batch_size /
    # num_processes): the same steps in one process or many. Until session 40 it was per
    # process, so two processes took half the steps of the benchmarks' one.
    batch_size: int = 32
    lr: float = 3e-3  # for the new head; upper Inception blocks get lr * block_lr_factor
    block_lr_factor: float = 0.1
    weight_decay: float = 1e-4
    label_smoothing: float = 0.1
    class_weighting: str = "none"  # "none", "inverse", "inverse_sqrt"
    # "lab_class" (default): views drawn in proportion to 1/sqrt(images of their lab and
    # class), so a small lab's rare classes count; "shuffle": each image about once per epoch
    # (pair it with class_weighting=inverse_sqrt, the earlier default); "balanced": batches
    # drawn with every class equally likely; "lab_class_equal": in proportion to 1/(images of
    # their lab and class), every lab's every class alike, for adapting to a lab from a few
    # labelled cells (README "Adapting to your lab": KRD-WBC + k of PBC-dev, 7 of 9 paired
    # draws higher, mean balanced accuracy +0.06 / +0.05 / +0.01 at k = 5 / 10 / 25; the other
    # way, k = 25, +0.016, 2 of 3 draws higher; docs/RESULTS.md, session 28; those runs'
    # heads started unseeded; seeded, session 29, k = 25: +0.010, 2 of 3 draws higher).
    sampling: str = "lab_class"
    selection: str = "pooled"  # SELECTIONS: the validation score that chooses the epoch
    seed: int = 0
    folds: int = 5
    test_fold: int = 0  # which of the grouped, stratified folds is held out for testing
    val_fraction: float = 0.2  # of the remaining data, for choosing the epoch and temperature
    threads_per_process: int = 1
    # Arithmetic of the frozen-feature cache: "bf16" (CPU autocast: about 2x faster on CPUs
    # with AVX512-BF16 or AMX, about 5x slower on CPUs without), "fp32", or "auto" (bf16
    # where each process's CPU has AVX512-BF16 or AMX, fp32 elsewhere; logged).
    frozen_precision: str = "auto"
    # Arithmetic of the training steps' forward pass through the trained blocks (CPU
    # autocast; the weights, their gradients, the optimiser, the loss and every evaluation
    # stay fp32): "fp32", "bf16" or "auto" (as frozen_precision). bf16 made a training
    # step about 30% faster on a Zen 4 CPU, with the same accuracy (KRD-WBC, 15 paired runs:
    # macro-F1 0.734 [0.692, 0.776] against 0.740 [0.697, 0.783]; docs/PERFORMANCE.md).
    step_precision: str = "auto"
    # Unaugmented training crops whose activation ranges are stored in the artifact, so that
    # score.precision=int8 can run its frozen layers in int8 (256 kept macro-F1 within 0.005
    # of fp32, 64 did not: docs/PERFORMANCE.md); 0: no int8 for this model.
    int8_calibration: int = 256
    # Per-lab alignment of the frozen layers' outputs (wbc_spark/align.py): each training
    # lab's outputs mapped, channel by channel, to the mean and spread of all training labs'
    # (measured on the unaugmented crops the lab detector sees); scoring then maps a new
    # lab's images by its own measured moments (score.lab). On by default: a lab the model
    # never saw scored higher in 5 of 5 paired comparisons (+0.02 to +0.07 balanced
    # accuracy; through the jobs, benchmarks/lab_route.py, 0.357 -> 0.421 and no basophil
    # sink); with both labs in training it changed nothing (docs/RESULTS.md, "each lab's
    # features aligned without labels"). false: no alignment, and scoring needs no profile.
    align: bool = True
    output: str = "runs/model"  # folder for the artifact, evaluation and confusion matrix
    petastorm_cache: str = "runs/petastorm_cache"


@dataclass
class AugmentConfig:
    """Training augmentation (see wbc_spark/augment.py): ranges of the random jitter."""

    scale: float = 0.3  # cell scale: exp(+-scale)
    hue: float = 0.04  # hue shift: +-hue of the colour circle
    saturation: float = 0.3  # saturation factor: exp(+-saturation)
    brightness: float = 0.15
    contrast: float = 0.15
    # Probability that a training view gets 1..frame_edge_sides simulated frame edges
    # (reflected borders, each up to frame_edge_width of the side), so such borders say
    # nothing of the class.
    frame_edge: float = 0.5
    frame_edge_width: float = 0.3
    frame_edge_sides: int = 4  # 1..frame_edge_sides edges per view that gets them (max 4)
    # Stain density: each view's optical density (-log of the light passed) times
    # exp(+-density), the crop's surroundings then brought back to their standard colour,
    # so how darkly one lab stains its cells against their red cells says nothing (PBC-dev's
    # cells are twice as dense as KRD-WBC's usual ones, like its basophils); 0: off.
    density: float = 0.7
    # Probability that a training view is resampled through a lower resolution (down to
    # min_resolution of its side) and back, so sharpness (one lab's optics) says nothing.
    resolution: float = 0.7
    min_resolution: float = 0.35
    # Per-stain jitter: the haematoxylin, eosin and residual stains' concentrations each
    # times exp(+-hed), so the stains' balance inside the cell (one lab's stain recipe:
    # KRD-WBC's magenta nuclei, PBC-dev's navy ones) says nothing; 0: off.
    hed: float = 0.6
    # Probability that a training view is grey, so the class cannot rest on colour alone.
    # With hed: a KRD-WBC-only model scores PBC-dev at balanced accuracy 0.43-0.45 instead of
    # 0.34 (docs/RESULTS.md, "Cross-lab").
    grey: float = 0.5


@dataclass
class ScoreConfig:
    input: str = ""  # image folder (recursive), glob, or an ingested Parquet dataset
    model: str = "runs/model/model.pt"
    results: str = "runs/results"  # per-image table; per-class table in <results>_per_class
    batch_size: int = 64  # Arrow records per batch sent to the UDF
    threads_per_worker: int = 1
    # Images to score are spread evenly over this many tasks per core of the cluster
    # (Spark's default parallelism), so no core idles while another finishes a larger task.
    tasks_per_core: int = 4
    # Frozen layers in "bf16" (CPU autocast), "fp32" or "auto" (as train.frozen_precision,
    # chosen by each Python worker's CPU), or "int8" (x86 quantisation, from the calibration
    # stored in the model; asked for, never chosen); the trained layers as trained_precision.
    precision: str = "auto"
    # The trained layers (the blocks after model.freeze_until and the head): "auto" (the
    # default: bf16 autocast where the worker's CPU computes it natively, as score.precision,
    # else fp32; fp32 on a GPU), "bf16" or "fp32" (the arithmetic the temperature and the
    # review thresholds were fitted in). On 739 held-out cells bf16 changed no prediction and
    # 0.1% of the review flags, and scored 4% faster (docs/PERFORMANCE.md, session 54).
    trained_precision: str = "auto"
    # Where each Python worker runs the network: "cpu", "cuda" (the GPU Spark assigned the
    # task with spark.task.resource.gpu.amount, else the first; refused where torch sees
    # none) or "auto" (a GPU where there is one, else the CPU). On a GPU, "auto" precision is
    # fp32 (TF32 off, so fp32 is the CPU's arithmetic); int8 is the CPU's path only.
    # Decoding, locating and cropping stay on the CPU.
    device: str = "cpu"
    outside_links: str = "refuse"  # as data.outside_links, for the folder scored
    # A model trained with train.align=true maps every image by a lab's moments: "" (the
    # default) measures them on score.lab_profile_images of the input's images (the smallest
    # SHA-256s, so the same sample each time) and keeps them in <results>_lab_profiles, one
    # row per model and score.input, which later runs of that input reuse; or the name of a
    # lab the model was trained on, whose stored moments are used.
    lab: str = ""
    # Where the lab profile is measured and under which input it is kept: "" (the default)
    # score.input itself; or the lab's whole folder, glob or dataset when score.input is a
    # part of it that does not mix its cells as the lab does (one class's folder is refused
    # without it: see wbc_spark.score.one_class_folder).
    lab_profile: str = ""
    lab_profile_images: int = 256


@dataclass
class ReviewConfig:
    """Review flags and the shift alarm (wbc_spark/review.py). Training fits the detectors and
    sets the thresholds on the validation split; they are stored in the model artifact."""

    # Training: the confidence threshold is the lowest at which this share of the validation
    # cells at or above it are classified right (accuracy of the unflagged cells).
    target_accuracy: float = 0.995
    # Training: not_a_known_cell flags cells farther from the five classes than this quantile
    # of validation cells (so about 1 - cell_quantile of a trained lab's cells).
    cell_quantile: float = 0.95
    # Training: the lab threshold, this quantile of validation cells' lab distance.
    lab_quantile: float = 0.95
    # Scoring: the shift alarm fires for a run or slide whose share of cells beyond the lab
    # threshold lies, with 95% confidence (Wilson), above this.
    alarm_share: float = 0.25
    alarm_min_cells: int = 10  # smaller slides get a shift_score but never an alarm
    # Scoring: override the model's thresholds (0: use the model's).
    confidence_threshold: float = 0.0
    cell_threshold: float = 0.0
    lab_threshold: float = 0.0


@dataclass
class ReportConfig:
    """Per-slide HTML reports (wbc_spark/report.py, jobs/report.py) of score.model's results
    in score.results."""

    output: str = "runs/report"  # index.html and one page per slide
    per_class: int = 4  # unflagged cells shown per predicted class and slide
    flagged: int = 24  # flagged cells shown per slide (least confident first)
    errors: int = 50  # unreadable files listed per slide
    thumbnail: int = 128  # side of each gallery image, pixels


#: Cell types that labelled lakes may carry but that are not one of the classes (PBC's
#: immature granulocytes, nucleated red cells and platelets): ingested with their label, never
#: trained as one of the classes. Any other label is an error.
OTHER_LABELS: tuple[str, ...] = ("ImmatureGranulocyte", "Erythroblast", "Platelet")


@dataclass
class Config:
    classes: list = field(default_factory=lambda: list(CLASSES))
    other_labels: list = field(default_factory=lambda: list(OTHER_LABELS))
    spark: SparkConfig = field(default_factory=SparkConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    score: ScoreConfig = field(default_factory=ScoreConfig)
    review: ReviewConfig = field(default_factory=ReviewConfig)
    report: ReportConfig = field(default_factory=ReportConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _apply(target: Any, values: dict, where: str) -> None:
    names = {f.name: f for f in dataclasses.fields(target)}
    for key, value in values.items():
        if key not in names:
            raise ConfigError(
                f"unknown key '{where}{key}'; valid keys: {', '.join(sorted(names))}"
            )
        current = getattr(target, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"{where}{key} must be a mapping, got {value!r}")
            _apply(current, value, f"{where}{key}.")
        elif isinstance(current, dict):
            # A free mapping (spark.conf): entries merge into it, they do not replace it.
            if not isinstance(value, dict):
                raise ConfigError(f"{where}{key} must be a mapping, got {value!r}")
            current.update({str(k): v for k, v in value.items()})
        else:
            setattr(target, key, _coerce(value, current, f"{where}{key}"))


def _coerce(value: Any, current: Any, name: str) -> Any:
    """``value`` as the type of the default ``current``; anything that would change meaning on
    the way (3.7 for a count, a bare string for a list) is refused."""
    if isinstance(current, bool):
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{name} must be true or false, got {value!r}")
    if isinstance(current, (int, float)):
        number = _number(value)
        if number is None:
            raise ConfigError(f"{name} must be a number, got {value!r}")
        if isinstance(current, float):
            return number
        if not number.is_integer():
            raise ConfigError(f"{name} must be a number, a whole one; got {value!r}")
        return int(number)
    if isinstance(current, str):
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{name} must be a string, got {value!r}")
        return "" if value is None else str(value)
    if isinstance(current, list):
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{name} must be a list of names like [A, B], got {value!r}")
        return list(value)
    return value


def _number(value: Any) -> float | None:
    """``value`` as a float if it is a number or a string of one (YAML 1.1 reads ``1e-3`` as a
    string), else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    return None


def parse_override(text: str) -> dict:
    """``train.epochs=3`` -> ``{"train": {"epochs": 3}}`` (the value parsed as YAML).

    Keys of a free mapping keep their dots: ``spark.conf.spark.executor.memory=2g`` ->
    ``{"spark": {"conf": {"spark.executor.memory": "2g"}}}``.
    """
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value")
    dotted, raw = text.split("=", 1)
    value = yaml.safe_load(raw) if raw else ""
    parts = dotted.lstrip("-").split(".")
    node: Any = Config()
    keys: list[str] = []
    while parts:
        part = parts.pop(0)
        keys.append(part)
        field_value = getattr(node, part, None) if dataclasses.is_dataclass(node) else None
        if isinstance(field_value, dict) and parts:
            keys.append(".".join(parts))
            break
        node = field_value
    out: dict = {}
    cursor = out
    for k in keys[:-1]:
        cursor = cursor.setdefault(k, {})
    cursor[keys[-1]] = value
    return out


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults, then the YAML file at ``path``, then each ``section.key=value`` override."""
    config = Config()
    if path:
        text = Path(path).read_text()
        values = yaml.safe_load(text) or {}
        if not isinstance(values, dict):
            raise ConfigError(f"{path}: must hold a mapping of sections")
        _apply(config, values, "")
    for item in overrides or []:
        _apply(config, parse_override(item), "")
    validate(config)
    return config


# The fewest readable images a lab profile (score.lab_profile_images) is measured on.
LAB_PROFILE_MIN = 32


def validate(config: Config) -> None:
    """Refuse settings that cannot work, naming the valid choices."""
    if config.data.source not in ("krd_wbc", "folder", "manifest"):
        raise ConfigError(f"data.source={config.data.source!r}; choose krd_wbc, folder or "
                          "manifest")
    if config.model.source not in MODEL_SOURCES:
        raise ConfigError(f"model.source={config.model.source!r}; choose one of "
                          f"{', '.join(MODEL_SOURCES)}")
    if config.model.freeze_until not in ("none", *BLOCKS[:-1]):
        raise ConfigError(f"model.freeze_until={config.model.freeze_until!r}; choose none or "
                          f"one of {', '.join(BLOCKS[:-1])}")
    if not 1 <= config.model.test_views <= 8:
        raise ConfigError(f"model.test_views={config.model.test_views}; choose 1 to 8 (the "
                          "first N of an image's eight flips and rotations)")
    if config.train.use_gpu:
        # The model, batches and cached features stay on the CPU and the processes talk over
        # gloo: a GPU would sit idle. Refused until the device placement and the nccl process
        # group are written and run on a GPU (none was available to test them).
        raise ConfigError("train.use_gpu=true: GPU training is not implemented yet (the model "
                          "and its batches stay on the CPU); set train.use_gpu=false")
    if config.data.stain not in STAIN_MODES:
        raise ConfigError(f"data.stain={config.data.stain!r}; choose "
                          f"{' or '.join(STAIN_MODES)}")
    if config.data.framing not in FRAMINGS:
        raise ConfigError(f"data.framing={config.data.framing!r}; choose "
                          f"{' or '.join(FRAMINGS)}")
    for name, value in (("data.outside_links", config.data.outside_links),
                        ("score.outside_links", config.score.outside_links)):
        if value not in ("refuse", "follow"):
            raise ConfigError(f"{name}={value!r}; choose refuse or follow")
    for name, value, choices in (
            ("train.frozen_precision", config.train.frozen_precision, PRECISIONS),
            ("train.step_precision", config.train.step_precision, PRECISIONS),
            ("score.precision", config.score.precision, SCORE_PRECISIONS),
            ("score.trained_precision", config.score.trained_precision, PRECISIONS),
            ("score.device", config.score.device, SCORE_DEVICES)):
        if value not in choices:
            raise ConfigError(f"{name}={value!r}; choose {' or '.join(choices)}")
    if config.score.device != "cpu" and config.score.precision == "int8":
        raise ConfigError(f"score.precision=int8 with score.device={config.score.device}: "
                          "int8 is the CPU's x86 quantisation; on a GPU score in bf16, fp32 "
                          "or auto, or set score.device=cpu")
    if config.train.int8_calibration < 0:
        raise ConfigError(f"train.int8_calibration={config.train.int8_calibration}: a number "
                          "of training crops, 0 for none")
    if config.score.lab_profile_images < LAB_PROFILE_MIN:
        raise ConfigError(f"score.lab_profile_images={config.score.lab_profile_images}: at "
                          f"least {LAB_PROFILE_MIN} images measure a lab's moments")
    if not 0 <= config.augment.frame_edge <= 1:
        raise ConfigError(f"augment.frame_edge={config.augment.frame_edge}: a probability, "
                          "0..1")
    if not 0.05 < config.augment.frame_edge_width < 0.5:
        raise ConfigError(f"augment.frame_edge_width={config.augment.frame_edge_width}: a "
                          "share of the crop's side above 0.05 and under 0.5")
    if not 0 <= config.augment.density <= 1.5:
        raise ConfigError(f"augment.density={config.augment.density}: the stain density's "
                          "log-factor range, 0 (off) to 1.5 (x0.22 to x4.5)")
    if not 0 <= config.augment.hed <= 1.5:
        raise ConfigError(f"augment.hed={config.augment.hed}: the per-stain jitter's "
                          "log-factor range, 0 (off) to 1.5")
    if not 0 <= config.augment.grey <= 1:
        raise ConfigError(f"augment.grey={config.augment.grey}: a probability, 0..1")
    if not 1 <= config.augment.frame_edge_sides <= 4:
        raise ConfigError(f"augment.frame_edge_sides={config.augment.frame_edge_sides}: "
                          "1..4")
    if config.train.sampling not in SAMPLINGS:
        raise ConfigError(f"train.sampling={config.train.sampling!r}; choose "
                          f"{' or '.join(SAMPLINGS)}")
    if config.train.selection not in SELECTIONS:
        raise ConfigError(f"train.selection={config.train.selection!r}; choose "
                          f"{' or '.join(SELECTIONS)}")
    if config.train.class_weighting not in ("none", "inverse", "inverse_sqrt"):
        raise ConfigError("train.class_weighting must be none, inverse or inverse_sqrt")
    world = max(1, config.train.num_processes)
    if config.train.batch_size % world:
        raise ConfigError(f"train.batch_size={config.train.batch_size}: views per step, all "
                          f"{world} processes together; make it a multiple of "
                          "train.num_processes")
    if not 0 <= config.train.test_fold < config.train.folds:
        raise ConfigError(f"train.test_fold must be in 0..{config.train.folds - 1}")
    if config.score.tasks_per_core < 1:
        raise ConfigError(f"score.tasks_per_core={config.score.tasks_per_core}: 1 or more")
    r = config.review
    for name in ("target_accuracy", "cell_quantile", "lab_quantile", "alarm_share"):
        if not 0 < getattr(r, name) < 1:
            raise ConfigError(f"review.{name}={getattr(r, name)}: a share, strictly 0..1")
    for name in ("confidence_threshold", "cell_threshold", "lab_threshold"):
        if getattr(r, name) < 0:
            raise ConfigError(f"review.{name}={getattr(r, name)}: 0 (the model's) or more")
    if len(set(config.classes)) != len(config.classes) or len(config.classes) < 2:
        raise ConfigError("classes must be at least two distinct names")
    both = {c.lower() for c in config.classes} & {c.lower() for c in config.other_labels}
    if both:
        raise ConfigError(f"other_labels repeats classes {sorted(both)}")
