"""The tables that ``python -m model.evaluate`` prints (one run's figures, and runs side by side), and
the frontier of several runs as a picture:

    python -m model.report screens/*.json --plot docs/frontier.png

reads the ``--json`` files of ``model.evaluate`` runs, prints them side by side, and draws accuracy
against Frechet distance and precision against recall, one line per kind of guidance (classifier-free,
classifier-free inside an interval, autoguidance by each guide; and by network, when the files hold
several), one point per guidance scale.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from model.samplers import evaluations


def describe_interval(interval) -> str:
    return f" for {interval[0]:g} < sigma <= {interval[1]:g}" if interval else ""


def describe_guide(r: dict) -> str:
    """A run's guide: autoguided by it, or (combined guidance) added at its weight."""
    guide, weight = r.get("guide"), r.get("guide_weight", 1.0)
    if guide and weight != 1.0:
        return f" plus {guide} at {weight:g}"
    return f", autoguided by {guide}" if guide else ""


def format_table(r: dict) -> str:
    ref = r.get("reference", "test").split(" ")[0]
    lines = [
        f"samples: {r['per_class']} per class, {describe_sampler(r)}, guidance {r['guidance']}"
        f"{describe_interval(r.get('guidance_interval'))}{describe_guide(r)}, "
        f"{r.get('precision', 'float32')}  ({r['generation_seconds']} s on {r['machine']})",
        "",
        f"{'class':<14}{'accuracy':>10}{'Frechet':>10}{'floor':>8}",
    ]
    per_class, pr = r["frechet_distance_per_class"], r["precision_recall"]
    lines += [
        f"{name:<14}{acc:>10.3f}{per_class[name]['frechet_distance']:>10.3f}"
        f"{per_class[name]['frechet_distance_real_train']:>8.3f}"
        for name, acc in r["accuracy_per_class"].items()
    ]
    lines += [
        f"{'overall':<14}{r['accuracy']:>10.3f}{r['frechet_distance']:>10.3f}{r['frechet_distance_real_train']:>8.3f}",
        "",
        f"classifier accuracy on the real test set: {r['classifier_test_accuracy']:.4f}",
        f"Frechet distance, samples vs {ref}:{' ' * (9 - len(ref))}{r['frechet_distance']:.3f}",
        f"Frechet distance, real train vs {ref}:{' ' * (6 - len(ref))}{r['frechet_distance_real_train']:.3f}  (floor)",
        f"ratio:                                   {r['frechet_ratio']:.2f}",
        f"precision, recall (k={pr['k']}) of the samples:  {pr['precision']:.3f}  {pr['recall']:.3f}",
        f"precision, recall (k={pr['k']}) of real train:   {pr['precision_real_train']:.3f}  "
        f"{pr['recall_real_train']:.3f}",
    ]
    if "clip" in r:
        lines += [
            "",
            f"CLIP: {r['clip']['model']}",
            f"{'class':<14}{'cos gen':>10}{'cos real':>10}{'0-shot gen':>12}{'0-shot real':>13}",
        ]
        rows = list(r["clip"]["per_class"].items()) + [("mean", r["clip"]["mean"])]
        for name, row in rows:
            lines.append(
                f"{name:<14}{row['generated_similarity']:>10.4f}{row['real_similarity']:>10.4f}"
                f"{row['generated_zero_shot_accuracy']:>12.3f}{row['real_zero_shot_accuracy']:>13.3f}"
            )
    return "\n".join(lines)


def evaluations_per_image(r: dict) -> int:
    """Network evaluations per image: two per step while guided (the conditional and the null branch, or
    the guide), three under combined guidance (a guidance interval makes it fewer)."""
    per_step = 1 if r["guidance"] == 1.0 else 3 if r.get("guide_weight", 1.0) != 1.0 else 2
    return evaluations(r["sampler"], r["steps"]) * per_step


def format_comparison(rows: list[tuple[str, dict]]) -> str:
    """The teacher's and the student's results side by side; "vs teacher" is the Frechet distance
    over the first row's."""
    base = rows[0][1]["frechet_distance"]
    lines = [
        "| model | sampler | steps | evaluations/image | guidance | accuracy | Frechet distance | ratio to floor "
        "| vs teacher | precision | recall |",
        "|---|---|---:|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in rows:
        lines.append(
            f"| {name} | {r['sampler']}{describe_sigma_min(r)} | {r['steps']} | {evaluations_per_image(r)} "
            f"| {r['guidance']:g}"
            f"{describe_interval(r.get('guidance_interval'))}{describe_guide(r)} | "
            f"{r['accuracy']:.3f} | {r['frechet_distance']:.3f} | {r['frechet_ratio']:.2f} | "
            f"{r['frechet_distance'] / base:.2f}x | {r['precision_recall']['precision']:.3f} | "
            f"{r['precision_recall']['recall']:.3f} |"
        )
    return "\n".join(lines)


def guidance_kind(r: dict) -> str:
    """The line a run belongs to in the frontier: its kind of guidance, without the scale."""
    if r.get("guide") and r.get("guide_weight", 1.0) != 1.0:
        kind = f"classifier-free plus {r['guide']} at {r['guide_weight']:g}"
    elif r.get("guide"):
        kind = f"autoguidance ({r['guide']})"
    elif r["guidance"] == 1.0:
        kind = "no guidance"
    else:
        kind = "classifier-free"
    return kind + describe_interval(r.get("guidance_interval"))


def network(r: dict) -> str:
    """The name of the network a run sampled (its weights file's stem)."""
    return Path(r.get("weights") or "teacher").stem


def describe_sigma_min(r: dict) -> str:
    """Heun's lowest noise level, where a run set it."""
    return f" to sigma {r['sigma_min']:g}" if r.get("sigma_min") is not None else ""


def describe_sampler(r: dict) -> str:
    """A run's sampler and steps, and Heun's lowest noise level where it was set."""
    return f"{r['sampler']} {r['steps']} steps{describe_sigma_min(r)}"


def frontier_lines(results: list[dict]) -> dict[str, list[dict]]:
    """The runs grouped by network, sampler and kind of guidance (``guidance_kind``), each group ordered
    by guidance scale; the network and the sampler name the group only where the runs have several. A
    network's unguided runs join each of its groups of the same sampler as the w = 1 end, where its
    curves meet."""
    several_networks = len({network(r) for r in results}) > 1
    several_samplers = len({describe_sampler(r) for r in results}) > 1
    by_source: dict[tuple[str, str], dict[str, list[dict]]] = {}
    for r in results:
        by_source.setdefault((network(r), describe_sampler(r)), {}).setdefault(guidance_kind(r), []).append(r)
    lines: dict[str, list[dict]] = {}
    for (name, sampler), kinds in by_source.items():
        plain = kinds.pop("no guidance", [])
        source = ", ".join([name] * several_networks + [sampler] * several_samplers)
        for kind, runs in (kinds or {"no guidance": []}).items():
            lines[f"{source}: {kind}" if source else kind] = sorted(runs + plain, key=lambda r: r["guidance"])
    return lines


def plot_frontier(results: list[dict], out: Path, title: str = "") -> None:
    """Accuracy against Frechet distance (over the floor) and precision against recall, a line per kind
    of guidance, each point labelled with its scale; the real training images' precision and recall
    are the star."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5))
    for kind, runs in frontier_lines(results).items():
        ratio = [r["frechet_ratio"] for r in runs]
        acc = [r["accuracy"] for r in runs]
        prec = [r["precision_recall"]["precision"] for r in runs]
        rec = [r["precision_recall"]["recall"] for r in runs]
        (line,) = left.plot(ratio, acc, "o-", label=kind)
        right.plot(rec, prec, "o-", color=line.get_color(), label=kind)
        for r, x, y, u, v in zip(runs, ratio, acc, rec, prec, strict=True):
            left.annotate(f"{r['guidance']:g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
            right.annotate(f"{r['guidance']:g}", (u, v), textcoords="offset points", xytext=(4, 4), fontsize=7)
    real = results[0]["precision_recall"]
    right.plot([real["recall_real_train"]], [real["precision_real_train"]], "k*", ms=12, label="real training images")
    left.set(xlabel="Frechet distance / real-vs-real floor (lower is better)", ylabel="class accuracy (judge)")
    right.set(xlabel="recall (coverage of the real images)", ylabel="precision (samples on the real manifold)")
    for ax in (left, right):
        ax.grid(alpha=0.3)
    # The legend goes below both panels, where it hides no point.
    handles, labels = right.get_legend_handles_labels()
    rows = -(-len(labels) // 2)
    fig.set_size_inches(11, 4.5 + 0.2 * rows)
    fig.legend(handles, labels, loc="lower center", ncol=2, fontsize=8, frameon=False)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.2 * rows / (4.5 + 0.2 * rows), 1, 1))
    fig.savefig(out, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m model.report", description=__doc__.splitlines()[0])
    p.add_argument("results", nargs="+", help="JSON files written by python -m model.evaluate --json")
    p.add_argument("--plot", default=None, help="draw the frontier into this PNG")
    p.add_argument("--title", default="", help="the picture's title (say the reference, N and machine)")
    a = p.parse_args(argv)
    results = [r for path in a.results for r in json.loads(Path(path).read_text())]
    if not results:
        p.error("the files hold no results")
    print(format_comparison([(network(r), r) for r in results]))
    if a.plot:
        plot_frontier(results, Path(a.plot), a.title)
        print(f"wrote {a.plot}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
