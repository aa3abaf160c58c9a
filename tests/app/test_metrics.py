"""GET /metrics: Prometheus exposition that prometheus-client's own parser reads, and counters that move."""

from __future__ import annotations

import re
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from app.main import create_app
from app.settings import Settings
from testkit import metrics

pytestmark = pytest.mark.timeout(120)

REPO = Path(__file__).resolve().parents[2]


def documented_metrics() -> dict[str, str]:
    """The table of engine metrics in the README or docs/: name -> type (counters without their _total suffix)."""
    text = "\n".join(path.read_text() for path in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))])
    rows = re.findall(r"^\| `(fashion_[a-z_]+)`(?:, [^|]*)? \| (histogram|gauge|counters?) \|", text, re.M)
    assert len(rows) >= 8, "the metric table is missing from README.md and docs/"
    return {name.removesuffix("_total"): kind.removesuffix("s") for name, kind in rows}


FAMILIES = {
    "fashion_http_requests": "counter",
    "fashion_http_request_duration_seconds": "histogram",
    "fashion_model_info": "gauge",  # an Info metric; the text format has no info type
    "fashion_ready": "gauge",
}


def test_exposition_parses_and_describes_the_model(client: TestClient) -> None:
    r = client.get("/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    families = {f.name: f for f in text_string_to_metric_families(r.text)}
    # Every metric the docs document exists, with the documented type.
    for name, kind in {**FAMILIES, **documented_metrics()}.items():
        assert name in families, name
        assert families[name].type == kind, name
    (info,) = families["fashion_model_info"].samples
    assert info.labels["name"] == "tiny-test"
    assert info.labels["device"] == "cpu"
    assert int(info.labels["parameters"]) > 1000
    assert info.labels["fixed_rows"] == "16"
    assert families["fashion_ready"].samples[0].value == 1


def test_counters_move(client: TestClient, metric: Callable, test_steps: int) -> None:
    before = client.get("/metrics").text
    assert client.post("/generate", json={"class": 1, "n": 3}).status_code == 200
    assert client.post("/generate", json={"class": 11}).status_code == 422
    after = client.get("/metrics").text

    def moved(name: str, **labels: str) -> float:
        return metrics.moved(before, after, name, **labels)

    assert moved("fashion_images_generated_total", sampler="dpm++") == 3
    assert moved("fashion_sampler_steps_total") == test_steps
    assert moved("fashion_tick_duration_seconds_count") == test_steps
    assert moved("fashion_tick_rows_sum") == 2 * 3 * test_steps  # guided: a null-class row per image
    assert moved("fashion_tick_jobs_sum") == test_steps
    assert moved("fashion_queue_wait_seconds_count") == 1
    assert moved("fashion_time_to_first_step_seconds_count") == 1
    assert moved("fashion_http_requests_total", route="/generate", method="POST", status="200") == 1
    assert moved("fashion_http_requests_total", route="/generate", method="POST", status="422") == 1
    assert moved("fashion_http_request_duration_seconds_count", route="/generate", method="POST") == 2
    assert moved("fashion_http_requests_total", route="/metrics", method="GET", status="200") == 1
    assert metric(after, "fashion_queue_depth") == 0
    # Unknown paths share one label instead of growing the label set.
    client.get("/no/such/path")
    client.get("/another/one")
    text = client.get("/metrics").text
    assert metric(text, "fashion_http_requests_total", route="unmatched", status="404") == 2


def test_concurrent_requests_share_ticks(make_settings: Callable[..., Settings], metric: Callable) -> None:
    with TestClient(create_app(make_settings())) as c:
        bodies = [{"class": k, "n": 1, "seed": k} for k in range(6)]
        with ThreadPoolExecutor(len(bodies)) as pool:
            answers = list(pool.map(lambda body: c.post("/generate", json=body), bodies))
        assert all(r.status_code == 200 for r in answers)
        text = c.get("/metrics").text
        ticks = metric(text, "fashion_tick_jobs_count")
        assert metric(text, "fashion_tick_jobs_bucket", le="1.0") < ticks  # some ticks carried 2+ requests
        assert max(r.json()["timings"]["batch_jobs"] for r in answers) >= 2
        # Each image is still the one its own class and seed ask for.
        assert [r.json()["params"]["class"] for r in answers] == list(range(6))
