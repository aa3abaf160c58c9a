"""How good the edits are, and what they cost: variations (SDEdit) over a strength sweep, inpainting with four
masks by replacement, RePaint's resampling and the student, and the time of an edit against a generation.

    OMP_NUM_THREADS=1 python -m model.edit_eval --out runs/edit_eval/edit_eval.json --figures docs

Every edit starts from a held-out test image and is prompted with its true class. The judge is the project's
classifier (``model.classifier``): its argmax against the true class is the accuracy, its features carry the
Frechet distance to the test images that were not edited. A variation's faithfulness is its mean absolute
pixel difference to its input (0-255). The networks run as the service runs them (``serving_network`` in the
autocast dtype of ``precision``), each at its card's sampler, steps and guidance unless a method says
otherwise. Inpainting methods are also compared pairwise with the replacement on RePaint's grid, with paired
bootstrap intervals (``compare``). The results (JSON, and every cell's images in an .npz beside it) are
written after every measured cell, and a rerun with the same measurement settings resumes from them;
``--from-json`` prints the tables and draws the pictures of a finished file. docs/editing_quality.md reads them.
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from model.atomic import atomic_path, atomic_write_bytes
from model.classifier import load_classifier, predict
from model.cli import add_config_arguments, config_from_args
from model.data import CLASS_NAMES, NUM_CLASSES, FashionMNIST, to_model_range
from model.editing import RePaint, start_from_image, start_inpainting
from model.io import card_sampling, load_weights
from model.machine import DTYPES, autocast, describe, serving_network
from model.metrics import frechet_distance
from model.samplers import Denoiser, SamplerState, generators_from_seeds, kept_steps, run, start, to_uint8

SIDE = 28  # Fashion-MNIST's images are SIDE x SIDE
SECTIONS = ("variations", "inpainting", "speed")
Judge = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]  # uint8 (N, 28, 28) -> (probabilities, features)

# --- masks (1: generate, 0: keep) --------------------------------------------------------------------------


def box(n: int, seed: int) -> np.ndarray:
    """A centred 14x14 box: a quarter of the image, the garment's middle."""
    m = np.zeros((n, SIDE, SIDE), bool)
    m[:, 7:21, 7:21] = True
    return m


def left_half(n: int, seed: int) -> np.ndarray:
    m = np.zeros((n, SIDE, SIDE), bool)
    m[:, :, : SIDE // 2] = True
    return m


def top_half(n: int, seed: int) -> np.ndarray:
    m = np.zeros((n, SIDE, SIDE), bool)
    m[:, : SIDE // 2] = True
    return m


def brush(n: int, seed: int) -> np.ndarray:
    """Two to four free-hand strokes per image, each a chain of 3-6 segments of 3-7 px that turn by N(0, 0.8)
    rad, drawn with a round brush of radius 1.2-2.2 px (about a quarter of the image). Image i draws from
    its own generator seeded (seed, i), so a mask depends on its seed and its place alone."""
    yy, xx = np.mgrid[:SIDE, :SIDE]
    out = np.zeros((n, SIDE, SIDE), bool)
    for i in range(n):
        rng = np.random.default_rng([seed, i])
        for _ in range(rng.integers(2, 5)):
            p, angle, radius = rng.uniform(4, SIDE - 4, size=2), rng.uniform(0, 2 * np.pi), rng.uniform(1.2, 2.2)
            for _ in range(rng.integers(3, 7)):
                angle += rng.normal(0, 0.8)
                q = np.clip(p + rng.uniform(3, 7) * np.array([np.cos(angle), np.sin(angle)]), 0, SIDE - 1)
                for c in p + np.linspace(0, 1, 12)[:, None] * (q - p):  # points along the segment, 0.5 px apart
                    out[i] |= (yy - c[0]) ** 2 + (xx - c[1]) ** 2 <= radius**2
                p = q
    return out


@dataclass(frozen=True)
class Mask:
    description: str
    draw: Callable[[int, int], np.ndarray]  # (n, seed) -> bool (n, 28, 28), True where the image is generated


MASKS: dict[str, Mask] = {
    "box": Mask("centre box 14x14", box),
    "left": Mask("left half", left_half),
    "top": Mask("top half", top_half),
    "brush": Mask("brush strokes (seeded)", brush),
}

# --- inpainting methods ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Inpainter:
    """One way to inpaint: a network, its sampler and steps (None: its card's), DDIM's eta, RePaint's
    resampling (None: the merge alone, Lugmayr et al. 2022, eq. 8)."""

    network: str  # "teacher" or "student"
    sampler: str | None = None
    steps: int | None = None
    eta: float | None = None  # None: 0, or 1 under RePaint
    repaint: RePaint | None = None


def parse_repaint(text: str) -> RePaint:
    """``JUMPxRESAMPLINGS`` (e.g. 2x3) -> RePaint(jump_length, resamplings)."""
    try:
        j, r = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"a RePaint setting is JUMPxRESAMPLINGS, e.g. 2x3; got {text!r}") from None
    return RePaint(j, r)


def inpainters(cards: dict[str, tuple[str, int]], steps: int, repaints: Sequence[str]) -> dict[str, Inpainter]:
    """The methods compared, by name, for the networks in ``cards`` (name -> its card's sampler and steps): the
    service's default (the teacher's card sampler with the merge), the merge alone on the ddim grid RePaint runs
    on (at eta 1 it is RePaint without resampling), RePaint on that grid at each setting, and the student
    (consistency models' alg. 4)."""
    sampler, n = cards["teacher"]
    methods = {
        f"teacher, {sampler} {n}, replacement": Inpainter("teacher"),
        f"teacher, ddim {steps} eta 1, replacement": Inpainter("teacher", "ddim", steps, eta=1.0),
    }
    for text in repaints:
        rp = parse_repaint(text)
        methods[f"teacher, ddim {steps}, RePaint j={rp.jump_length} r={rp.resamplings}"] = Inpainter(
            "teacher", "ddim", steps, repaint=rp
        )
    if "student" in cards:
        sampler, n = cards["student"]
        methods[f"student, {sampler} {n} (alg. 4)"] = Inpainter("student")
    return methods


# --- the configuration -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EditEvalConfig:
    """One measurement of the edits. The fields before ``out`` decide the numbers; a rerun with the same ones
    resumes from the cells its JSON already holds."""

    teacher: str = "weights/fashion-unet.safetensors"  # the teacher, sampled as its card says
    student: str = "weights/fashion-student.safetensors"  # the consistency student ("": none)
    classifier: str = "weights/classifier.safetensors"  # the judge: model/classifier.py's weights
    data_dir: str | None = None  # Fashion-MNIST IDX directory (None: $FASHION_MNIST_DIR)
    per_class: int = 20  # test images of each class turned into variations
    inpaint_per_class: int = 10  # of those, the first of each class that every mask and method inpaints
    strengths: tuple[float, ...] = (0.25, 0.5, 0.75, 1.0)  # variations' strengths (SDEdit's t0 / T)
    masks: tuple[str, ...] = tuple(MASKS)  # inpainting masks, names of MASKS
    inpaint_steps: int = 20  # the ddim grid of the replacement baseline and of RePaint
    repaints: tuple[str, ...] = ("2x3", "5x5")  # RePaint settings on that grid, JUMPxRESAMPLINGS
    speed_batch: int = 25  # images in each timed batch of the speed table
    speed_repeats: int = 3  # timings of each entry, interleaved; the least is kept
    batch_size: int = 50  # images per network call (a guided image takes two rows)
    precision: str = "bfloat16"  # the network's autocast dtype, as the service's FASHION_PRECISION
    device: str = "cpu"  # torch device of the networks and the judge
    threads: int = 1  # torch CPU threads
    seed: int = 0  # input i draws its noise from seed + i; the choice of inputs and brush masks from seed
    out: str = "runs/edit_eval/edit_eval.json"  # the results, rewritten (atomically) after every cell
    figures: str = "docs"  # where edit_variations.png and edit_inpainting.png go ("": none)
    sections: tuple[str, ...] = SECTIONS  # what to measure: variations, inpainting, speed

    def __post_init__(self):
        if self.inpaint_per_class > self.per_class:
            raise ValueError(f"inpaint_per_class ({self.inpaint_per_class}) must be <= per_class ({self.per_class})")
        if unknown := set(self.masks) - set(MASKS) or set(self.sections) - set(SECTIONS):
            raise ValueError(f"unknown masks or sections {sorted(unknown)}; masks: {list(MASKS)}, sections: {SECTIONS}")
        for text in self.repaints:
            parse_repaint(text)
        if self.precision not in DTYPES:
            raise ValueError(f"precision must be one of {', '.join(DTYPES)}, got {self.precision!r}")

    def measurement(self) -> dict:
        """The fields that decide the numbers, as JSON: what a resumed run must share."""
        fields = dataclasses.asdict(self)
        return json.loads(json.dumps({k: v for k, v in fields.items() if k not in ("out", "figures", "sections")}))


# --- networks, inputs and the judge ------------------------------------------------------------------------


@dataclass(frozen=True)
class Network:
    """A network as served, with its card's sampling."""

    name: str
    denoiser: Denoiser
    sampler: str
    steps: int
    guidance: float
    dtype: torch.dtype


def load_network(name: str, path: str, cfg: EditEvalConfig) -> Network:
    weights = load_weights(path, cfg.device)
    card = card_sampling(weights.card)
    dtype = DTYPES[cfg.precision]
    den = dataclasses.replace(weights.denoiser, model=serving_network(weights.model, dtype))
    return Network(name, den, card.sampler, card.steps, card.guidance, dtype)


def choose_inputs(labels: np.ndarray, per_class: int, rng: np.random.Generator) -> np.ndarray:
    """Indices of ``per_class`` random images of every class, class by class."""
    return np.concatenate([rng.permutation(np.flatnonzero(labels == c))[:per_class] for c in range(NUM_CLASSES)])


def first_per_class(labels: np.ndarray, k: int) -> np.ndarray:
    """Positions of the first ``k`` entries of each class in ``labels``."""
    return np.concatenate([np.flatnonzero(labels == c)[:k] for c in range(NUM_CLASSES)])


FLOOR_DRAWS = 20  # real subsets drawn to measure how much FD moves with the draw alone


def floors(judge: Judge, inputs: np.ndarray, labels: np.ndarray, pool: np.ndarray, pool_labels: np.ndarray, ref, rng):
    """What real images score at this size, against the reference ``ref`` (the judge's features of ``pool``).
    ``identity``: the inputs themselves (an edit that returned its input: the rows' own floor); ``real_mean``
    and ``real_sd``: as many class-balanced images of the pool against the rest of it, over FLOOR_DRAWS draws
    (the spread is how far two rows may differ by the draw alone); ``two_subsets``: two disjoint class-balanced
    real sets of as many images each; ``same_class_faithfulness``: the mean |difference| between each input and
    another real image of its class, the faithfulness of an edit that kept nothing of its input."""
    probs, feats = judge(inputs)
    k = len(inputs) // NUM_CLASSES
    a = choose_inputs(pool_labels, 2 * k, rng).reshape(NUM_CLASSES, 2 * k)
    other = np.array([rng.choice(np.flatnonzero(pool_labels == c)) for c in labels])
    draws = []
    for _ in range(FLOOR_DRAWS):
        drawn = choose_inputs(pool_labels, k, rng)
        draws.append(frechet_distance(ref[drawn], np.delete(ref, drawn, axis=0)))
    return {
        "images": len(inputs),
        "identity": frechet_distance(feats, ref),
        "real_mean": float(np.mean(draws)),
        "real_sd": float(np.std(draws, ddof=1)),
        "two_subsets": frechet_distance(ref[a[:, :k].ravel()], ref[a[:, k:].ravel()]),
        "judge_accuracy": float((probs.argmax(1) == labels).mean()),
        "same_class_faithfulness": mean_abs(inputs, pool[other]),
    }


def mean_abs(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


def encode(images: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(images, np.uint8).tobytes()).decode()


def decode(text: str) -> np.ndarray:
    return np.frombuffer(base64.b64decode(text), np.uint8).reshape(-1, SIDE, SIDE)


# --- running edits and scoring them ------------------------------------------------------------------------

Starter = Callable[[list[torch.Generator], torch.Tensor, slice], SamplerState]  # (generators, x0, rows) -> state


def edit(net: Network, images: np.ndarray, labels: np.ndarray, starter: Starter, cfg: EditEvalConfig) -> dict:
    """Every image run from ``starter``'s state to the end in batches, image i on seed + i: the uint8 edits,
    the network evaluations per image (before guidance's reference rows) and rows per image (with them),
    and the wall-clock seconds per image."""
    out, evals, rows = [], 0, 0
    began = time.perf_counter()
    for i in range(0, len(images), cfg.batch_size):
        rows_i = slice(i, i + cfg.batch_size)
        x0 = to_model_range(images[rows_i]).to(cfg.device)  # (B, 1, 28, 28) in [-1, 1]
        gens = generators_from_seeds(range(cfg.seed + i, cfg.seed + i + len(x0)))
        state = starter(gens, x0, rows_i)
        evals = len(state.timesteps)
        rows = sum(1 + net.denoiser.needs_null_row(t, net.guidance) for t in state.timesteps)
        y = torch.from_numpy(labels[rows_i]).to(cfg.device)
        with autocast(torch.device(cfg.device).type, net.dtype):
            out.append(to_uint8(run(net.denoiser, state, y, net.guidance, autoguide=False)))
    seconds = time.perf_counter() - began
    return {"images": np.concatenate(out), "evaluations": evals, "rows": rows, "seconds": seconds / len(images)}


def score(edited: dict, inputs: np.ndarray, labels: np.ndarray, judge: Judge, ref: np.ndarray, shown) -> dict:
    """A cell of the tables: faithfulness, Frechet distance to the reference, accuracy, cost, examples."""
    probs, feats = judge(edited["images"])
    return {
        "faithfulness": mean_abs(edited["images"], inputs),
        "frechet_distance": frechet_distance(feats, ref),
        "accuracy": float((probs.argmax(1) == labels).mean()),
        "evaluations": edited["evaluations"],
        "rows": edited["rows"],
        "seconds_per_image": round(edited["seconds"], 4),
        "examples": encode(edited["images"][shown]),
    }


def variation_starter(net: Network, strength: float) -> Starter:
    def starter(gens, x0, rows):
        return start_from_image(net.sampler, net.denoiser.schedule, net.steps, gens, x0, strength)

    return starter


def inpaint_starter(net: Network, method: Inpainter, masks: torch.Tensor) -> Starter:
    sampler, steps = method.sampler or net.sampler, method.steps or net.steps

    def starter(gens, x0, rows):
        m = masks[rows].to(x0.device)  # (B, 1, 28, 28)
        return start_inpainting(
            sampler, net.denoiser.schedule, steps, gens, x0, m, eta=method.eta, repaint=method.repaint
        )

    return starter


def time_edits(net: Network, images: np.ndarray, labels: np.ndarray, strengths: Sequence[float], cfg) -> dict:
    """Seconds per image of a generation (from pure noise) and of a variation at each strength, on the same
    batch of ``speed_batch`` images and seeds, one after another ``speed_repeats`` times; the least of each."""
    batch = slice(0, cfg.speed_batch)
    images, labels = images[batch], labels[batch]

    def generation(gens, x0, rows):
        return start(net.sampler, net.denoiser.schedule, net.steps, gens, tuple(x0.shape[1:]), x0.device)

    entries: dict[str, Starter] = {"generation": generation}
    entries |= {f"{s:g}": variation_starter(net, s) for s in strengths if runs_at(net, s)}
    timed: dict[str, list[float]] = {name: [] for name in entries}
    one_batch = dataclasses.replace(cfg, batch_size=len(images))
    cost = {}
    for _ in range(cfg.speed_repeats):
        for name, starter in entries.items():
            e = edit(net, images, labels, starter, one_batch)
            timed[name].append(e["seconds"])
            cost[name] = e["evaluations"]
    gen = min(timed["generation"])
    return {
        name: {
            "evaluations": cost[name],
            "seconds_per_image": min(t),
            "time_ratio": min(t) / gen,
            "evaluation_ratio": cost[name] / cost["generation"],
        }
        for name, t in timed.items()
    }


def runs_at(net: Network, strength: float) -> bool:
    """Whether ``strength`` keeps at least one of the network's steps (``samplers.kept_steps``)."""
    try:
        kept_steps(net.steps, strength)
    except ValueError:
        return False
    return True


# --- the measurement ---------------------------------------------------------------------------------------


def say(line: str) -> None:
    print(line, flush=True)


class Store:
    """The results (JSON) and every cell's edited images (an .npz beside it), both rewritten atomically after
    each cell; a rerun with the same measurement settings resumes from them, another starts over."""

    def __init__(self, path: Path, config: dict, log: Callable[[str], None]):
        self.path, self.images_path, self.log = path, path.with_suffix(".npz"), log
        self.results = json.loads(path.read_text()) if path.exists() else {}
        fresh = self.results.get("config") != config
        if fresh:
            self.results = {"config": config}
        self.images = {} if fresh or not self.images_path.exists() else dict(np.load(self.images_path))
        self.before = self.results.get("seconds", 0.0)  # spent by the runs this one resumes
        self.began = time.perf_counter()

    def has(self, *keys: str) -> bool:
        node = self.results
        for k in keys:
            if k not in node:
                return False
            node = node[k]
        return True

    def put(self, cell: dict, *keys: str, images: np.ndarray | None = None) -> None:
        node = self.results
        for k in keys[:-1]:
            node = node.setdefault(k, {})
        node[keys[-1]] = cell
        if images is not None:
            self.images["/".join(keys)] = images
            with atomic_path(self.images_path) as tmp, open(tmp, "wb") as f:
                np.savez_compressed(f, **self.images)
        self.write()
        self.log(f"[{time.perf_counter() - self.began:7.0f} s] {' / '.join(keys)}: {brief(cell)}")

    def write(self) -> None:
        self.results["seconds"] = round(self.before + time.perf_counter() - self.began, 1)
        atomic_write_bytes(self.path, (json.dumps(self.results, indent=1) + "\n").encode())


@dataclass(frozen=True)
class Inputs:
    """Test images to edit, the judge, and the real images they are measured against."""

    images: np.ndarray  # uint8 (N, 28, 28), class by class
    labels: np.ndarray  # (N,) the true classes, the prompts
    judge: Judge
    ref: np.ndarray  # (M, F) the judge's features of the test images that are not edited
    shown: np.ndarray  # positions of the examples the results keep: the first of each class

    def subset(self, positions: np.ndarray) -> Inputs:
        labels = self.labels[positions]
        return dataclasses.replace(self, images=self.images[positions], labels=labels, shown=first_per_class(labels, 1))

    def score(self, edited: dict) -> dict:
        return score(edited, self.images, self.labels, self.judge, self.ref, self.shown)


def measure_variations(store: Store, nets: dict[str, Network], inputs: Inputs, cfg: EditEvalConfig) -> None:
    for name, net in nets.items():
        for s in cfg.strengths:
            if store.has("variations", name, f"{s:g}"):
                continue
            if not runs_at(net, s):
                store.put({"skipped": f"keeps none of {net.steps} steps"}, "variations", name, f"{s:g}")
                continue
            edited = edit(net, inputs.images, inputs.labels, variation_starter(net, s), cfg)
            store.put(inputs.score(edited), "variations", name, f"{s:g}", images=edited["images"])


def measure_inpainting(store: Store, nets: dict[str, Network], inputs: Inputs, cfg: EditEvalConfig) -> None:
    """Every mask by every method, then each method against the replacement RePaint runs on (``compare``)."""
    methods = inpainters({n: (net.sampler, net.steps) for n, net in nets.items()}, cfg.inpaint_steps, cfg.repaints)
    baseline = f"teacher, ddim {cfg.inpaint_steps} eta 1, replacement"
    for mask_name in cfg.masks:
        masks = MASKS[mask_name].draw(len(inputs.images), cfg.seed)
        store.results.setdefault("masks", {})[mask_name] = {
            "description": MASKS[mask_name].description,
            "area": float(masks.mean()),
            "examples": encode(masks[inputs.shown].astype(np.uint8)),
        }
        mask_t = torch.from_numpy(masks).unsqueeze(1).float()  # (N, 1, 28, 28)
        for label, method in methods.items():
            if store.has("inpainting", mask_name, label):
                continue
            net = nets[method.network]
            edited = edit(net, inputs.images, inputs.labels, inpaint_starter(net, method, mask_t), cfg)
            cell = inputs.score(edited) | {
                "kept_exact": bool((edited["images"][~masks] == inputs.images[~masks]).all())
            }
            store.put(cell, "inpainting", mask_name, label, images=edited["images"])
        keys = {m: f"inpainting/{mask_name}/{m}" for m in methods}
        if all(k in store.images for k in keys.values()):
            edits = {m: store.images[k] for m, k in keys.items()}
            rng = np.random.default_rng([cfg.seed, 2])
            store.results.setdefault("comparisons", {})[mask_name] = compare(edits, baseline, inputs, masks, rng)
    store.write()


def measure(cfg: EditEvalConfig, log: Callable[[str], None] = say, data: FashionMNIST | None = None) -> dict:
    """Measure every cell ``cfg.sections`` asks for that ``cfg.out`` does not already hold, writing the results
    after each; the results as a dict. ``data``: the images (None: loaded from ``cfg.data_dir``)."""
    store = Store(Path(cfg.out), cfg.measurement(), log)
    data = data or FashionMNIST.load(cfg.data_dir)
    classifier = load_classifier(cfg.classifier, cfg.device)

    def judge(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return predict(classifier, to_model_range(images).to(cfg.device))

    chosen = choose_inputs(data.test_labels, cfg.per_class, np.random.default_rng(cfg.seed))
    rest = np.setdiff1d(np.arange(len(data.test_labels)), chosen)
    pool, pool_labels = data.test_images[rest], data.test_labels[rest]
    labels = data.test_labels[chosen]
    inputs = Inputs(data.test_images[chosen], labels, judge, judge(pool)[1], first_per_class(labels, 1))
    inpaint = inputs.subset(first_per_class(labels, cfg.inpaint_per_class))
    nets = {"teacher": load_network("teacher", cfg.teacher, cfg)}
    if cfg.student:
        nets["student"] = load_network("student", cfg.student, cfg)
    rng = np.random.default_rng([cfg.seed, 1])
    store.results |= {
        "machine": describe(cfg.device, cfg.threads),
        "precision": cfg.precision,
        "reference": f"the {len(rest)} test images not edited",
        "sampling": {n: {"sampler": v.sampler, "steps": v.steps, "guidance": v.guidance} for n, v in nets.items()},
        "examples": {"labels": labels[inputs.shown].tolist(), "inputs": encode(inputs.images[inputs.shown])},
        "floors": {
            name: floors(judge, x.images, x.labels, pool, pool_labels, inputs.ref, rng)
            for name, x in (("variations", inputs), ("inpainting", inpaint))
        },
    }
    if "variations" in cfg.sections:
        measure_variations(store, nets, inputs, cfg)
    if "inpainting" in cfg.sections:
        measure_inpainting(store, nets, inpaint, cfg)
    if "speed" in cfg.sections:
        for name, net in nets.items():
            if not store.has("speed", name):
                store.put(time_edits(net, inputs.images, inputs.labels, cfg.strengths, cfg), "speed", name)
    store.write()
    return store.results


BOOTSTRAP_DRAWS = 400  # resamplings of the images for the comparisons' intervals


def same_moments(feats: np.ndarray) -> np.ndarray:
    """2D points with exactly the mean and covariance (ddof 1) of ``feats`` (N, D): mu +- c_i v_i along each
    eigenvector v_i of the covariance. The Frechet distance sees a set only through those two moments, so a
    distance to these points is the distance to ``feats``, without its covariance computed again each time."""
    mu = feats.mean(0)
    w, v = np.linalg.eigh(np.cov(feats, rowvar=False))
    arms = (v * np.sqrt(np.clip(w, 0, None) * (2 * len(w) - 1) / 2)).T  # (D, D): row i is c_i v_i
    return np.concatenate([mu + arms, mu - arms])


def compare(edits: dict[str, np.ndarray], baseline: str, inputs: Inputs, masks: np.ndarray, rng) -> dict:
    """Each method minus the baseline on the same inputs and seeds: its FD, its accuracy and its mean absolute
    difference to the hidden original inside the mask, each with a 95% interval from a paired bootstrap (the
    images resampled with replacement, the same draw for both methods)."""
    ref = same_moments(inputs.ref)
    n = len(inputs.labels)
    picks = rng.integers(0, n, size=(BOOTSTRAP_DRAWS, n))
    hidden = masks.reshape(n, -1).sum(1)  # (N,) pixels generated in each image
    judged = {name: inputs.judge(images) for name, images in edits.items()}
    right = {name: (probs.argmax(1) == inputs.labels).astype(float) for name, (probs, _) in judged.items()}
    moved = {name: np.abs(im.astype(np.int16) - inputs.images).reshape(n, -1).sum(1) for name, im in edits.items()}

    def paired(diff: Callable[[np.ndarray], float]) -> dict:
        draws = [diff(p) for p in picks]
        return {"difference": float(diff(np.arange(n))), "interval": np.percentile(draws, [2.5, 97.5]).tolist()}

    def fd(name: str, p: np.ndarray) -> float:
        return frechet_distance(judged[name][1][p], ref)

    def error(name: str, p: np.ndarray) -> float:
        return moved[name][p].sum() / hidden[p].sum()

    return {
        name: {
            "baseline": baseline,
            "fd": paired(lambda p: fd(name, p) - fd(baseline, p)),  # noqa: B023 (used at once)
            "accuracy": paired(lambda p: right[name][p].mean() - right[baseline][p].mean()),  # noqa: B023
            "mask_error": paired(lambda p: error(name, p) - error(baseline, p)),  # noqa: B023
        }
        for name in edits
        if name != baseline
    }


def brief(cell: dict) -> str:
    keys = ("faithfulness", "frechet_distance", "accuracy", "evaluations", "seconds_per_image")
    return ", ".join(f"{k} {cell[k]:.4g}" for k in keys if k in cell) or json.dumps(cell)[:200]


# --- tables and pictures -----------------------------------------------------------------------------------


# Each table's columns: (header, the value of a row's cell), cells as ``measure`` writes them.
Column = tuple[str, Callable[[dict], object]]
FLOOR_COLUMNS: list[Column] = [
    ("images", lambda f: f["images"]),
    ("FD (identity edit)", lambda f: f["identity"]),
    ("FD of other real sets of that size, mean +- sd", lambda f: f"{f['real_mean']:.3g} +- {f['real_sd']:.2g}"),
    ("FD, two disjoint real sets", lambda f: f["two_subsets"]),
    ("judge accuracy", lambda f: f["judge_accuracy"]),
    ("mean abs diff to another image of the class", lambda f: f["same_class_faithfulness"]),
]
COST_COLUMNS: list[Column] = [
    ("evaluations / image", lambda c: c["evaluations"]),
    ("network rows / image", lambda c: c["rows"]),
]
VARIATION_COLUMNS: list[Column] = [
    *COST_COLUMNS,
    ("faithfulness (mean abs diff, 0-255)", lambda c: c["faithfulness"]),
    ("FD", lambda c: c["frechet_distance"]),
    ("accuracy", lambda c: c["accuracy"]),
    ("wall s / image", lambda c: c["seconds_per_image"]),
]
INPAINTING_COLUMNS: list[Column] = [
    *COST_COLUMNS,
    ("mean abs diff to the original in the mask (0-255)", lambda c: c["mask_error"]),
    ("FD", lambda c: c["frechet_distance"]),
    ("accuracy", lambda c: c["accuracy"]),
    ("wall s / image", lambda c: c["seconds_per_image"]),
    ("kept pixels exact", lambda c: c["kept_exact"]),
]


def versus(key: str, digits: int) -> Callable[[dict], str]:
    """A comparison's difference to the baseline and its interval, signed."""
    return lambda c: "{:+.{d}f} [{:+.{d}f}, {:+.{d}f}]".format(c[key]["difference"], *c[key]["interval"], d=digits)


COMPARISON_COLUMNS: list[Column] = [
    ("FD - baseline's [95%]", versus("fd", 3)),
    ("accuracy - baseline's [95%]", versus("accuracy", 2)),
    ("mean abs diff to the original in the mask - baseline's [95%]", versus("mask_error", 2)),
]
SPEED_COLUMNS: list[Column] = [
    ("evaluations / image", lambda c: c["evaluations"]),
    ("evaluations / generation's", lambda c: c["evaluation_ratio"]),
    ("seconds / image", lambda c: c["seconds_per_image"]),
    ("time / generation's", lambda c: c["time_ratio"]),
]


def table(keys: Sequence[str], columns: Sequence[Column], rows: Sequence[tuple[Sequence[object], dict]]) -> list[str]:
    """A markdown table: per row its key cells, then ``columns`` of its cell (a skipped cell: why)."""

    def text(v: object) -> str:
        return f"{v:.3g}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join([*keys, *(h for h, _ in columns)]) + " |", "|" + "---|" * (len(keys) + len(columns))]
    for key, cell in rows:
        values = [cell["skipped"]] + ["-"] * (len(columns) - 1) if "skipped" in cell else [v(cell) for _, v in columns]
        lines.append("| " + " | ".join(text(v) for v in [*key, *values]) + " |")
    return lines


def format_tables(r: dict) -> str:
    """The results as markdown: the basis, the floors, and a table per section measured."""
    cfg, fl = r["config"], r["floors"]
    sampling = {n: f"{s['sampler']} {s['steps']}, guidance {s['guidance']:g}" for n, s in r["sampling"].items()}
    out = [
        f"Machine: {r['machine']}; networks as served ({r['precision']} autocast, channels-last).",
        f"Inputs: {fl['variations']['images']} held-out test images ({cfg['per_class']} per class) for variations, "
        f"the first {fl['inpainting']['images']} of them ({cfg['inpaint_per_class']} per class) for inpainting, each "
        f"prompted with its true class. Frechet distance (FD) in the judge's features against {r['reference']}; "
        "at these sizes FD is biased upward, so compare rows with each other and with the floor of their size. "
        f"Sampling: {'; '.join(f'{n} {s}' for n, s in sampling.items())}. Run time: {r.get('seconds', 0):.0f} s.",
        "",
        *table(
            ["real images"],
            FLOOR_COLUMNS,
            [(["variations' inputs"], fl["variations"]), (["inpainting's inputs"], fl["inpainting"])],
        ),
    ]
    if "variations" in r:
        rows = [([n, s], c) for n, cells in r["variations"].items() for s, c in cells.items()]
        out += ["", "Variations (SDEdit):", "", *table(["network", "strength"], VARIATION_COLUMNS, rows)]
    if "inpainting" in r:
        masks = {k: f"{m['description']} ({m['area']:.0%})" for k, m in r.get("masks", {}).items()}
        area = {k: m["area"] for k, m in r.get("masks", {}).items()}
        rows = [
            ([masks[k], method], c | {"mask_error": c["faithfulness"] / area[k]})  # kept pixels are exact
            for k, cells in r["inpainting"].items()
            for method, c in cells.items()
        ]
        out += ["", "Inpainting:", "", *table(["mask (area)", "method"], INPAINTING_COLUMNS, rows)]
    if "comparisons" in r:
        masks = {k: m["description"] for k, m in r.get("masks", {}).items()}
        rows = [([masks[k], method], c) for k, cells in r["comparisons"].items() for method, c in cells.items()]
        baseline = next(iter(next(iter(r["comparisons"].values())).values()))["baseline"]
        title = f"Inpainting against {baseline} on the same images and seeds (paired bootstrap over the images):"
        out += ["", title, "", *table(["mask", "method"], COMPARISON_COLUMNS, rows)]
    if "speed" in r:
        rows = [
            ([n, sampling[n], e if e == "generation" else f"variation, strength {e}"], c)
            for n, entries in r["speed"].items()
            for e, c in entries.items()
        ]
        batch = f"{cfg['speed_batch']} images a batch, least of {cfg['speed_repeats']}"
        out += ["", f"Speed ({batch}):", "", *table(["network", "sampling", "run"], SPEED_COLUMNS, rows)]
    return "\n".join(out) + "\n"


def _tile(ax, image: np.ndarray, title: str = "") -> None:
    ax.imshow(image, cmap="gray", vmin=0, vmax=255)
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=7)


def plot_variations(r: dict, path: Path, example_class: int = 0) -> None:
    """Faithfulness against FD, a line per network with its points labelled by strength, the floor dashed;
    below, one input and its variations at each strength, a row per network."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    nets, strengths = list(r["variations"]), r["config"]["strengths"]
    fig = plt.figure(figsize=(8, 4.2 + 1.2 * len(nets)))
    grid = fig.add_gridspec(1 + len(nets), 1 + len(strengths), height_ratios=[3.2] + [1] * len(nets))
    ax = fig.add_subplot(grid[0, :])
    for k, (name, cells) in enumerate(r["variations"].items()):
        done = [(s, c) for s, c in cells.items() if "skipped" not in c]
        xs, ys = [c["faithfulness"] for _, c in done], [c["frechet_distance"] for _, c in done]
        ax.plot(xs, ys, "o-", label=name)
        for (s, _), x, y in zip(done, xs, ys, strict=True):
            ax.annotate(f"s={s}", (x, y), textcoords="offset points", xytext=(4, 4 - 12 * k), fontsize=7)
    floor = r["floors"]["variations"]
    ax.axhline(floor["identity"], ls="--", c="gray", lw=1, label="the real inputs themselves (floor)")
    lo, hi = floor["real_mean"] - 2 * floor["real_sd"], floor["real_mean"] + 2 * floor["real_sd"]
    ax.axhspan(lo, hi, color="gray", alpha=0.15, label=f"other real sets of {floor['images']}: mean +- 2 sd")
    ax.set(
        xlabel="faithfulness: mean |variation - input| (0-255, lower keeps more)",
        ylabel="FD to unedited test images (lower is more real)",
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    inputs = decode(r["examples"]["inputs"])
    for row, (name, cells) in enumerate(r["variations"].items(), start=1):
        _tile(fig.add_subplot(grid[row, 0]), inputs[example_class], "input" if row == 1 else "")
        fig.axes[-1].set_ylabel(name, fontsize=8)
        for col, s in enumerate(strengths, start=1):
            c = cells.get(f"{s:g}", {})
            a = fig.add_subplot(grid[row, col])
            if "examples" in c:
                _tile(a, decode(c["examples"])[example_class], f"s={s:g}")
            else:
                a.axis("off")
    fig.suptitle(f"Variations of held-out test images ({CLASS_NAMES[example_class]} shown)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_inpainting(r: dict, path: Path, classes: Sequence[int] = (3, 8, 9, 0)) -> None:
    """A row per mask (its example of class ``classes[k]``): the input, the input with the generated region
    blue, and each method's completion."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    masks = list(r["inpainting"])
    methods = list(r["inpainting"][masks[0]])
    inputs = decode(r["examples"]["inputs"])
    fig, axes = plt.subplots(len(masks), 2 + len(methods), figsize=(1.45 * (2 + len(methods)), 1.6 * len(masks)))
    axes = np.atleast_2d(axes)
    for row, mask in enumerate(masks):
        c = classes[row % len(classes)]
        m = decode(r["masks"][mask]["examples"])[c].astype(bool)
        shown = np.repeat(inputs[c][..., None], 3, axis=2)
        shown[m] = (40, 90, 200)
        _tile(axes[row, 0], inputs[c], "input" if row == 0 else "")
        axes[row, 0].set_ylabel(r["masks"][mask]["description"], fontsize=7)
        axes[row, 1].imshow(shown)
        _tile(axes[row, 1], shown, "blue: generated" if row == 0 else "")
        for col, method in enumerate(methods, start=2):
            cell = r["inpainting"][mask].get(method)
            if cell is None:
                axes[row, col].axis("off")
                continue
            _tile(axes[row, col], decode(cell["examples"])[c], method.replace(", ", "\n") if row == 0 else "")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def draw_figures(r: dict, folder: Path) -> list[Path]:
    """edit_variations.png and edit_inpainting.png in ``folder``, for the sections ``r`` holds."""
    folder.mkdir(parents=True, exist_ok=True)
    drawn = []
    for section, name, plot in (
        ("variations", "edit_variations.png", plot_variations),
        ("inpainting", "edit_inpainting.png", plot_inpainting),
    ):
        if r.get(section):
            plot(r, folder / name)
            drawn.append(folder / name)
    return drawn


# --- the command line --------------------------------------------------------------------------------------


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m model.edit_eval", description=__doc__.splitlines()[0])
    add_config_arguments(p, EditEvalConfig, {"precision": tuple(DTYPES)})
    p.add_argument("--from-json", default=None, help="print the tables and draw the pictures of this results file")
    return p


def main(argv: list[str] | None = None) -> int:
    p = parser()
    a = p.parse_args(argv)
    try:
        cfg = config_from_args(EditEvalConfig, a)
    except ValueError as err:
        p.error(str(err))
    torch.set_num_threads(cfg.threads)
    results = json.loads(Path(a.from_json).read_text()) if a.from_json else measure(cfg)
    tables = format_tables(results)
    print(tables)
    if not a.from_json:
        atomic_write_bytes(Path(cfg.out).with_suffix(".md"), tables.encode())
    if cfg.figures:
        for path in draw_figures(results, Path(cfg.figures)):
            print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
