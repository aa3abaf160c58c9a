"""Classification Accuracy Score (Ravuri & Vinyals, NeurIPS 2019) of synthetic Fashion-MNIST datasets.

    python -m model.cas --synthetic ddpm=samples.npz --run-dir runs/cas --out cas.json
    python -m model.cas plot cas.json docs/cas.png

One classifier (``model.classifier``: the same network, epochs, batch size, learning rate and shifts
for all) is trained with several seeds on each training set and tested on the real test set (the
10,000 t10k images): ``real``, the 60,000 real training images; each synthetic set ``NAME`` (an
``.npz`` of ``x`` uint8 (N, 28, 28) and ``y`` int (N,)) alone; and ``real+NAME``, both together.
CAS is accuracy(NAME) / accuracy(real), the ratio of the means over seeds; the augmentation is
accuracy(real+NAME) - accuracy(real), its spread the std of the per-seed differences (seed k of
``real+NAME`` minus seed k of ``real``).

Each (training set, seed) result is a line of ``RUN_DIR/results.jsonl`` as soon as it is measured; a
rerun skips those, so a killed run resumes. The summary JSON and the printed table come from that file.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from model.atomic import atomic_write_bytes
from model.classifier import ClassifierConfig, FitConfig, fit_classifier, predict
from model.cli import add_config_arguments, config_from_args
from model.data import CLASS_NAMES, NUM_CLASSES, FashionMNIST, to_model_range
from model.machine import describe

REAL = "real"
PER_CLASS_LINE = 0.95  # the per-class panel's reference: a class a synthetic set teaches almost as well as real


@dataclass(frozen=True)
class CASConfig:
    data_dir: str | None = None  # the Fashion-MNIST IDX files (None: $FASHION_MNIST_DIR)
    synthetic: tuple[str, ...] = ()  # NAME=PATH.npz of each synthetic training set
    run_dir: str = "runs/cas"  # RUN_DIR/results.jsonl keeps every (training set, seed) result
    out: str | None = None  # the summary JSON (None: RUN_DIR/results.json)
    seeds: int = 3  # training seeds 0..N-1 of every training set
    limit: int | None = None  # train on the first N images of each set only, class by class in turn (quick runs)
    augmented: bool = True  # also train on real + each synthetic set
    threads: int | None = None  # torch CPU threads (None: torch's default)
    classifier: ClassifierConfig = ClassifierConfig()  # the network every training set trains
    fit: FitConfig = FitConfig()  # how every training set trains it

    def __post_init__(self):
        if self.seeds < 1:
            raise ValueError(f"seeds must be at least 1, got {self.seeds}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit must be a positive number of images or None, got {self.limit}")

    def settings(self) -> dict:
        """What a result depends on besides its data and seed: results of other settings are not reused."""
        settings = {"classifier": asdict(self.classifier), "fit": asdict(self.fit), "limit": self.limit}
        return json.loads(json.dumps(settings))  # as read back from JSON: tuples as lists


# --- the training sets ---------------------------------------------------------------------------


def parse_synthetic(spec: str) -> tuple[str, Path]:
    """``NAME=PATH`` -> (NAME, PATH); a name must not be ``real`` nor hold ``+`` or ``=``."""
    name, sep, path = spec.partition("=")
    if not sep or not name or not path:
        raise ValueError(f"a synthetic set is NAME=PATH.npz, got {spec!r}")
    if name == REAL or "+" in name:
        raise ValueError(f"a synthetic set's name must not be {REAL!r} nor contain '+', got {name!r}")
    return name, Path(path)


def load_synthetic(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """The images (uint8 (N, 28, 28)) and labels (int64 (N,)) of an ``.npz`` with arrays ``x`` and ``y``."""
    with np.load(path) as f:
        if "x" not in f or "y" not in f:
            raise ValueError(f"{path}: needs arrays 'x' (images) and 'y' (labels), holds {sorted(f.files)}")
        x, y = f["x"], f["y"]
    if x.dtype != np.uint8 or x.ndim != 3 or x.shape[1:] != (28, 28):
        raise ValueError(f"{path}: x must be uint8 (N, 28, 28), got {x.dtype} {x.shape}")
    if not np.issubdtype(y.dtype, np.integer) or y.shape != (len(x),):
        raise ValueError(f"{path}: y must be {len(x)} integer labels, got {y.dtype} {y.shape}")
    if len(y) and not 0 <= y.min() <= y.max() < NUM_CLASSES:
        raise ValueError(f"{path}: labels must lie in 0..{NUM_CLASSES - 1}, got {y.min()}..{y.max()}")
    return x, y.astype(np.int64)


def head(images: np.ndarray, labels: np.ndarray, n: int | None) -> tuple[np.ndarray, np.ndarray]:
    """The first ``n`` images taken class by class in turn (the first of each class, then the second...):
    the real files and sets generated class by class are grouped by class, so a plain first ``n``
    would be one class."""
    if n is None or n >= len(labels):
        return images, labels
    rank = np.empty(len(labels), np.int64)
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        rank[members] = np.arange(len(members))
    keep = np.sort(np.lexsort((labels, rank))[:n])  # by rank, then class; file order kept
    return images[keep], labels[keep]


def digest(images: np.ndarray, labels: np.ndarray) -> str:
    h = hashlib.sha256(np.ascontiguousarray(images).tobytes())
    h.update(np.ascontiguousarray(labels, dtype=np.int64).tobytes())
    return h.hexdigest()[:16]


@dataclass(frozen=True)
class TrainingSet:
    name: str
    kind: str  # "real", "synthetic" or "real+synthetic"
    images: np.ndarray  # uint8 (N, 28, 28)
    labels: np.ndarray  # int64 (N,)
    source: str | None  # the synthetic .npz


def training_sets(cfg: CASConfig, data: FashionMNIST) -> list[TrainingSet]:
    """``real``, then each synthetic set and (``cfg.augmented``) real plus it, each cut to ``cfg.limit``."""
    real_x, real_y = head(data.train_images, data.train_labels, cfg.limit)
    sets = [TrainingSet(REAL, "real", real_x, real_y, None)]
    seen = set()
    for spec in cfg.synthetic:
        name, path = parse_synthetic(spec)
        if name in seen:
            raise ValueError(f"synthetic set {name!r} is named twice")
        seen.add(name)
        x, y = head(*load_synthetic(path), cfg.limit)
        sets.append(TrainingSet(name, "synthetic", x, y, str(path)))
        if cfg.augmented:
            both_x, both_y = np.concatenate([real_x, x]), np.concatenate([real_y, y])
            sets.append(TrainingSet(f"{REAL}+{name}", "real+synthetic", both_x, both_y, str(path)))
    return sets


# --- one training, and the file of results -------------------------------------------------------


def measure(ts: TrainingSet, data: FashionMNIST, cfg: CASConfig, seed: int, progress: bool) -> dict:
    """Train on ``ts`` with ``seed``, test on the real test set: one line of results.jsonl."""
    cpu, wall = time.process_time(), time.perf_counter()
    model = fit_classifier(ts.images, ts.labels, cfg.classifier, cfg.fit, seed=seed, progress=progress)
    predicted = predict(model, to_model_range(data.test_images))[0].argmax(1)
    correct = predicted == data.test_labels
    per_class = [float(correct[data.test_labels == c].mean()) for c in range(NUM_CLASSES)]
    return {
        "set": ts.name,
        "seed": seed,
        "accuracy": float(correct.mean()),
        "per_class_accuracy": per_class,
        "train_images": len(ts.labels),
        "cpu_seconds": round(time.process_time() - cpu, 2),
        "wall_seconds": round(time.perf_counter() - wall, 2),
        "data_sha256": digest(ts.images, ts.labels),
        "settings": cfg.settings(),
        "machine": describe(threads=cfg.threads),
    }


def read_results(path: Path) -> list[dict]:
    """The results in ``path`` (none if absent). A last line cut short by a kill is dropped from the
    file, so the next result starts a line of its own; a bad line anywhere else is an error."""
    if not path.exists():
        return []
    lines = path.read_text().splitlines()
    records = []
    for i, line in enumerate(lines):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as err:
            if i < len(lines) - 1:
                raise ValueError(f"{path}: line {i + 1} is not JSON ({err})") from err
            atomic_write_bytes(path, "".join(line + "\n" for line in lines[:-1]).encode())
    return records


def append_result(path: Path, record: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()


def reusable(records: list[dict], sets: list[TrainingSet], cfg: CASConfig, path: Path) -> dict[tuple[str, int], dict]:
    """The finished results of this run's training sets, by (set, seed). One trained on other data or
    with other settings under a name of this run is an error: the run directory belongs to another run."""
    wanted, settings = {ts.name: digest(ts.images, ts.labels) for ts in sets}, cfg.settings()
    done = {}
    for r in records:
        if r["set"] not in wanted:
            continue
        if r["data_sha256"] != wanted[r["set"]] or r["settings"] != settings:
            raise ValueError(
                f"{path}: {r['set']!r} seed {r['seed']} was trained on other data or settings "
                f"({r['settings']}); use another --run-dir or delete the file"
            )
        done[r["set"], r["seed"]] = r
    return done


def run_cas(cfg: CASConfig, progress: bool = True, log: Callable[[str], None] = print) -> dict:
    """Train and test every (training set, seed) not yet in RUN_DIR/results.jsonl, then write and
    return the summary (``summarize``)."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    data = FashionMNIST.load(cfg.data_dir)
    sets = training_sets(cfg, data)
    path = Path(cfg.run_dir) / "results.jsonl"
    done = reusable(read_results(path), sets, cfg, path)
    for ts in sets:
        for seed in range(cfg.seeds):
            if (ts.name, seed) in done:
                continue
            record = measure(ts, data, cfg, seed, progress)
            append_result(path, record)
            done[ts.name, seed] = record
            log(f"{ts.name} seed {seed}: accuracy {record['accuracy']:.4f} ({record['cpu_seconds'] / 60:.1f} CPU min)")
    summary = summarize([done[ts.name, seed] for ts in sets for seed in range(cfg.seeds)], sets, cfg)
    out = Path(cfg.out) if cfg.out else Path(cfg.run_dir) / "results.json"
    atomic_write_bytes(out, (json.dumps(summary, indent=2) + "\n").encode())
    return summary


# --- the summary ---------------------------------------------------------------------------------


def spread(values: Sequence[float]) -> dict:
    """Mean, sample std (None for one value), min, max and the values, seed by seed."""
    v = np.asarray(values, dtype=np.float64)
    std = float(v.std(ddof=1)) if len(v) > 1 else None
    return {"mean": float(v.mean()), "std": std, "min": float(v.min()), "max": float(v.max()), "per_seed": list(values)}


def ratio(a: float, b: float) -> float | None:
    return a / b if b else None


def summarize(records: list[dict], sets: list[TrainingSet], cfg: CASConfig) -> dict:
    """Per training set: accuracy over seeds, per-class accuracy (mean over seeds), CPU minutes, and
    the ratio to ``real``; per synthetic set: CAS and the augmentation against ``real``, paired by seed."""
    by_set: dict[str, list[dict]] = {}
    for r in sorted(records, key=lambda r: r["seed"]):
        by_set.setdefault(r["set"], []).append(r)
    stats = {}
    for ts in sets:
        rs = by_set[ts.name]
        per_class = np.mean([r["per_class_accuracy"] for r in rs], axis=0)
        stats[ts.name] = {
            "kind": ts.kind,
            "source": ts.source,
            "train_images": rs[0]["train_images"],
            "seeds": [r["seed"] for r in rs],
            "accuracy": spread([r["accuracy"] for r in rs]),
            "per_class_accuracy": dict(zip(CLASS_NAMES, map(float, per_class), strict=True)),
            "cpu_minutes": round(sum(r["cpu_seconds"] for r in rs) / 60, 2),
        }
    real = stats[REAL]
    real_acc = np.asarray(real["accuracy"]["per_seed"])
    for name, s in stats.items():
        if name == REAL:
            continue
        acc = np.asarray(s["accuracy"]["per_seed"])
        s["ratio_to_real"] = ratio(s["accuracy"]["mean"], real["accuracy"]["mean"])
        s["ratio_to_real_per_seed"] = spread((acc / real_acc).tolist())
        s["per_class_ratio"] = {c: ratio(a, real["per_class_accuracy"][c]) for c, a in s["per_class_accuracy"].items()}
        if s["kind"] == "real+synthetic":
            gain = spread((acc - real_acc).tolist())
            real_std = real["accuracy"]["std"]
            gain["real_seed_std"] = real_std
            gain["beats_seed_spread"] = None if real_std is None else gain["mean"] > real_std
            s["augmentation"] = gain
    synthetic = {}
    for ts in sets:
        if ts.kind == "synthetic":
            s, both = stats[ts.name], stats.get(f"{REAL}+{ts.name}")
            synthetic[ts.name] = {
                "cas": s["ratio_to_real"],
                "cas_per_seed": s["ratio_to_real_per_seed"],
                "per_class_ratio": s["per_class_ratio"],
                "augmentation": both["augmentation"] if both else None,
            }
    return {
        "metric": "Classification Accuracy Score (Ravuri & Vinyals, NeurIPS 2019)",
        "test_set": f"real Fashion-MNIST t10k, {len(CLASS_NAMES)} classes",
        "machine": "; ".join(sorted({r["machine"] for r in records})),  # several if a run resumed elsewhere
        "settings": {**cfg.settings(), "seeds": cfg.seeds},
        "notes": {
            "cas": "mean accuracy over seeds of the synthetic set / that of real (ratio of means)",
            "std": "sample std over training seeds (ddof=1); null with one seed",
            "augmentation": "accuracy(real+NAME) - accuracy(real); its std: std of the per-seed differences, "
            "seed k of real+NAME minus seed k of real",
            "beats_seed_spread": "mean augmentation > std of real's accuracy over training seeds",
        },
        "training_sets": stats,
        "synthetic": synthetic,
    }


# --- the table and the picture -------------------------------------------------------------------


def _std(x: float | None) -> str:
    return "-" if x is None else f"{x:.4f}"


def format_table(summary: dict, per_class: bool = False) -> str:
    """The summary as markdown: one row per training set; ``per_class``: a second table of per-class
    accuracy of real and the ratio to real of every other set."""
    st = summary["settings"]
    fit, limit = st["fit"], "" if st["limit"] is None else f", first {st['limit']:,} images of each set"
    lines = [
        f"Classification Accuracy Score on the real test set, over {st['seeds']} training seeds; {summary['machine']}",
        f"classifier: widths {st['classifier']['widths']}, epochs {fit['epochs']}, batch {fit['batch_size']}, "
        f"lr {fit['lr']}, shifts {fit['max_shift']} px{limit}",
        "",
        "| training set | images | accuracy | std | min..max | / real | augmentation ± std | beats seeds | CPU min |",
        "|---|---:|---:|---:|---|---:|---:|---|---:|",
    ]
    for name, s in summary["training_sets"].items():
        acc, aug = s["accuracy"], s.get("augmentation")
        rel = "1" if name == REAL else "-" if s["ratio_to_real"] is None else f"{s['ratio_to_real']:.3f}"
        gain = "" if aug is None else f"{aug['mean']:+.4f} ± {_std(aug['std'])}"
        beats = "" if aug is None else {True: "yes", False: "no", None: "-"}[aug["beats_seed_spread"]]
        lines.append(
            f"| {name} | {s['train_images']:,} | {acc['mean']:.4f} | {_std(acc['std'])} | "
            f"{acc['min']:.4f}..{acc['max']:.4f} | {rel} | {gain} | {beats} | {s['cpu_minutes']:.1f} |"
        )
    lines += [
        "",
        "CAS: the / real of a synthetic set (ratio of mean accuracies). Augmentation: real+NAME - real; its std is",
        "that of the per-seed differences (seed k - seed k); it beats the seeds when above real's std over seeds.",
    ]
    if per_class:
        others = [n for n in summary["training_sets"] if n != REAL]
        lines += ["", "| class | real accuracy | " + " | ".join(f"{n} / real" for n in others) + " |"]
        lines.append("|---|---:|" + "---:|" * len(others))
        for c in CLASS_NAMES:
            ratios = [summary["training_sets"][n]["per_class_ratio"][c] for n in others]
            cells = ["-" if r is None else f"{r:.3f}" for r in ratios]
            real_c = summary["training_sets"][REAL]["per_class_accuracy"][c]
            lines.append(f"| {c} | {real_c:.4f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(summary: dict, out: Path) -> None:
    """Left: accuracy / real of every other training set (CAS for a synthetic set), bars from the
    per-seed ratios' min to max; right: per class, the ratio of each synthetic set, with the 0.95 line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    others = {n: s for n, s in summary["training_sets"].items() if n != REAL}
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4.5), gridspec_kw={"width_ratios": [1, 2]})
    for i, s in enumerate(others.values()):
        r, per_seed = s["ratio_to_real"], s["ratio_to_real_per_seed"]
        err = [[r - per_seed["min"]], [per_seed["max"] - r]]
        color = "tab:orange" if s["kind"] == "real+synthetic" else "tab:blue"
        ax.errorbar([i], [r], yerr=err, fmt="o", color=color, capsize=4)
        ax.annotate(f"{r:.3f}", (i, r), textcoords="offset points", xytext=(8, -3), fontsize=8)
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.set_xticks(range(len(others)), list(others), rotation=30, ha="right")
    ax.set_xlim(-0.5, len(others) - 0.2)  # room for the last label
    ax.set_ylabel("test accuracy / that of real (CAS)")
    ax.set_title("blue: synthetic only (CAS), orange: real + synthetic\nbars: min..max over seeds", fontsize=9)
    x = np.arange(len(CLASS_NAMES))
    for name, s in others.items():
        if s["kind"] != "synthetic":
            continue
        ratios = [np.nan if v is None else v for v in s["per_class_ratio"].values()]
        bx.plot(x, ratios, "o-", label=name, lw=1)
    bx.axhline(PER_CLASS_LINE, color="gray", ls="--", lw=0.8, label=f"{PER_CLASS_LINE:g}")
    bx.axhline(1.0, color="gray", lw=0.8)
    bx.set_xticks(x, CLASS_NAMES, rotation=30, ha="right")
    bx.set_ylabel("per-class accuracy / that of real")
    bx.set_title(f"synthetic only, per class (mean over {summary['settings']['seeds']} seeds)", fontsize=9)
    bx.legend(fontsize=8)
    for a in (ax, bx):
        a.grid(alpha=0.3)
    fig.suptitle(f"Classification Accuracy Score on the real Fashion-MNIST test set\n{summary['machine']}", fontsize=9)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)


# --- the command line ----------------------------------------------------------------------------


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m model.cas",
        description=__doc__.splitlines()[0],
        epilog="python -m model.cas plot RESULTS.json OUT.png draws a summary.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_config_arguments(p, CASConfig, skip=("synthetic", "num_classes"))
    p.add_argument("--synthetic", action="append", default=[], metavar="NAME=PATH.npz", help="repeat for each set")
    p.add_argument("--per-class-table", action="store_true", help="also print per-class ratios to real")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def plot_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m model.cas plot", description="draw a model.cas summary")
    p.add_argument("results", type=Path, help="the summary JSON of python -m model.cas")
    p.add_argument("out", type=Path, help="the picture (.png)")
    a = p.parse_args(argv)
    plot(json.loads(a.results.read_text()), a.out)
    print(f"wrote {a.out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["plot"]:
        return plot_main(argv[1:])
    p = parser()
    a = p.parse_args(argv)
    try:
        cfg = config_from_args(CASConfig, a)
        summary = run_cas(cfg, progress=not a.no_progress)
    except ValueError as err:
        p.exit(2, f"error: {err}\n")
    print(format_table(summary, per_class=a.per_class_table))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
