"""A lab held out, its crops aligned at several depths of the frozen layers, not only at
their output.

    .venv/bin/python benchmarks/stage_align.py [--dataset runs/dataset] [--seeds 0,1]
        [--variants pool4 conv1,conv2,pool4 ...] [section.key=value ...]

``train.align`` (``wbc_spark.align``) maps a lab's frozen-layer output, channel by channel,
to the training labs' mean and spread. BVLC GoogLeNet has no batch normalisation, so nothing
inside the frozen layers sees a lab's shift before that output. This benchmark measures the
same map applied after earlier stages as well (an AdaBN-like alignment at each named stage):
for each direction of ``benchmarks/crosslab.py``'s lab-held-out part it trains the head on
one lab (the recipe of the config; the training lab is the reference, so its own map is the
identity) and scores the other lab's five classes with each variant's alignment, on the same
trained head. A variant is a comma-separated list of stages (``input``: the network's
normalised input; the stage names are printed), aligned in order: the held-out lab's moments
at a stage are measured on its sample already mapped at the earlier stages. Each lab's
sample is up to 256 of its images, smallest SHA-256 first (the training lab's from its
training rows, the held-out lab's from its test rows, as ``crossval.lab_alignment`` picks
them). The variant ``pool4`` (the frozen output alone) is the default's alignment; the
``[original]`` line is the unaligned model.

``--both conv1`` (a variant without ``pool4``) runs ``crosslab.py``'s both-labs part
instead, twice on the same folds, seeds and augmented views: the default (``train.align``
on the frozen output) and with every lab's crops also mapped at the named stages, before the
frozen output's alignment. Each lab is mapped there onto the sum of the labs' moments (as
``LabAlignment.of_labs`` weighs them), from up to 256 of its images, smallest SHA-256 first,
over the whole lab: one set of maps for all five folds, so the features are computed once
(the folds' test images are in those samples, without their labels; the jobs would measure
a training lab on its training rows).

Prints ``crosslab.py``'s line (balanced accuracy, macro-F1, recall, ECE with 95% intervals,
the largest share ratio) per direction, seed and variant, or per lab and variant.
"""

from __future__ import annotations

import argparse
import functools
import logging
import operator
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from crosslab import evaluate, inner_validation, line  # noqa: E402
from wbc_spark.align import ChannelMap, Moments  # noqa: E402
from wbc_spark.augment import AugmentSettings, augment  # noqa: E402
from wbc_spark.config import load_config  # noqa: E402
from wbc_spark.evaluation import crossval  # noqa: E402
from wbc_spark.model.transfer import build_classifier, inference_precision  # noqa: E402
from wbc_spark.model.weights import load_pretrained  # noqa: E402
from wbc_spark.preprocessing import Preprocessing  # noqa: E402
from wbc_spark.splits import train_val_test  # noqa: E402
from wbc_spark.train import Recipe  # noqa: E402

DEFAULT_VARIANTS = ("pool4", "conv1,pool4", "conv1,conv2,pool4", "input,pool4",
                    "input,conv1,conv2,pool4", "conv1,conv2,inception3a,inception3b,pool4")


class StageAligner:
    """The frozen layers run stage by stage, with a lab's maps applied after named stages."""

    def __init__(self, model, precision: str) -> None:
        self.model, self.precision = model, precision
        self.stages = [("input", None), *model.frozen.named_children()]

    def names(self) -> list[str]:
        return [name for name, _ in self.stages]

    def check(self, levels: list[str]) -> None:
        unknown = set(levels) - set(self.names())
        if unknown:
            raise ValueError(f"unknown stage(s) {', '.join(sorted(unknown))}; the frozen "
                             f"stages are {', '.join(self.names())}")

    @staticmethod
    def mapped(name: str, m: ChannelMap, x: torch.Tensor) -> torch.Tensor:
        if name == "input":  # normalised input is signed: no ReLU floor
            return x * m.scale.view(-1, 1, 1) + m.shift.view(-1, 1, 1)
        return m(x)

    @torch.no_grad()
    def moments(self, images: np.ndarray, maps: dict, upto: str, chunk: int = 32) -> Moments:
        """Moments at stage ``upto``'s output of ``images``, mapped by ``maps`` before it."""
        total = None
        for i in range(0, len(images), chunk):
            x = self.run(images[i:i + chunk], maps, upto)
            m = Moments.of(x)
            total = m if total is None else total + m
        return total

    @torch.no_grad()
    def run(self, images: np.ndarray, maps: dict, upto: str | None = None) -> torch.Tensor:
        x = self.model.normalize(torch.from_numpy(images))
        for name, stage in self.stages:
            if stage is not None:
                with inference_precision(self.precision):
                    x = stage(x).float()
            if name == upto:
                return x
            if name in maps:
                x = self.mapped(name, maps[name], x)
        return x

    def maps(self, reference: np.ndarray, new: np.ndarray, levels: list[str]) -> dict:
        """Maps of ``new``'s images onto ``reference``'s own moments at each of ``levels``."""
        return self.lab_maps({"reference": reference, "new": new}, levels, "reference")["new"]

    def lab_maps(self, samples: dict, levels: list[str], reference: str | None = None
                 ) -> dict:
        """Each lab's maps (``samples``: lab -> its images) at each of ``levels``, each level
        measured after the earlier ones are applied: onto the sum of the labs' moments, or
        onto lab ``reference``'s own (that lab then keeps its outputs as they are)."""
        self.check(levels)
        out: dict = {lab: {} for lab in samples}
        for name in self.names():
            if name in levels:
                per_lab = {lab: self.moments(images, out[lab], name)
                           for lab, images in samples.items()}
                target = (per_lab[reference] if reference is not None
                          else functools.reduce(operator.add, per_lab.values()))
                for lab, moments in per_lab.items():
                    if lab != reference:
                        out[lab][name] = ChannelMap.between(moments, target)
        return out

    def features(self, images: np.ndarray, maps: dict, chunk: int = 16) -> torch.Tensor:
        return torch.cat([self.run(images[i:i + chunk], maps).to(torch.float16)
                          for i in range(0, len(images), chunk)])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(REPO / "conf" / "local.yaml"))
    parser.add_argument("--dataset", default=None, help="ingested dataset (default: config's)")
    parser.add_argument("--seeds", default="0", help="comma-separated head seeds (train.seed +)")
    parser.add_argument("--variants", nargs="+", default=list(DEFAULT_VARIANTS))
    parser.add_argument("--both", default="", metavar="STAGES",
                        help="the both-labs part instead, default against these stages too")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--view-seed", type=int, default=1234)
    parser.add_argument("overrides", nargs="*", help="section.key=value for the recipe")
    args = parser.parse_args()
    # ``--variants`` takes every word after it: section.key=value words are overrides
    args.overrides += [v for v in args.variants if "=" in v]
    args.variants = [v for v in args.variants if "=" not in v]
    crossval.benchmark_process(args.threads)
    config = load_config(args.config, args.overrides)
    classes = list(config.classes)
    start = time.perf_counter()
    df = crossval.load_dataset(args.dataset or config.data.dataset, classes,
                               Preprocessing.from_config(config))
    labs = sorted(df.source.unique())
    if len(labs) != 2:
        raise SystemExit(f"the dataset holds labs {labs}; this benchmark needs two")
    labels = df.label.map({c: i for i, c in enumerate(classes)}).to_numpy()
    meta = df[["image_id", "label", "group", "sha256", "source"]].reset_index(drop=True)
    source, keys = df.source.to_numpy(), df.sha256.to_numpy()
    t = config.train
    model = build_classifier(load_pretrained(config.model.source,
                                             config.model.weights_dir or None),
                             len(classes), freeze_until=config.model.freeze_until,
                             dropout=config.model.dropout)
    aligner = StageAligner(model, t.frozen_precision)
    variants = [v.split(",") for v in ([args.both] if args.both else args.variants)]
    try:
        for levels in variants:
            aligner.check(levels)
    except ValueError as exc:
        raise SystemExit(str(exc)) from None
    crops = crossval.crops_of(df)
    if args.both:
        both_labs(args, config, aligner, crops, df, labels, meta, variants[0], start)
        return 0
    view_feats = crossval.augmented_view_features(
        model, crops, t.views, seed=args.view_seed,
        settings=AugmentSettings(**config.augment.__dict__), precision=t.frozen_precision)
    original = crossval.features_of(model, crops, t.frozen_precision)
    print(f"frozen features of {len(df)} images x {t.views} views: "
          f"{time.perf_counter() - start:.0f} s; stages {', '.join(aligner.names())}",
          flush=True)

    base = Recipe.from_config(t)
    for train_lab in labs:
        test_lab = next(lab for lab in labs if lab != train_lab)
        tr, va = inner_validation(meta, np.flatnonzero(source == train_lab), t.val_fraction, 0)
        te = np.flatnonzero(source == test_lab)
        reference = crops[crossval.lab_sample(tr, keys)]
        new = crops[crossval.lab_sample(te, keys)]
        eval_feats = {"original": original}
        for levels in variants:
            t0 = time.perf_counter()
            feats = original.clone()
            feats[torch.from_numpy(te)] = aligner.features(
                crops[te], aligner.maps(reference, new, levels))
            eval_feats[",".join(levels)] = feats
            print(f"{train_lab} -> {test_lab}: aligned at {','.join(levels)} in "
                  f"{time.perf_counter() - t0:.0f} s", flush=True)
        for seed in (int(s) for s in args.seeds.split(",")):
            recipe = Recipe(**{**base.__dict__, "seed": base.seed + seed})
            probs, _, _ = crossval.train_and_test(model, view_feats, eval_feats, labels, tr, va,
                                                  te, recipe, len(classes), labs=source,
                                                  keys=keys)
            for variant, p in probs.items():
                print(line(f"{train_lab} -> {test_lab} s{seed} [{variant}]",
                           evaluate(labels[te], p, classes), classes), flush=True)
    print(f"wall time {time.perf_counter() - start:.0f} s")
    return 0


def both_labs(args, config, aligner: StageAligner, crops: np.ndarray, df, labels: np.ndarray,
              meta, levels: list[str], start: float) -> None:
    """The both-labs part, the default against ``levels`` too, paired (module docstring)."""
    classes, t = list(config.classes), config.train
    source, keys = df.source.to_numpy(), df.sha256.to_numpy()
    labs = sorted(set(source))
    rows = {lab: np.flatnonzero(source == lab) for lab in labs}
    samples = {lab: crops[crossval.lab_sample(rows[lab], keys)] for lab in labs}
    maps = {"default": {lab: {} for lab in labs},
            ",".join(levels): aligner.lab_maps(samples, levels)}

    def features(images: np.ndarray, lab_maps: dict) -> torch.Tensor:
        out = None
        for lab in labs:
            f = aligner.features(images[rows[lab]], lab_maps[lab])
            out = out if out is not None else torch.empty((len(images), *f.shape[1:]),
                                                          dtype=f.dtype)
            out[torch.from_numpy(rows[lab])] = f
        return out

    settings = AugmentSettings(**config.augment.__dict__)
    views: dict = {name: [] for name in maps}
    for v in range(t.views):  # the views of crossval.augmented_view_features, both ways
        rng = np.random.default_rng([args.view_seed, v])
        images = np.stack([augment(c, rng, settings) for c in crops])
        for name, lab_maps in maps.items():
            views[name].append(features(images, lab_maps))
        logging.info("view %d/%d", v + 1, t.views)
    feats = {name: (torch.stack(views[name]), features(crops, lab_maps))
             for name, lab_maps in maps.items()}
    del views
    print(f"features both ways: {time.perf_counter() - start:.0f} s", flush=True)
    pooled = {name: np.zeros((len(df), len(classes))) for name in maps}
    base = Recipe.from_config(t)
    for fold in range(args.folds):
        roles = train_val_test(meta, folds=args.folds, test_fold=fold,
                               val_fraction=t.val_fraction, seed=0)
        tr, va, te = (np.flatnonzero(roles == r) for r in ("train", "val", "test"))
        for name, (view_feats, original) in feats.items():
            probs, _, _ = crossval.train_and_test(
                aligner.model, view_feats, {"original": original}, labels, tr, va, te, base,
                len(classes), run=fold, labs=source, align=t.align, keys=keys)
            pooled[name][te] = probs["original"]
        print(f"fold {fold}: {time.perf_counter() - start:.0f} s", flush=True)
    for lab in labs:
        for name, probs in pooled.items():
            print(line(f"both labs, {args.folds}-fold, on {lab} [{name}]",
                       evaluate(labels[rows[lab]], probs[rows[lab]], classes), classes))
    print(f"wall time {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    raise SystemExit(main())
