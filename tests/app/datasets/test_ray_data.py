"""Drawing on Ray Data: two actors on a local Ray cluster of 2 CPUs commit the chunks that one process
draws, byte for byte, through the library and through ``python -m app.datasets ray``, and resume.

One cluster for the module (starting it costs ~5-15 s on two busy cores)."""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Iterator

import numpy as np
import pytest

from app.datasets.__main__ import main
from app.datasets.formats import CARD
from app.datasets.store import MANIFEST, ChunkStore

pytestmark = [pytest.mark.ray, pytest.mark.timeout(180)]
ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def cluster() -> Iterator[None]:
    """A local cluster of its own, in a temporary directory of its own (short: Ray's socket paths must fit
    in 107 bytes), so a Ray run of another test or process on this machine is never in its way."""
    ray_tmp = tempfile.mkdtemp(prefix="ray", dir="/tmp")
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR", _temp_dir=ray_tmp)
    ray.data.DataContext.get_current().enable_progress_bars = False
    try:
        yield
    finally:
        ray.shutdown()
        shutil.rmtree(ray_tmp, ignore_errors=True)


def test_two_actors_commit_the_bytes_of_one_process_and_resume(cluster, tmp_path, drawn, app_weights, chunk_bytes):
    from app.datasets.ray_data import fill_on_ray

    store = ChunkStore(tmp_path / "ray", drawn.spec, drawn.size)
    store.path(0).write_bytes(drawn.path(0).read_bytes())  # chunk 0 committed by an earlier run
    with open(store.root / MANIFEST, "a") as f:
        f.write(json.dumps({"index": 0, "sha256": drawn.committed()[0]}) + "\n")

    runtimes = fill_on_ray(store, app_weights, workers=2, device="cpu", precision="float32", progress=False)
    assert [r["device"] for r in runtimes] == ["cpu"] and runtimes[0]["precision"] == "float32"
    assert chunk_bytes(store) == chunk_bytes(drawn)
    assert store.committed() == drawn.committed()
    assert len((store.root / MANIFEST).read_text().splitlines()) == store.count  # chunk 0 was not drawn again
    assert np.array_equal(store.arrays()[0], drawn.arrays()[0])
    assert fill_on_ray(store, app_weights, workers=2, progress=False) == []  # nothing left to draw


def test_the_ray_command_draws_and_exports_the_single_process_dataset(
    cluster, tmp_path, drawn, app_weights, chunk_bytes, exported
):
    spec = drawn.spec
    args = ["--weights", str(app_weights), "--out", str(tmp_path / "ds"), "--per-class", "2", "--seed", str(spec.seed)]
    args += ["--chunk-size", str(drawn.size), "--device", "cpu", "--precision", "float32", "--workers", "2"]
    assert main(["ray", *args, "--export", str(tmp_path / "export"), "--format", "idx", "--format", "parquet"]) == 0
    assert chunk_bytes(ChunkStore(tmp_path / "ds", spec, drawn.size)) == chunk_bytes(drawn)
    card = json.loads((tmp_path / "export" / CARD).read_text())
    assert card["files"] == {k: v for k, v in exported[1]["files"].items() if v["format"] != "npz"}
