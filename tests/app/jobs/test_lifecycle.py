"""A job's life over HTTP against a real uvicorn server: create, poll, stream, list, download with Range,
cancel, delete; idempotency keys; the limits (queue, disk quota, bad specs); the pinned-replica answer."""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from httpx_sse import connect_sse

from testkit.jobs import ended, wait_job
from testkit.metrics import metric

pytestmark = pytest.mark.timeout(120)
COUNTS = [3, 2, 0, 0, 0, 0, 0, 0, 0, 5]  # two chunks of 8, three classes, a class change inside a chunk


def create(http: httpx.Client, body: dict[str, Any], key: str | None = None) -> httpx.Response:
    return http.post("/jobs", json=body, headers={"Idempotency-Key": key} if key else {})


def test_a_job_is_created_streamed_listed_and_downloaded_with_ranges(http: httpx.Client) -> None:
    answer = create(http, {"counts": COUNTS, "seed": 5, "format": "npz"})
    assert answer.status_code == 202, answer.text
    job = answer.json()
    assert answer.headers["location"] == job["url"] == f"/jobs/{job['id']}"
    assert job["state"] in ("queued", "running") and job["images_total"] == 10 and job["counts"] == COUNTS
    assert job["sampling"] == {
        "sampler": "dpm++",
        "steps": 3,
        "guidance": 2.0,
        "guidance_method": "classifier-free",
        "sigma_min": None,
    }  # the card's defaults, as /generate resolves them

    with connect_sse(http, "GET", job["events_url"]) as source:
        events = [(e.event, json.loads(e.data)) for e in source.iter_sse()]
    assert {name for name, _ in events} == {"status"}
    done = [data["images_done"] for _, data in events]
    assert done == sorted(done) and events[-1][1]["state"] == "succeeded"  # the stream ends with the job

    status = http.get(job["url"]).json()
    assert status["images_done"] == 10 and status["started"] and status["finished"] and status["error"] is None
    result = status["result"]
    assert result["partial"] is False and result["images"] == 10 and result["file"] == "dataset.npz"
    assert [j["id"] for j in http.get("/jobs").json()["data"]][0] == job["id"]

    whole = http.get(result["url"])
    assert whole.status_code == 200 and whole.headers["etag"] == f'"{result["sha256"]}"'
    assert int(whole.headers["content-length"]) == result["bytes"] == len(whole.content)
    assert hashlib.sha256(whole.content).hexdigest() == result["sha256"]
    with np.load(io.BytesIO(whole.content)) as z:
        assert z["x"].shape == (10, 28, 28) and z["x"].dtype == np.uint8
        assert z["y"].tolist() == [0, 0, 0, 1, 1, 9, 9, 9, 9, 9]

    tail = http.get(result["url"], headers={"Range": "bytes=100-"})
    assert tail.status_code == 206 and tail.content == whole.content[100:]
    assert tail.headers["content-range"] == f"bytes 100-{len(whole.content) - 1}/{len(whole.content)}"
    resumed = http.get(result["url"], headers={"Range": "bytes=100-", "If-Range": whole.headers["etag"]})
    assert resumed.status_code == 206 and resumed.content == whole.content[100:]
    changed = http.get(result["url"], headers={"Range": "bytes=100-", "If-Range": '"another"'})
    assert changed.status_code == 200 and changed.content == whole.content  # not the same file: all of it
    past = http.get(result["url"], headers={"Range": f"bytes={len(whole.content)}-"})
    assert past.status_code == 416 and past.headers["content-range"] == f"bytes */{len(whole.content)}"
    assert past.json()["error"]["code"] == "range_not_satisfiable"

    text = http.get("/metrics").text
    assert metric(text, "fashion_long_jobs", state="succeeded") >= 1
    assert metric(text, "fashion_long_job_images_total", model="tiny-test") >= 10
    assert http.delete(job["url"]).json() == {"id": job["id"], "object": "job", "deleted": True}


def test_an_idempotency_key_returns_the_same_job_and_never_makes_two(http: httpx.Client, error_of: Callable) -> None:
    body = {"class": "dress", "n": 3, "format": "idx"}  # no seed: the server's random one is the job's
    first = create(http, body, key="same-key-1")
    again = create(http, body, key="same-key-1")
    assert (first.status_code, again.status_code) == (202, 200)
    assert again.json()["id"] == first.json()["id"] and again.headers["location"] == first.headers["location"]
    other = create(http, {**body, "n": 4}, key="same-key-1")
    err = error_of(other, 409)
    assert err["param"] == "Idempotency-Key" and err["code"] == "idempotency_key_reused"
    assert first.json()["id"] in err["message"]
    ids = [j["id"] for j in http.get("/jobs", params={"limit": 100}).json()["data"]]
    assert ids.count(first.json()["id"]) == 1 and len(ids) == len(set(ids))

    status = ended(http, first.json()["id"])
    assert status["state"] == "succeeded" and status["result"]["file"] == "dataset-idx.tar"  # idx is two files
    assert http.delete(status["url"]).status_code == 200
    assert error_of(http.get(status["url"]), 404)["code"] == "job_not_found"


def test_the_list_pages_newest_first(http: httpx.Client) -> None:
    ids = [create(http, {"class": 1, "n": 1, "seed": i}).json()["id"] for i in range(3)]
    first = http.get("/jobs", params={"limit": 2}).json()
    assert [j["id"] for j in first["data"]] == ids[::-1][:2] and first["has_more"] is True
    second = http.get("/jobs", params={"limit": 2, "after": first["last_id"]}).json()
    assert [j["id"] for j in second["data"]][:1] == ids[:1]
    for job_id in ids:
        ended(http, job_id)
        http.delete(f"/jobs/{job_id}")


def test_cancel_keeps_the_prefix_it_made_and_delete_removes_everything(
    http: httpx.Client, slow_body: dict[str, Any], server: str, error_of: Callable
) -> None:
    running = create(http, slow_body).json()
    queued = create(http, {**slow_body, "seed": 12}).json()
    assert http.get(queued["url"]).json()["queue_position"] == 1
    wait_job(http, running["id"], lambda s: s["images_done"] >= s["chunk_images"], "did not commit a chunk")

    cancelled = http.post(f"{queued['url']}/cancel")  # a queued job: at once, nothing made
    assert cancelled.status_code == 200 and cancelled.json()["state"] == "cancelled"
    assert (
        cancelled.json()["result"] is None and error_of(http.get(f"{queued['url']}/result"), 409)["code"] == "no_result"
    )

    stopped = http.post(f"{running['url']}/cancel").json()
    assert stopped["state"] == "cancelled" and stopped["chunk_images"] <= stopped["images_done"] < 200
    partial = stopped["result"]
    assert partial["partial"] is True and partial["images"] == stopped["images_done"]
    with np.load(io.BytesIO(http.get(partial["url"]).content)) as z:
        assert len(z["x"]) == stopped["images_done"]  # the prefix: images 0..k-1
    assert http.post(f"{running['url']}/cancel").json()["state"] == "cancelled"  # again: as it is

    assert http.delete(running["url"]).status_code == 200
    assert error_of(http.get(running["url"]), 404)["code"] == "job_not_found"
    assert error_of(http.get(partial["url"]), 404)["code"] == "job_not_found"
    http.delete(queued["url"])


def test_deleting_a_running_job_cancels_it_first(http: httpx.Client, slow_body: dict[str, Any]) -> None:
    job = create(http, slow_body).json()
    wait_job(http, job["id"], lambda s: s["state"] == "running", "did not start")
    assert http.delete(job["url"]).status_code == 200
    assert http.get(job["url"]).status_code == 404
    follow = create(http, {"class": 2, "n": 2, "seed": 1}).json()  # the runner goes on with the next
    assert ended(http, follow["id"])["state"] == "succeeded"
    http.delete(follow["url"])


def test_a_full_queue_is_429_with_retry_after(
    http: httpx.Client, slow_body: dict[str, Any], error_of: Callable
) -> None:
    jobs = [create(http, {**slow_body, "seed": s}).json() for s in (1, 2)]
    wait_job(http, jobs[0]["id"], lambda s: s["state"] == "running", "did not start")
    jobs.append(create(http, {**slow_body, "seed": 3}).json())  # the second queued one: FASHION_JOB_QUEUE_SIZE=2
    try:
        refused = create(http, {**slow_body, "seed": 4})
        err = error_of(refused, 429)
        assert err["code"] == "job_queue_full" and int(refused.headers["retry-after"]) >= 1
    finally:
        for job in jobs:
            http.delete(job["url"])


def test_a_job_over_the_disk_quota_is_refused_up_front(http: httpx.Client, error_of: Callable) -> None:
    err = error_of(create(http, {"counts": [300] * 10}), 413)  # 3000 images * 1.7 kB > 4 MB
    assert err["param"] == "counts" and err["code"] == "disk_quota"
    assert "FASHION_JOB_DISK_QUOTA_BYTES=4000000" in err["message"]


@pytest.mark.parametrize(
    ("body", "status", "param", "code"),
    [
        ({"counts": [1] * 9}, 422, "counts", "too_short"),
        ({"counts": [1] * 10, "class": 1, "n": 1}, 422, "counts", "invalid_value"),
        ({"class": 1}, 422, "n", "missing"),
        ({}, 422, "counts", "missing"),
        ({"counts": [0] * 10}, 422, "counts", "invalid_value"),
        ({"class": 1, "n": 200_001}, 422, "n", "less_than_equal"),
        ({"counts": [30_000] * 10}, 422, "counts", "too_many_images"),
        ({"class": 1, "n": 1, "format": "csv"}, 422, "format", "format_value"),
        ({"class": 1, "n": 1, "model": "nope"}, 404, "model", "model_not_found"),
        ({"class": 1, "n": 1, "sampler": "nope"}, 422, "sampler", "sampler_value"),
        ({"class": 1, "n": 1, "steps": 0}, 422, "steps", "greater_than_equal"),
        ({"class": 1, "n": 1, "guidance_method": "autoguidance"}, 422, "guidance_method", "no_guide"),
        ({"class": 1, "n": 1, "webhook_url": "ftp://example.com/x"}, 422, "webhook_url", "invalid_webhook_url"),
        ({"class": 1, "n": 1, "colour": "red"}, 422, "colour", "extra_forbidden"),
    ],
)
def test_bad_specs_name_the_field(
    http: httpx.Client, body: dict[str, Any], status: int, param: str, code: str, error_of: Callable
) -> None:
    err = error_of(create(http, body), status)
    assert (err["param"], err["code"]) == (param, code), err


def test_bad_keys_and_webhooks_at_this_service_are_refused(http: httpx.Client, server: str, error_of: Callable) -> None:
    err = error_of(create(http, {"class": 1, "n": 1}, key="has space"), 422)
    assert err["param"] == "Idempotency-Key"
    port = httpx.URL(server).port
    for url in (f"{server}/jobs", f"http://localhost:{port}/hook"):
        err = error_of(create(http, {"class": 1, "n": 1, "webhook_url": url}), 422)
        assert err["param"] == "webhook_url" and "this service" in err["message"]


def test_a_job_of_another_replicas_store_is_pinned_there(
    http: httpx.Client, server_dir: Path, error_of: Callable
) -> None:
    """Two replicas on one FASHION_JOB_DIR keep two stores: a job of the other's is a 409 naming it."""
    job = create(http, {"class": 1, "n": 1}).json()
    mine = job["id"].split("-")[0]
    other = server_dir / "replica-7"
    other.mkdir()
    (other / "store.json").write_text(json.dumps({"id": "0123abcd"}))
    (other / "holder.json").write_text(json.dumps({"replica": "fashion#other"}))
    err = error_of(http.get("/jobs/0123abcd-0000000000000000"), 409)
    assert err["code"] == "job_on_other_replica" and "fashion#other" in err["message"]
    assert error_of(http.get("/jobs/99999999-0000000000000000"), 404)["code"] == "job_not_found"
    assert error_of(http.get(f"/jobs/{mine}-0000000000000000"), 404)["code"] == "job_not_found"
    assert error_of(http.get("/jobs/not-a-job"), 404)["param"] == "job_id"
    ended(http, job["id"])
    http.delete(job["url"])


def test_openapi_documents_the_job_request_and_its_limits(http: httpx.Client) -> None:
    schema = http.get("/openapi.json").json()
    body = schema["components"]["schemas"]["JobRequest"]["properties"]
    assert body["n"]["anyOf"][0]["maximum"] == 200_000  # FASHION_JOB_MAX_IMAGES
    assert body["format"]["enum"] == ["idx", "npz", "parquet"]  # the exporters of app.datasets.formats
    assert {"/jobs", "/jobs/{job_id}", "/jobs/{job_id}/events", "/jobs/{job_id}/result"} <= set(schema["paths"])
