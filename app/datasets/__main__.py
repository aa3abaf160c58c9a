"""``python -m app.datasets``: draw a labelled synthetic dataset into a directory, resumably, in this
process or on Ray Data, and export it to the formats other tools read.

    python -m app.datasets draw --weights weights/fashion-student.safetensors --per-class 6000 --out runs/ds
    python -m app.datasets ray --weights weights/fashion-student.safetensors --per-class 6000 --out runs/ds \\
        --workers 4 --gpus-per-worker 1
    python -m app.datasets export --from runs/ds --out runs/ds-export --format idx --format parquet

Run ``draw`` or ``ray`` again with the same arguments to resume: committed chunks are kept, the rest
drawn. ``--export DIR`` on either exports the dataset once it is complete. docs/datasets.md has more."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

from app.datasets.draw import fill, load_model, resolve_sampling
from app.datasets.formats import FORMATS, export
from app.datasets.spec import DatasetSpec, per_class
from app.datasets.store import SPEC, ChunkError, ChunkStore
from app.generation.models import ServedModel
from model.io import WeightsError


def spec_arguments(p: argparse.ArgumentParser) -> None:
    """What ``draw`` and ``ray`` share: the spec, the store, the device, and an export when done."""
    p.add_argument("--weights", required=True, help="the model's .safetensors (its card beside it)")
    p.add_argument("--out", required=True, help="the dataset's directory")
    p.add_argument("--per-class", type=int, required=True, help="images of each class")
    p.add_argument("--seed", type=int, default=0, help="image i is drawn from seed + i")
    p.add_argument("--sampler")
    p.add_argument("--steps", type=int)
    p.add_argument("--guidance", type=float)
    p.add_argument("--guidance-method", choices=("classifier-free", "autoguidance"))
    p.add_argument("--chunk-size", type=int, default=256)
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", default="auto")
    p.add_argument("--export", metavar="DIR", help="once complete, export the dataset into DIR")
    format_argument(p)


def format_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--format",
        dest="formats",
        action="append",
        choices=tuple(FORMATS),
        help="a format to export (repeat for several; default: all)",
    )


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m app.datasets", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("draw", help="draw the dataset's chunks in this process (resumes where a run left off)")
    spec_arguments(d)
    d.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    r = sub.add_parser("ray", help="draw the dataset's chunks on Ray Data actors (resumes too)")
    spec_arguments(r)
    r.add_argument("--workers", type=int, default=2, help="Ray actors, each with the model loaded once")
    r.add_argument("--gpus-per-worker", type=float, default=0.0, help="GPUs each actor holds (0: one CPU)")
    r.add_argument("--address", help="the Ray cluster (default: $RAY_ADDRESS, else a local one)")
    e = sub.add_parser("export", help="export a complete dataset to other tools' formats, with its card")
    e.add_argument("--from", dest="source", required=True, help="the dataset's directory")
    e.add_argument("--out", required=True, help="where the exported files and card.json go")
    e.add_argument("--weights", help="the model's .safetensors, to put its sha256 in the card")
    format_argument(e)
    return p


def open_store(a: argparse.Namespace, model: ServedModel) -> ChunkStore:
    sampling = resolve_sampling(
        model, sampler=a.sampler, steps=a.steps, guidance=a.guidance, guidance_method=a.guidance_method
    )
    return ChunkStore(a.out, DatasetSpec(model.name, sampling, per_class(a.per_class), a.seed), a.chunk_size)


def finish(a: argparse.Namespace, store: ChunkStore, drawn_on: list[dict[str, Any]]) -> None:
    spec = store.spec
    print(f"{store.root}: {spec.total} images of {spec.model}, {spec.sampling}")
    if a.export:
        card = export(store, a.export, a.formats or tuple(FORMATS), weights=a.weights, drawn_on=drawn_on or None)
        print(f"{a.export}: {', '.join(card['files'])}, card.json")


def draw_command(a: argparse.Namespace) -> None:
    if a.threads:
        torch.set_num_threads(a.threads)
    model = load_model(a.weights, a.device, a.precision)
    store = open_store(a, model)
    fill(store, model)
    finish(a, store, [model.runtime.describe()])


def ray_command(a: argparse.Namespace) -> None:
    import ray

    from app.datasets.ray_data import fill_on_ray

    store = open_store(a, load_model(a.weights, "cpu"))  # the card's defaults; the actors load their own
    if not ray.is_initialized():  # a caller's cluster, or the one --address or $RAY_ADDRESS names
        ray.init(address=a.address)
    drawn_on = fill_on_ray(
        store,
        a.weights,
        workers=a.workers,
        gpus_per_worker=a.gpus_per_worker,
        device=a.device,
        precision=a.precision,
    )
    finish(a, store, drawn_on)


def saved_store(root: str | Path) -> ChunkStore:
    """The store a ``draw`` or ``ray`` run made in ``root``, by the spec it saved there."""
    path = Path(root) / SPEC
    if not path.is_file():
        raise ValueError(f"{root} holds no dataset ({SPEC} is missing): give the directory that draw wrote")
    saved = json.loads(path.read_text())
    return ChunkStore(root, DatasetSpec.from_json(saved["spec"]), saved["chunk_size"])


def export_command(a: argparse.Namespace) -> None:
    store = saved_store(a.source)
    card = export(store, a.out, a.formats or tuple(FORMATS), weights=a.weights)
    print(f"{a.out}: {card['images']} images in {', '.join(card['files'])}, card.json")


COMMANDS = {"draw": draw_command, "ray": ray_command, "export": export_command}


def main(argv: list[str] | None = None) -> int:
    p = parser()
    a = p.parse_args(argv)
    try:
        COMMANDS[a.command](a)
    except (ValueError, ChunkError, WeightsError) as err:
        p.exit(2, f"error: {err}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
