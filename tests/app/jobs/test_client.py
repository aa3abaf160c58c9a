"""``python -m app.client job``: submits, follows with a progress bar, downloads and checks the result;
run again, it finds the same job (its Idempotency-Key) and resumes a partial download with Range; it
outlasts a server that is not up yet and one that restarts under it."""

from __future__ import annotations

import hashlib
import io
import threading
from collections.abc import Callable
from pathlib import Path

import httpx
import numpy as np
import pytest

from app.client import main
from testkit.jobs import wait_job
from testkit.servers import free_port, serve_in_thread, wait_for

pytestmark = pytest.mark.timeout(120)
ARGS = ["job", "--counts", "2,0,0,3,0,0,0,0,0,4", "--seed", "8", "--poll", "0.05"]


def test_the_client_downloads_checks_and_resumes(server: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "ds.npz"
    assert main(["--url", server, *ARGS, "-o", str(out)]) == 0
    first = capsys.readouterr().out
    assert "created" in first and "checked" in first
    job_id = first.split()[1]
    status = httpx.get(f"{server}/jobs/{job_id}").json()
    data = out.read_bytes()
    assert hashlib.sha256(data).hexdigest() == status["result"]["sha256"]
    with np.load(io.BytesIO(data)) as z:
        assert z["y"].tolist() == [0, 0, 3, 3, 3, 9, 9, 9, 9]

    assert main(["--url", server, *ARGS, "-o", str(out)]) == 0  # the same command: the same job, complete
    assert f"job {job_id} (already there" in capsys.readouterr().out

    out.unlink()
    out.with_name(out.name + ".part").write_bytes(data[: len(data) // 2])  # a download that broke
    assert main(["--url", server, *ARGS, "-o", str(out)]) == 0
    assert f"resuming the download at byte {len(data) // 2}" in capsys.readouterr().out
    assert out.read_bytes() == data and not out.with_name(out.name + ".part").exists()
    httpx.delete(f"{server}/jobs/{job_id}")


def test_the_client_outlasts_a_server_that_starts_late_and_restarts(job_settings: Callable, tmp_path: Path) -> None:
    port, out, codes = free_port(), tmp_path / "out", []
    url = f"http://127.0.0.1:{port}"
    args = ["--url", url, "job", "--counts", "6," * 9 + "6", "--steps", "20", "--sampler", "ddim", "--seed", "2"]
    client = threading.Thread(target=lambda: codes.append(main([*args, "--poll", "0.05", "-o", f"{out}/"])))
    client.start()  # nothing listens yet
    settings = job_settings(tmp_path / "jobs")
    with serve_in_thread(settings, port=port), httpx.Client(base_url=url, timeout=30) as http:
        wait_for(lambda: http.get("/jobs").json()["data"] != [], "the client did not submit", timeout=60)
        job_id = http.get("/jobs").json()["data"][0]["id"]
        wait_job(http, job_id, lambda s: s["images_done"] >= 8, "did not commit a chunk")
    assert client.is_alive()  # the server is gone with the job half done; the client waits
    with serve_in_thread(settings, port=port):  # the same job directory: the job resumes
        client.join(90)
    assert codes == [0]
    assert (out / "dataset.npz").is_file()
