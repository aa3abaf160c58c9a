"""The tables that ``python -m model.evaluate`` prints: one run's figures, and runs side by side."""

from __future__ import annotations


def describe_interval(interval) -> str:
    return f" for {interval[0]:g} < sigma <= {interval[1]:g}" if interval else ""


def describe_guide(guide: str | None) -> str:
    return f", autoguided by {guide}" if guide else ""


def format_table(r: dict) -> str:
    ref = r.get("reference", "test").split(" ")[0]
    lines = [
        f"samples: {r['per_class']} per class, {r['sampler']} {r['steps']} steps, guidance {r['guidance']}"
        f"{describe_interval(r.get('guidance_interval'))}{describe_guide(r.get('guide'))}, "
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
    """Network evaluations per image: two per step while guided (the conditional and the null branch;
    a guidance interval makes it fewer)."""
    return r["steps"] * (1 if r["guidance"] == 1.0 else 2)


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
            f"| {name} | {r['sampler']} | {r['steps']} | {evaluations_per_image(r)} | {r['guidance']:g}"
            f"{describe_interval(r.get('guidance_interval'))}{describe_guide(r.get('guide'))} | "
            f"{r['accuracy']:.3f} | {r['frechet_distance']:.3f} | {r['frechet_ratio']:.2f} | "
            f"{r['frechet_distance'] / base:.2f}x | {r['precision_recall']['precision']:.3f} | "
            f"{r['precision_recall']['recall']:.3f} |"
        )
    return "\n".join(lines)
