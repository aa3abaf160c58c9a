"""Webhooks of jobs, received by a real HTTP server on 127.0.0.1: signed per Standard Webhooks (checked with
the standardwebhooks package's own verify), retried with backoff after failures, every attempt shown in
the job's status and counted in the metrics; a server without a secret refuses a webhook_url."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from standardwebhooks import Webhook

from app.main import create_app
from testkit.jobs import WEBHOOK_SECRET, WebhookReceiver, ended, wait_job
from testkit.metrics import moved
from testkit.servers import wait_for

pytestmark = pytest.mark.timeout(120)


def test_a_webhook_is_signed_and_retried_until_delivered(http: httpx.Client) -> None:
    before = http.get("/metrics").text
    with WebhookReceiver(fail=2) as hook:
        job = http.post("/jobs", json={"class": 3, "n": 2, "seed": 1, "webhook_url": hook.url}).json()
        assert job["webhook"] == {"url": hook.url, "state": None, "attempts": []}
        status = wait_job(http, job["id"], lambda s: s["webhook"]["state"] == "delivered", "webhook not delivered")
    attempts = status["webhook"]["attempts"]
    assert [(a["attempt"], a["status_code"]) for a in attempts] == [(1, 500), (2, 500), (3, 204)]
    assert [a["error"] for a in attempts] == ["HTTP 500", "HTTP 500", None]
    assert attempts[0]["at"] < attempts[1]["at"] < attempts[2]["at"]

    verifier = Webhook(WEBHOOK_SECRET)
    ids = set()
    for headers, body, _ in hook.received:
        payload = verifier.verify(body, headers)  # raises unless the signature is right
        ids.add(headers["webhook-id"])
        assert payload["type"] == "job.succeeded" and payload["data"]["id"] == job["id"]
        assert payload["data"]["state"] == "succeeded" and payload["data"]["result"]["sha256"]
    assert ids == {f"msg_{job['id']}_succeeded"}  # one message, sent three times
    assert len({body for _, body, _ in hook.received}) == 1

    forged = dict(hook.received[-1][0], **{"webhook-signature": "v1,AAAA"})
    with pytest.raises(Exception, match="signature"):
        verifier.verify(hook.received[-1][1], forged)
    after = http.get("/metrics").text
    assert moved(before, after, "fashion_webhook_deliveries_total", outcome="retry") == 2
    assert moved(before, after, "fashion_webhook_deliveries_total", outcome="delivered") == 1
    http.delete(job["url"])


def test_a_cancelled_job_tells_its_webhook_and_a_dead_receiver_is_given_up(http: httpx.Client, slow_body: dict) -> None:
    with WebhookReceiver() as hook:
        job = http.post("/jobs", json={**slow_body, "webhook_url": hook.url}).json()
        wait_job(http, job["id"], lambda s: s["state"] == "running", "did not start")
        http.post(f"{job['url']}/cancel")
        wait_for(lambda: len(hook.received) == 1, "no job.cancelled webhook")
    payload = hook.payloads()[0]
    assert payload["type"] == "job.cancelled" and payload["data"]["state"] == "cancelled"

    dead = hook.url  # the receiver is closed now: every attempt fails to connect
    gone = http.post("/jobs", json={"class": 1, "n": 1, "webhook_url": dead}).json()
    status = wait_job(http, gone["id"], lambda s: s["webhook"]["state"] == "failed", "never gave up")
    assert len(status["webhook"]["attempts"]) == 4  # FASHION_WEBHOOK_ATTEMPTS
    assert all(a["status_code"] is None and a["error"] for a in status["webhook"]["attempts"])
    for j in (job, gone):
        http.delete(j["url"])


def test_without_a_secret_a_webhook_url_is_refused_and_the_api_key_guards_jobs(
    job_settings: Callable, tmp_path: Path, error_of: Callable
) -> None:
    settings = job_settings(tmp_path / "jobs", webhook_secret=None, api_key="k3y", warmup=False)
    with TestClient(create_app(settings)) as client:
        assert error_of(client.post("/jobs", json={"class": 1, "n": 1}), 401)["code"] == "missing_api_key"
        assert error_of(client.get("/jobs"), 401)["code"] == "missing_api_key"
        client.headers["Authorization"] = "Bearer k3y"
        answer = client.post("/jobs", json={"class": 1, "n": 1, "webhook_url": "http://127.0.0.1:9/hook"})
        err = error_of(answer, 422)
        assert err["param"] == "webhook_url" and "FASHION_WEBHOOK_SECRET" in err["message"]
        ok = client.post("/jobs", json={"class": 1, "n": 1, "seed": 3}).json()  # without a webhook: fine
        status = ended(client, ok["id"])
        assert status["state"] == "succeeded" and status["webhook"] is None
        head = client.head(status["result"]["url"])
        assert head.status_code == 200 and int(head.headers["content-length"]) == status["result"]["bytes"]
