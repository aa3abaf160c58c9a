"""A job's chunks, drawn by the engine in background pieces beside whatever else runs, have the bytes that
``app.datasets.draw.fill`` gives the same spec in one process: each image depends only on the spec and its
index (seed + index, fixed-row network evaluations)."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from app.datasets.draw import fill, load_model
from app.datasets.spec import DatasetSpec
from app.datasets.store import SPEC, ChunkStore
from app.main import create_app
from testkit.jobs import ended

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def client(job_settings: Callable, tmp_path: Path) -> Iterator[TestClient]:
    # 3 images a piece: pieces cross no class boundary and do not divide the 8-image chunks
    settings = job_settings(tmp_path / "jobs", job_piece_images=3, warmup=False)
    with TestClient(create_app(settings)) as c:
        yield c


@pytest.mark.parametrize(
    "sampling",
    [
        {},  # the card's: dpm++, 3 steps, guided (2 rows an image)
        {"sampler": "ddim", "steps": 4, "guidance": 1.0},  # unguided: 1 row an image
        {"sampler": "heun", "steps": 2, "guidance": 1.5},  # two evaluations a step, the model's sigma_min
    ],
)
def test_a_jobs_chunks_equal_draw_fill_of_the_same_spec(
    client: TestClient, app_weights: Path, tmp_path: Path, sampling: dict[str, Any]
) -> None:
    job = client.post("/jobs", json={"counts": [5, 0, 3, 0, 0, 0, 0, 9, 0, 2], "seed": 40, **sampling}).json()
    interactive = client.post("/generate", json={"class": 4, "n": 3, "seed": 1})  # shares the ticks meanwhile
    assert interactive.status_code == 200
    assert ended(client, job["id"])["state"] == "succeeded"

    chunks = tmp_path / "jobs" / job["id"] / "chunks"
    saved = json.loads((chunks / SPEC).read_text())
    spec = DatasetSpec.from_json(saved["spec"])
    assert spec.total == 19 and saved["chunk_size"] == 8
    drawn = ChunkStore(tmp_path / "fill", spec, saved["chunk_size"])
    fill(drawn, load_model(app_weights, "cpu"), progress=False)

    made = ChunkStore(chunks, spec, saved["chunk_size"])
    assert made.committed() == drawn.committed() and len(made.committed()) == 3
    for index in range(made.count):
        assert made.path(index).read_bytes() == drawn.path(index).read_bytes()
