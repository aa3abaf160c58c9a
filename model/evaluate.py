"""Measure the quality of a trained model's samples.

    python -m model.evaluate --weights weights/fashion-unet.safetensors \
        --classifier weights/classifier.safetensors --per-class 500 --sampler dpm++ --steps 20 --guidance 1.25 1.5

Generates ``--per-class`` samples of every class and prints a table: the class accuracy of the
samples (judged by the project's own classifier, per class and overall), and the Frechet
distance between the classifier's features of the samples and of the real test set, beside
the same distance for as many real training images (the floor a perfect model would reach).
``--reference val`` measures against the validation split instead (the 5,000 training images that
training holds out, ``model.data.FashionMNIST.split``), with the floor drawn from the rest: choose
EMA, guidance and sampler settings there, and report the test set once, for the final choice.
Sampler, steps, guidance and guidance interval default to the weights card's "sampling" section,
so a bare ``python -m model.evaluate`` re-measures the shipped configuration.
``--write-card`` stores the figures in the weights card; ``--clip`` adds CLIP similarity and
zero-shot accuracy per class for the samples and for real test images.

    python -m model.evaluate --student weights/fashion-student.safetensors --student-steps 1 2 4

measures a distilled student at its card's sampler and guidance for each step count in the same
run as the teacher, against the same reference and floor, and ends with a table of both.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from model.classifier import load_classifier, predict
from model.cli import add_config_arguments, config_from_args
from model.clip import DEFAULT_MODEL, DEFAULT_PRETRAINED, ClipSpec, evaluate_clip, load_clip
from model.data import CLASS_NAMES, NUM_CLASSES, FashionMNIST, to_model_range
from model.io import (
    CardSampling,
    WeightsError,
    atomic_write_bytes,
    card_guide_path,
    card_sampling,
    load_weights,
    read_card,
    with_guide,
)
from model.machine import DTYPES, autocast, describe, serving_network
from model.metrics import frechet_distance, precision_recall
from model.report import format_comparison, format_table
from model.samplers import SAMPLERS, check_guidance_interval, generators_from_seeds, sample, sampler_named, to_uint8

REFERENCES = ("test", "val")


def generate(
    weights,
    per_class: int,
    sampler: str,
    steps: int,
    guidance: float,
    batch_size: int,
    seed: int = 0,
    precision: str = "float32",
    sigma_min: float | None = None,
):
    """uint8 (10 * per_class, 28, 28) samples and their labels, class by class; seeds are seed, seed+1, ...
    ``precision``: the network's autocast dtype, as the service's FASHION_PRECISION (the sampler stays float32).
    ``sigma_min``: Heun's lowest noise level (None: the sampler's default)."""
    den = dataclasses.replace(weights.denoiser, model=serving_network(weights.model, DTYPES[precision]))  # as served
    device = next(den.model.parameters()).device
    labels = np.repeat(np.arange(NUM_CLASSES), per_class)
    out = []
    for i in range(0, len(labels), batch_size):
        y = torch.from_numpy(labels[i : i + batch_size]).to(device)
        gens = generators_from_seeds(range(seed + i, seed + i + len(y)))
        with autocast(device.type, DTYPES[precision]):
            out.append(to_uint8(sample(den, y, gens, sampler, steps, guidance, sigma_min=sigma_min)))
    return np.concatenate(out), labels


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """One measurement: a network, how it samples, and what its samples are measured against. The fields
    that are not in ``SWEPT`` are options of ``python -m model.evaluate`` as they are; those are swept."""

    weights: str = "weights/fashion-unet.safetensors"  # the network's .safetensors (its card beside it)
    classifier: str = "weights/classifier.safetensors"  # the judge: model/classifier.py's weights
    data_dir: str | None = None  # Fashion-MNIST IDX directory (None: $FASHION_MNIST_DIR)
    per_class: int = 500  # samples of every class
    sampler: str = "dpm++"  # one of model.samplers.SAMPLERS
    steps: int = 20  # sampler steps
    guidance: float = 2.0  # the guidance scale
    guidance_interval: tuple[float, float] | None = None  # guide only where lo < sigma_t <= hi (None: every step)
    guide: str | Path | None = None  # autoguide with these weights instead of the null class (None: classifier-free)
    guide_weight: float = 1.0  # other than 1: classifier-free guidance and the guide both (Denoiser.guide_weight)
    sigma_min: float | None = None  # Heun's lowest noise level (None: the sampler's default)
    batch_size: int = 250  # images per network call
    precision: str = "float32"  # the network's autocast dtype, as the service's FASHION_PRECISION
    reference: str = "test"  # the real images measured against; val: the held-out training images (for choosing)
    val_size: int = 5_000  # reference val: the training images that training held out
    device: str = "cpu"  # torch device of the network, the judge and CLIP
    seed: int = 0  # samples draw seeds seed, seed + 1, ...; the reference subsets draw from it too
    clip: ClipSpec | None = None  # add CLIP similarity and zero-shot accuracy with this CLIP (None: none)

    def __post_init__(self):
        if self.reference not in REFERENCES:
            raise ValueError(f"reference must be one of {', '.join(REFERENCES)}, got {self.reference!r}")
        if self.precision not in DTYPES:
            raise ValueError(f"precision must be one of {', '.join(DTYPES)}, got {self.precision!r}")
        if self.guide is None and self.guide_weight != 1.0:
            raise ValueError("guide_weight (combined guidance) needs a guide")


# Swept by the command line (several values each, or the card's), not one option per field.
SWEPT = ("sampler", "steps", "guidance", "guidance_interval", "guide", "guide_weight", "sigma_min")
NO_OPTION = (*SWEPT, "val_size", "clip")  # fields without an option of their own (--clip builds ``clip``)
CHOICES = {"precision": tuple(DTYPES), "reference": REFERENCES}


def evaluate(cfg: EvalConfig) -> dict:
    """Generate, classify and measure; returns the figures as a dict (see ``format_table``)."""
    device, seed, per_class = cfg.device, cfg.seed, cfg.per_class
    weights = load_weights(cfg.weights, device)
    if cfg.guide is not None:
        weights = with_guide(weights, load_weights(cfg.guide, device))
    denoiser = dataclasses.replace(
        weights.denoiser, guidance_interval=cfg.guidance_interval, guide_weight=cfg.guide_weight
    )
    weights = dataclasses.replace(weights, denoiser=denoiser)
    classifier = load_classifier(cfg.classifier, device)
    data = FashionMNIST.load(cfg.data_dir)

    start = time.perf_counter()
    images, labels = generate(
        weights, per_class, cfg.sampler, cfg.steps, cfg.guidance, cfg.batch_size, seed, cfg.precision, cfg.sigma_min
    )
    gen_seconds = time.perf_counter() - start

    def features(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return predict(classifier, to_model_range(x).to(device))

    probs, feats = features(images)
    test_probs, _ = features(data.test_images)
    rng = np.random.default_rng(seed)
    ref = real_references(features, data, cfg.reference, cfg.val_size, per_class, rng)
    distance, floor = frechet_distance(feats, ref.feats), frechet_distance(ref.floor_feats, ref.feats)
    pred = probs.argmax(1)
    result = {
        "weights": Path(cfg.weights).stem,
        "sampler": cfg.sampler,
        "steps": cfg.steps,
        "guidance": cfg.guidance,
        "guidance_interval": list(cfg.guidance_interval) if cfg.guidance_interval else None,
        "guide": Path(cfg.guide).stem if cfg.guide is not None else None,
        **({"guide_weight": cfg.guide_weight} if cfg.guide_weight != 1.0 else {}),
        **({"sigma_min": cfg.sigma_min} if cfg.sigma_min is not None else {}),
        "precision": cfg.precision,
        "per_class": per_class,
        "accuracy": float((pred == labels).mean()),
        "accuracy_per_class": {CLASS_NAMES[c]: float((pred[labels == c] == c).mean()) for c in range(NUM_CLASSES)},
        "classifier_test_accuracy": float((test_probs.argmax(1) == data.test_labels).mean()),
        "frechet_distance": distance,
        "frechet_distance_real_train": floor,
        "frechet_ratio": distance / floor,
        **coverage(feats, labels, ref, rng),
        "reference": cfg.reference if cfg.reference == "test" else f"val ({cfg.val_size} held-out training images)",
        "generation_seconds": round(gen_seconds, 1),
        "machine": describe(device),
    }
    if cfg.clip is not None:
        # CLIP is slow on a CPU: the real reference is a class-balanced subset of the test set
        # as large as the generated set.
        real = np.concatenate(
            [rng.permutation(np.flatnonzero(data.test_labels == c))[:per_class] for c in range(NUM_CLASSES)]
        )
        generated = {c: images[labels == c] for c in range(NUM_CLASSES)}
        clip = load_clip(cfg.clip)
        result["clip"] = evaluate_clip(clip, generated, data.test_images[real], data.test_labels[real])
    return result


@dataclasses.dataclass(frozen=True)
class References:
    """The real images a run is measured against, in the judge's features."""

    feats: np.ndarray  # (N, F) the reference set: the test set, or the validation split training held out
    labels: np.ndarray  # (N,) their classes
    floor_feats: np.ndarray  # (10 * per_class, F) as many real training images as samples, none in the reference
    floor_per_class: list[np.ndarray]  # [c]: (per_class, F) as many real training images of class c as samples of it


def real_references(
    features: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]],
    data: FashionMNIST,
    reference: str,
    val_size: int,
    per_class: int,
    rng: np.random.Generator,
) -> References:
    """The reference set and the floor sets, drawn without replacement from the training images that
    are not in the reference. ``features(uint8 images) -> (probabilities, features)`` is the judge."""
    if reference == "val":  # the split training used (its default seed): never seen by the network
        (pool, pool_labels), (ref_images, ref_labels) = data.split(val_size)
    else:
        pool, pool_labels, ref_images, ref_labels = (
            data.train_images,
            data.train_labels,
            data.test_images,
            data.test_labels,
        )
    floor_idx = rng.choice(len(pool), size=NUM_CLASSES * per_class, replace=False)
    balanced = [rng.choice(np.flatnonzero(pool_labels == c), size=per_class, replace=False) for c in range(NUM_CLASSES)]
    return References(
        feats=features(ref_images)[1],
        labels=ref_labels,
        floor_feats=features(pool[floor_idx])[1],
        floor_per_class=[features(pool[idx])[1] for idx in balanced],
    )


def coverage(feats: np.ndarray, labels: np.ndarray, ref: References, rng: np.random.Generator) -> dict:
    """Which way the samples are off, in the judge's features: precision and recall against as many
    reference images as samples (the measures depend on the set sizes), for the samples and for the
    real floor set, and the Frechet distance of each class to the reference's images of that class,
    beside that of as many real training images of the class."""
    sub = rng.choice(len(ref.feats), size=min(len(feats), len(ref.feats)), replace=False)
    precision, recall = precision_recall(ref.feats[sub], feats)
    real_precision, real_recall = precision_recall(ref.feats[sub], ref.floor_feats)
    per_class = {}
    for c in range(NUM_CLASSES):
        ref_c = ref.feats[ref.labels == c]
        per_class[CLASS_NAMES[c]] = {
            "frechet_distance": frechet_distance(feats[labels == c], ref_c),
            "frechet_distance_real_train": frechet_distance(ref.floor_per_class[c], ref_c),
        }
    return {
        "precision_recall": {
            "k": 3,
            "precision": precision,
            "recall": recall,
            "precision_real_train": real_precision,
            "recall_real_train": real_recall,
        },
        "frechet_distance_per_class": per_class,
    }


def write_card(weights_path: str | Path, result: dict) -> Path:
    """Store a result in the weights card: its figures as the card's ``quality``, and its sampling as the
    card's default over the rest of the card's ``sampling`` section, which stays (a guide the card names
    for requests that ask for autoguidance, Heun's lowest noise level where the result did not set one).
    An autoguided result makes autoguidance the default; its guide must lie beside the weights."""
    if result.get("guide_weight", 1.0) != 1.0:
        raise ValueError(
            "a card's default guidance is classifier-free or autoguidance, not combined (guide_weight "
            f"{result['guide_weight']}): the service serves no combined guidance"
        )
    card_path = Path(weights_path).with_suffix(".json")
    card = json.loads(card_path.read_text())
    sampling = {
        **(card.get("sampling") or {}),
        "sampler": result["sampler"],
        "steps": result["steps"],
        "guidance": result["guidance"],
        "guidance_interval": result.get("guidance_interval"),
        "guidance_method": "autoguidance" if result.get("guide") else "classifier-free",
    }
    if result.get("guide"):
        guide = Path(weights_path).with_name(result["guide"]).with_suffix(".safetensors")
        if not guide.is_file():
            raise ValueError(f"{card_path} can name only a guide beside the weights, and {guide} is not there")
        sampling["guide"] = result["guide"]
    if result.get("sigma_min") is not None:
        sampling["sigma_min"] = result["sigma_min"]
    card["sampling"] = sampling
    card["quality"] = {k: v for k, v in result.items() if k != "clip"} | {
        "measured_with": "python -m model.evaluate (see README)",
    }
    if "clip" in result:
        card["quality"]["clip"] = result["clip"]
    atomic_write_bytes(card_path, (json.dumps(card, indent=2) + "\n").encode())
    return card_path


def parse_interval(parser: argparse.ArgumentParser, values: list[str] | None, card_interval):
    """--guidance-interval LO HI, 'all' (None) or, when absent, the weights card's interval."""
    if values is None:
        return card_interval
    if values == ["all"]:
        return None
    try:
        lo, hi = (float(v) for v in values)
    except ValueError:
        parser.error(f"--guidance-interval takes two noise levels SIGMA_LO SIGMA_HI or 'all', got {values}")
    try:
        check_guidance_interval(lo, hi)
    except ValueError:
        parser.error(f"--guidance-interval needs 0 <= SIGMA_LO < SIGMA_HI, got {lo} {hi}")
    return lo, hi


def parser() -> argparse.ArgumentParser:
    """One option per field of ``EvalConfig`` outside ``NO_OPTION``; the swept fields take several values
    each (one run per combination) and default to the weights card's; then what to measure beside."""
    p = argparse.ArgumentParser(prog="python -m model.evaluate", description=__doc__.splitlines()[0])
    add_config_arguments(p, EvalConfig, CHOICES, skip=NO_OPTION)
    p.add_argument("--sampler", default=None, choices=SAMPLERS, help="default: the card's, else dpm++")
    p.add_argument("--steps", type=int, default=None, help="default: the card's, else 20")
    p.add_argument(
        "--guidance", type=float, nargs="+", default=None, help="one or more scales; default: the card's, else 1"
    )
    p.add_argument(
        "--guidance-interval",
        nargs="+",
        default=None,
        metavar="SIGMA",
        help="guide only where SIGMA_LO < sigma_t <= SIGMA_HI; 'all': every step; default: the card's interval",
    )
    p.add_argument(
        "--guide",
        nargs="+",
        default=None,
        help="autoguide with these weights (several: one run each); 'none': classifier-free; default: the card's guide "
        "when its sampling.guidance_method is autoguidance",
    )
    p.add_argument(
        "--guide-weight",
        type=float,
        nargs="+",
        default=[1.0],
        help="with --guide: combined guidance, classifier-free at --guidance plus the guide at each of these "
        "weights (several: one run each); 1: autoguidance alone",
    )
    p.add_argument(
        "--sigma-min",
        type=float,
        nargs="+",
        default=None,
        help="with --sampler heun: its lowest noise level, from which it jumps to x0 (several: one run each); "
        "default: the card's sampling.sigma_min, else the schedule's lowest",
    )
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--clip", action="store_true", help="add CLIP similarity and zero-shot accuracy")
    p.add_argument("--clip-model", default=None, help="open_clip model name (default ViT-B-32)")
    p.add_argument("--clip-pretrained", default=None, help="open_clip pretrained tag (default laion2b_s34b_b79k)")
    p.add_argument("--clip-checkpoint", default=None, help="local open_clip checkpoint file")
    p.add_argument("--clip-cache-dir", default=None, help="where downloaded CLIP weights are cached")
    p.add_argument(
        "--baseline",
        nargs="+",
        default=[],
        help="earlier weights measured beside --weights in the same run, each at its own card's sampling",
    )
    p.add_argument("--student", default=None, help="a distilled student's weights, measured beside the teacher")
    p.add_argument("--student-steps", type=int, nargs="+", default=None, help="default: the student card's steps")
    p.add_argument(
        "--write-card",
        action="store_true",
        help="store the (last) result in the weights card, and the student's at its card's steps in its card",
    )
    p.add_argument("--json", default=None, help="also write all results to this JSON file")
    return p


@dataclasses.dataclass(frozen=True)
class Run:
    """One measurement that ``main`` makes."""

    cfg: EvalConfig  # what ``evaluate`` measures
    into_card: bool = False  # --write-card stores this run's result in the network's card


def read_sampling(p: argparse.ArgumentParser, path: str, flag: str) -> tuple[CardSampling, Path | None]:
    """A card's sampling section and the guide it autoguides with by default (None: classifier-free);
    a bad card stops the CLI with a message naming ``flag``."""
    try:
        card = read_card(Path(path))
        sampling = card_sampling(card)
        guide = card_guide_path(path, card)
    except (WeightsError, TypeError, ValueError) as err:
        p.error(f"{flag} {path}: {err}")
    return sampling, guide if sampling.guidance_method == "autoguidance" else None


def plan(p: argparse.ArgumentParser, a: argparse.Namespace) -> list[Run]:
    """Every run the flags ask for, in order: --weights at each combination of the flags (each unset
    flag at the card's value), then each --baseline and the --student at their own cards' sampling."""
    base = dataclasses.replace(config_from_args(EvalConfig, a, skip=NO_OPTION), clip=clip_spec(a))
    card, card_guide = read_sampling(p, a.weights, "--weights")
    sampler = a.sampler or card.sampler
    if a.sigma_min is not None and not sampler_named(sampler).takes_sigma_min:
        p.error(f"--sigma-min is Heun's lowest noise level; the sampler is {sampler}")
    guides = [card_guide] if a.guide is None else [None if g == "none" else g for g in a.guide]
    if a.guide_weight != [1.0] and not any(guides):
        p.error("--guide-weight (combined guidance) needs --guide WEIGHTS")
    interval = parse_interval(p, a.guidance_interval, card.guidance_interval)
    runs = [
        Run(
            dataclasses.replace(
                base,
                sampler=sampler,
                steps=a.steps or card.steps,
                guidance=g,
                guidance_interval=interval,
                guide=guide,
                guide_weight=w if guide is not None else 1.0,
                sigma_min=s,
            )
        )
        for s in a.sigma_min or [card.sigma_min if sampler_named(sampler).takes_sigma_min else None]
        for guide in guides
        for w in (a.guide_weight if guide is not None else [1.0])
        for g in a.guidance or [card.guidance]
    ]
    if a.write_card and runs[-1].cfg.guide_weight != 1.0:
        p.error("--write-card stores the last run as the card's default, which cannot be combined guidance")
    runs[-1] = dataclasses.replace(runs[-1], into_card=a.write_card)

    def at_card(path: str, sampling: CardSampling, guide: Path | None = None, steps: int | None = None) -> EvalConfig:
        """``path`` sampled as its card says (``steps``: other steps), with no combined guidance."""
        return dataclasses.replace(
            base,
            weights=path,
            sampler=sampling.sampler,
            steps=steps or sampling.steps,
            guidance=sampling.guidance,
            guidance_interval=sampling.guidance_interval,
            guide=guide,
            guide_weight=1.0,
            sigma_min=None,
        )

    for path in a.baseline:
        theirs, their_guide = read_sampling(p, path, "--baseline")
        runs.append(Run(at_card(path, theirs, their_guide)))
    if a.student:
        student, _ = read_sampling(p, a.student, "--student")
        steps = a.student_steps or [student.steps]
        mine = steps.index(student.steps) if student.steps in steps else None  # its card takes the card's steps
        for i, n in enumerate(steps):
            runs.append(Run(at_card(a.student, student, steps=n), into_card=a.write_card and i == mine))
    return runs


def clip_spec(a: argparse.Namespace) -> ClipSpec | None:
    """The CLIP model that --clip asks for (None without --clip)."""
    if not a.clip:
        return None
    return ClipSpec(
        model=a.clip_model or DEFAULT_MODEL,
        pretrained=a.clip_pretrained or DEFAULT_PRETRAINED,
        checkpoint=a.clip_checkpoint,
        cache_dir=a.clip_cache_dir,
        device=a.device,
    )


def main(argv: list[str] | None = None) -> int:
    p = parser()
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    runs = plan(p, a)
    results = []
    for run in runs:
        r = evaluate(run.cfg)
        print(format_table(r), end="\n\n", flush=True)
        results.append(r)
    if len(results) > 1:
        print(
            format_comparison([(Path(run.cfg.weights).stem, r) for run, r in zip(runs, results, strict=True)]),
            end="\n\n",
        )
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=2) + "\n")
    for run, r in zip(runs, results, strict=True):
        if run.into_card:
            print(f"wrote quality figures to {write_card(run.cfg.weights, r)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
