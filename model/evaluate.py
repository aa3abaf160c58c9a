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
from pathlib import Path

import numpy as np
import torch

from model.classifier import load_classifier, predict
from model.data import CLASS_NAMES, NUM_CLASSES, FashionMNIST, to_model_range
from model.io import (
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
from model.samplers import SAMPLERS, check_guidance_interval, generators_from_seeds, sample, to_uint8

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


def evaluate(
    weights_path: str | Path,
    classifier_path: str | Path,
    data_dir: str | None = None,
    per_class: int = 500,
    sampler: str = "dpm++",
    steps: int = 20,
    guidance: float = 2.0,
    batch_size: int = 250,
    device: str = "cpu",
    seed: int = 0,
    clip_spec=None,
    guidance_interval: tuple[float, float] | None = None,
    reference: str = "test",
    val_size: int = 5_000,
    precision: str = "float32",
    guide: str | Path | None = None,
    guide_weight: float = 1.0,
    sigma_min: float | None = None,
) -> dict:
    """Generate, classify and measure; returns the figures as a dict (see ``format_table``).
    ``guidance_interval`` replaces the card's (None: guidance at every step). ``reference``: the real
    images the distance is measured against, "test" or "val" (the ``val_size`` images training held out).
    ``guide``: autoguide with these weights instead of the null class (None: classifier-free guidance);
    with a ``guide_weight`` other than 1, guide with both (combined guidance, ``Denoiser.guide_weight``)."""
    if reference not in REFERENCES:
        raise ValueError(f"reference must be one of {', '.join(REFERENCES)}, got {reference!r}")
    if precision not in DTYPES:
        raise ValueError(f"precision must be one of {', '.join(DTYPES)}, got {precision!r}")
    if guide is None and guide_weight != 1.0:
        raise ValueError("guide_weight (combined guidance) needs a guide")
    weights = load_weights(weights_path, device)
    if guide is not None:
        weights = with_guide(weights, load_weights(guide, device))
    weights = dataclasses.replace(
        weights,
        denoiser=dataclasses.replace(weights.denoiser, guidance_interval=guidance_interval, guide_weight=guide_weight),
    )
    classifier = load_classifier(classifier_path, device)
    data = FashionMNIST.load(data_dir)

    start = time.perf_counter()
    images, labels = generate(weights, per_class, sampler, steps, guidance, batch_size, seed, precision, sigma_min)
    gen_seconds = time.perf_counter() - start

    probs, feats = predict(classifier, to_model_range(images).to(device))
    pred = probs.argmax(1)
    test_probs, test_feats = predict(classifier, to_model_range(data.test_images).to(device))
    if reference == "val":  # the split training used (its default seed): never seen by the network
        (pool, pool_labels), (ref_images, ref_labels) = data.split(val_size)
        _, ref_feats = predict(classifier, to_model_range(ref_images).to(device))
    else:
        pool, pool_labels, ref_feats, ref_labels = data.train_images, data.train_labels, test_feats, data.test_labels
    # The floor: as many real training images as samples, drawn without replacement.
    rng = np.random.default_rng(seed)
    real_idx = rng.choice(len(pool), size=len(images), replace=False)
    _, real_feats = predict(classifier, to_model_range(pool[real_idx]).to(device))
    distance, floor = frechet_distance(feats, ref_feats), frechet_distance(real_feats, ref_feats)
    # Each class's floor: as many real training images of that class as samples of it.
    balanced = [rng.choice(np.flatnonzero(pool_labels == c), size=per_class, replace=False) for c in range(NUM_CLASSES)]
    per_class_floor = [predict(classifier, to_model_range(pool[idx]).to(device))[1] for idx in balanced]

    result = {
        "weights": Path(weights_path).stem,
        "sampler": sampler,
        "steps": steps,
        "guidance": guidance,
        "guidance_interval": list(guidance_interval) if guidance_interval else None,
        "guide": Path(guide).stem if guide is not None else None,
        **({"guide_weight": guide_weight} if guide_weight != 1.0 else {}),
        **({"sigma_min": sigma_min} if sigma_min is not None else {}),
        "precision": precision,
        "per_class": per_class,
        "accuracy": float((pred == labels).mean()),
        "accuracy_per_class": {CLASS_NAMES[c]: float((pred[labels == c] == c).mean()) for c in range(NUM_CLASSES)},
        "classifier_test_accuracy": float((test_probs.argmax(1) == data.test_labels).mean()),
        "frechet_distance": distance,
        "frechet_distance_real_train": floor,
        "frechet_ratio": distance / floor,
        **coverage(feats, labels, real_feats, ref_feats, ref_labels, per_class_floor, rng),
        "reference": reference if reference == "test" else f"val ({val_size} held-out training images)",
        "generation_seconds": round(gen_seconds, 1),
        "machine": describe(device),
    }
    if clip_spec is not None:
        from model.clip import evaluate_clip, load_clip

        # CLIP is slow on a CPU: the real reference is a class-balanced subset of the test set
        # as large as the generated set.
        real = np.concatenate(
            [rng.permutation(np.flatnonzero(data.test_labels == c))[:per_class] for c in range(NUM_CLASSES)]
        )
        generated = {c: images[labels == c] for c in range(NUM_CLASSES)}
        clip = load_clip(clip_spec)
        result["clip"] = evaluate_clip(clip, generated, data.test_images[real], data.test_labels[real])
    return result


def coverage(
    feats: np.ndarray,
    labels: np.ndarray,
    real_feats: np.ndarray,
    ref_feats: np.ndarray,
    ref_labels: np.ndarray,
    per_class_floor: list[np.ndarray],
    rng: np.random.Generator,
) -> dict:
    """Which way the samples are off, in the judge's features: precision and recall against as many
    reference images as samples (the measures depend on the set sizes), for the samples and for the
    real floor set, and the Frechet distance of each class to the reference's images of that class,
    beside that of as many real training images of the class (``per_class_floor[c]``)."""
    sub = rng.choice(len(ref_feats), size=min(len(feats), len(ref_feats)), replace=False)
    precision, recall = precision_recall(ref_feats[sub], feats)
    real_precision, real_recall = precision_recall(ref_feats[sub], real_feats)
    per_class = {}
    for c in range(NUM_CLASSES):
        ref_c = ref_feats[ref_labels == c]
        per_class[CLASS_NAMES[c]] = {
            "frechet_distance": frechet_distance(feats[labels == c], ref_c),
            "frechet_distance_real_train": frechet_distance(per_class_floor[c], ref_c),
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
    card_path = Path(weights_path).with_suffix(".json")
    card = json.loads(card_path.read_text())
    card["quality"] = {k: v for k, v in result.items() if k != "clip"} | {
        "measured_with": "python -m model.evaluate (see README)",
    }
    if "clip" in result:
        card["quality"]["clip"] = result["clip"]
    card["sampling"] = {
        "sampler": result["sampler"],
        "steps": result["steps"],
        "guidance": result["guidance"],
        "guidance_interval": result.get("guidance_interval"),
        **({"guide": result["guide"]} if result.get("guide") else {}),
    }
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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m model.evaluate", description=__doc__.splitlines()[0])
    p.add_argument("--weights", default="weights/fashion-unet.safetensors")
    p.add_argument("--classifier", default="weights/classifier.safetensors")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--per-class", type=int, default=500)
    p.add_argument("--sampler", default=None, choices=SAMPLERS, help="default: the card's, else dpm++")
    p.add_argument("--steps", type=int, default=None, help="default: the card's, else 20")
    p.add_argument(
        "--guidance",
        type=float,
        nargs="+",
        default=None,
        help="one or more scales to compare; default: the card's, else 1",
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
    p.add_argument("--batch-size", type=int, default=250)
    p.add_argument("--precision", choices=list(DTYPES), default="float32", help="the network's autocast dtype")
    p.add_argument(
        "--reference", choices=REFERENCES, default="test", help="val: the held-out training images (for choosing)"
    )
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
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
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    try:
        card = read_card(Path(a.weights))
    except WeightsError as err:
        p.error(str(err))
    try:
        from_card = card_sampling(card)
    except (TypeError, ValueError) as err:
        p.error(f"the weights card's sampling section is invalid ({err})")
    interval = parse_interval(p, a.guidance_interval, from_card.guidance_interval)
    sampler = a.sampler or from_card.sampler
    steps = a.steps or from_card.steps
    guidances = a.guidance or [from_card.guidance]
    try:
        card_guide = card_guide_path(a.weights, card)
    except WeightsError as err:
        p.error(str(err))
    by_card = card_guide if from_card.guidance_method == "autoguidance" else None
    guides: list[str | Path | None] = [by_card] if a.guide is None else [None if g == "none" else g for g in a.guide]
    clip_spec = None
    if a.clip:
        from model.clip import DEFAULT_MODEL, DEFAULT_PRETRAINED, ClipSpec

        clip_spec = ClipSpec(
            model=a.clip_model or DEFAULT_MODEL,
            pretrained=a.clip_pretrained or DEFAULT_PRETRAINED,
            checkpoint=a.clip_checkpoint,
            cache_dir=a.clip_cache_dir,
            device=a.device,
        )
    baselines = []  # (path, its card's sampling, its guide: autoguided only where its card says so)
    for path in a.baseline:
        try:
            their_card = read_card(Path(path))
            theirs = card_sampling(their_card)
            their_guide = card_guide_path(path, their_card) if theirs.guidance_method == "autoguidance" else None
        except (WeightsError, TypeError, ValueError) as err:
            p.error(f"--baseline {path}: {err}")
        baselines.append((path, theirs, their_guide))
    student = None
    if a.student:
        try:
            student = card_sampling(read_card(Path(a.student)))
        except (WeightsError, TypeError, ValueError) as err:
            p.error(f"--student: {err}")

    if a.guide_weight != [1.0] and not any(guides):
        p.error("--guide-weight (combined guidance) needs --guide WEIGHTS")

    if a.sigma_min is not None and sampler != "heun":
        p.error(f"--sigma-min is Heun's lowest noise level; the sampler is {sampler}")
    sigma_mins = a.sigma_min or [from_card.sigma_min if sampler == "heun" else None]

    def run(
        weights: str, sampler: str, steps: int, guidance: float, interval, guide=None, guide_weight=1.0, sigma_min=None
    ) -> dict:
        r = evaluate(
            weights,
            a.classifier,
            a.data_dir,
            a.per_class,
            sampler,
            steps,
            guidance,
            a.batch_size,
            a.device,
            a.seed,
            clip_spec,
            interval,
            a.reference,
            precision=a.precision,
            guide=guide,
            guide_weight=guide_weight,
            sigma_min=sigma_min,
        )
        print(format_table(r), end="\n\n", flush=True)
        return r

    results = [
        run(a.weights, sampler, steps, g, interval, guide, w if guide is not None else 1.0, s)
        for s in sigma_mins
        for guide in guides
        for w in (a.guide_weight if guide is not None else [1.0])
        for g in guidances
    ]
    rows = [(Path(a.weights).stem, r) for r in results]
    teacher_runs = len(results)
    for path, theirs, their_guide in baselines:  # at their cards' sampling
        r = run(path, theirs.sampler, theirs.steps, theirs.guidance, theirs.guidance_interval, their_guide)
        results.append(r)
        rows.append((Path(path).stem, r))
    if student is not None:
        for n in a.student_steps or [student.steps]:
            r = run(a.student, student.sampler, n, student.guidance, student.guidance_interval)
            results.append(r)
            rows.append((Path(a.student).stem, r))
    if len(rows) > 1:
        print(format_comparison(rows), end="\n\n")
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=2) + "\n")
    if a.write_card:
        print(f"wrote quality figures to {write_card(a.weights, results[teacher_runs - 1])}")
        mine = [
            r for r in results[teacher_runs + len(baselines) :] if student is not None and r["steps"] == student.steps
        ]
        if mine:
            print(f"wrote quality figures to {write_card(a.student, mine[0])}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
