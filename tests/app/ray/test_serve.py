"""The service on Ray Serve: `serve run deploy/ray/serve-cpu.yaml` (2 CPU replicas) in a subprocess, on a
local Ray cluster of its own, with the tiny network, the tiny CLIP and an API key; everything through
Ray's HTTP proxy on a free loopback port.

One cluster for the module (starting it costs ~15 s); the fault test kills a replica, so it runs last.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml  # comes with ray (the ray extra, part of dev)

pytestmark = [pytest.mark.ray, pytest.mark.timeout(420)]  # the first test waits for the cluster too
REPO = Path(__file__).resolve().parents[3]

KEY = "ray-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
SETTINGS = {  # FASHION_* for every replica, and for the single process they are compared with
    "CLIP_MODEL": "fashion-clip-tiny",
    "CLIP_PRETRAINED": "",
    "CLIP_RANDOM_INIT": "true",
    "CLIP_DOWNLOAD": "false",
    "API_KEY": KEY,
}


def test_the_configs_are_serve_configs_and_the_single_process_service_never_imports_ray() -> None:
    from ray.serve.schema import ServeDeploySchema

    gpu, cpu = (
        ServeDeploySchema.model_validate(yaml.safe_load((REPO / "deploy/ray" / name).read_text()))
        for name in ("serve.yaml", "serve-cpu.yaml")
    )
    (gpu_app,), (cpu_app,) = gpu.applications, cpu.applications
    assert gpu_app.import_path == cpu_app.import_path == "app.ray.deployment:deployment"
    gpu_dep, cpu_dep = gpu_app.deployments[0], cpu_app.deployments[0]
    assert gpu_dep.ray_actor_options.num_gpus == 1  # one GPU per replica
    assert 1 <= gpu_dep.autoscaling_config["min_replicas"] < gpu_dep.autoscaling_config["max_replicas"]
    assert cpu_dep.num_replicas == 2 and cpu_dep.ray_actor_options.num_cpus == 1
    assert cpu_app.runtime_env["env_vars"]["OMP_NUM_THREADS"] == "1"
    assert (cpu.http_options.host, cpu.http_options.port) == ("127.0.0.1", 8000)  # as python -m app
    for config in (gpu, cpu):  # `serve run` of the config alone has the proxy load app.ray.proxy
        assert config.controller_options is not None and config.controller_options.runtime_env is not None
        proxy_env = config.controller_options.runtime_env["env_vars"]
        assert proxy_env["RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"] == "app.ray.proxy:middlewares"
    code = "import sys, app.main, app.__main__; print(sorted(m for m in sys.modules if m.split('.')[0] == 'ray'))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stderr


def replica_actors(ray_tmp: Path) -> set[str]:
    """The live replica actors' names, asked of the cluster by a short-lived driver."""
    code = (
        "import ray, json; ray.init(address='auto', logging_level='ERROR'); "
        "from ray.util.state import list_actors; "
        "print(json.dumps([a.name for a in list_actors(filters=[('state', '=', 'ALIVE')]) "
        "if a.name and a.name.startswith('SERVE_REPLICA')]))"
    )
    env = {**os.environ, "RAY_TMPDIR": str(ray_tmp)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


@contextlib.contextmanager
def actor_killer(ray_tmp: Path) -> Iterator[Callable[[str], None]]:
    """``kill(name)`` kills a named actor at once: a driver connects to the cluster before the block
    (seconds on a busy machine), then kills each name written to it. A request on the victim cannot
    finish while the killing driver is still starting."""
    code = (
        "import ray, sys; ray.init(address='auto', logging_level='ERROR'); print('ready', flush=True)\n"
        "for line in sys.stdin:\n"
        "    ray.kill(ray.get_actor(line.strip(), namespace='serve'), no_restart=True); print('killed', flush=True)"
    )
    env = {**os.environ, "RAY_TMPDIR": str(ray_tmp)}
    with subprocess.Popen(
        [sys.executable, "-c", code], env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    ) as driver:
        assert driver.stdin is not None and driver.stdout is not None
        assert driver.stdout.readline().strip() == "ready", "the killing driver could not connect"

        def kill(name: str) -> None:
            driver.stdin.write(name + "\n")
            driver.stdin.flush()
            assert driver.stdout.readline().strip() == "killed", f"could not kill {name}"

        try:
            yield kill
        finally:
            driver.stdin.close()
            driver.wait(timeout=60)


@pytest.fixture(scope="module")
def ray_service(
    tmp_path_factory: pytest.TempPathFactory, app_weights: Path, tiny_classifier: Path, free_port: Callable[[], int]
) -> Iterator[tuple[str, Path]]:
    """(proxy URL, Ray's temp dir): the shipped CPU config with only its port changed."""
    config = yaml.safe_load((REPO / "deploy/ray/serve-cpu.yaml").read_text())
    config["http_options"]["port"] = port = free_port()
    work = tmp_path_factory.mktemp("ray-serve")
    (work / "serve.yaml").write_text(yaml.safe_dump(config))
    # Ray's sockets live under its temp dir, whose path must stay short (AF_UNIX allows ~107 bytes).
    ray_tmp = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FASHION_", "RAY_"))}
    env.update({f"FASHION_{k}": v for k, v in SETTINGS.items()})
    env.update(
        FASHION_WEIGHTS=str(app_weights),
        FASHION_CLASSIFIER_WEIGHTS=str(tiny_classifier),
        RAY_TMPDIR=str(ray_tmp),
        PYTHONPATH=str(REPO),
        # On a busy 2-core machine the controller's 5 s check of a starting proxy can time out three
        # times over, and `serve run` gives up: give it the time it needs there.
        RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S="60",
        RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S="60",
    )
    serve = Path(sys.executable).parent / "serve"
    log = (work / "serve.log").open("w")
    proc = subprocess.Popen(
        [str(serve), "run", str(work / "serve.yaml")], cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300  # ~15 s on an idle machine, minutes on a loaded one
        while len(replica_ids(url)) < 2:  # both replicas up and answering through the proxy
            assert proc.poll() is None, (work / "serve.log").read_text()[-4000:]
            assert time.monotonic() < deadline, (work / "serve.log").read_text()[-4000:]
            time.sleep(0.5)
        yield url, ray_tmp
    finally:
        proc.terminate()  # serve run shuts the application and its local cluster down on SIGTERM
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def replica_ids(url: str, tries: int = 12) -> set[str]:
    """The replicas that answered ``tries`` concurrent /readyz calls with 200."""

    async def ask() -> set[str]:
        async with httpx.AsyncClient(timeout=5) as c:
            rs = await asyncio.gather(*(c.get(f"{url}/readyz") for _ in range(tries)), return_exceptions=True)
        return {r.headers["x-replica"] for r in rs if isinstance(r, httpx.Response) and r.status_code == 200}

    return asyncio.run(ask())


async def generate_many(url: str, bodies: list[dict[str, Any]], **headers: str) -> list[httpx.Response]:
    async with httpx.AsyncClient(timeout=60, headers={**AUTH, **headers}) as c:
        return await asyncio.gather(*(c.post(f"{url}/generate", json=b) for b in bodies))


def from_both_replicas(batch: Callable[[], list[httpx.Response]], timeout: float = 120) -> list[httpx.Response]:
    """Responses of ``batch()`` (each a 200), repeated until both replicas have answered. Ray's router
    spreads concurrent requests, but on a busy machine one batch may all land on one replica (a queue-length
    probe that misses its deadline takes the other out of the draw for a while)."""
    responses: list[httpx.Response] = []
    deadline = time.monotonic() + timeout
    while len({r.headers["x-replica"] for r in responses}) < 2:
        assert time.monotonic() < deadline, f"only {responses[0].headers['x-replica']} answered"
        more = batch()
        assert all(r.status_code == 200 for r in more), [r.text for r in more]
        responses += more
    return responses


def test_both_replicas_sample_and_name_themselves(ray_service, decode_png) -> None:
    url, _ = ray_service
    bodies = [{"class": 3, "n": 2, "seed": 11} for _ in range(12)]
    responses = from_both_replicas(lambda: asyncio.run(generate_many(url, bodies)))
    assert all(r.json()["timings"]["replica"] == r.headers["x-replica"] for r in responses)
    # The same seed gives the same bytes whichever replica sampled it.
    assert len({tuple(img["png"] for img in r.json()["images"]) for r in responses}) == 1
    assert decode_png(responses[0].json()["images"][0]["png"]).shape == (28, 28)


def single_process(spawn_app: Callable[..., Any], tiny_classifier: Path) -> str:
    """``python -m app`` with the replicas' settings (1 thread, as each replica has)."""
    _, url = spawn_app(classifier_weights=str(tiny_classifier), **{k.lower(): v for k, v in SETTINGS.items()})
    return url


def test_pngs_equal_the_single_process_service(ray_service, spawn_app, tiny_classifier) -> None:
    url, _ = ray_service
    single = single_process(spawn_app, tiny_classifier)
    body = {"class": "ankle boot", "n": 4, "seed": 5, "sampler": "ddim", "steps": 4}
    grid = {"Accept": "image/png"}
    ray_png = httpx.post(f"{url}/generate", json=body, headers={**AUTH, **grid}, timeout=60)
    one_png = httpx.post(f"{single}/generate", json=body, headers={**AUTH, **grid}, timeout=60)
    assert ray_png.status_code == one_png.status_code == 200
    assert ray_png.headers["content-type"] == "image/png"
    assert ray_png.content == one_png.content
    assert ray_png.headers["x-seeds"] == one_png.headers["x-seeds"] == "5,6,7,8"
    ray_json = httpx.post(f"{url}/generate", json=body, headers=AUTH, timeout=60).json()
    one_json = httpx.post(f"{single}/generate", json=body, headers=AUTH, timeout=60).json()
    assert ray_json["images"] == one_json["images"]
    assert ray_json["timings"]["replica"] != one_json["timings"]["replica"]


def test_streams_run_through_the_proxy(ray_service, parse_sse, decode_png) -> None:
    url, _ = ray_service
    body = {"class": 1, "n": 2, "seed": 3, "steps": 3, "preview_every": 1}
    r = httpx.post(f"{url}/generate/stream", json=body, headers=AUTH, timeout=60)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = parse_sse(r.text)
    names = [name for name, _ in events]
    assert names == ["start", "step", "step", "step", "done"]
    assert events[0][1]["replica"] == r.headers["x-replica"]
    assert decode_png(events[1][1]["x0_png"]).shape[0] >= 28
    plain = httpx.post(f"{url}/generate", json={"class": 1, "n": 2, "seed": 3, "steps": 3}, headers=AUTH, timeout=60)
    assert [img["png"] for img in events[-1][1]["images"]] == [img["png"] for img in plain.json()["images"]]
    # The browser's EventSource form, with the key in the query.
    r = httpx.get(f"{url}/generate/stream", params={"class": "bag", "n": 1, "steps": 2, "api_key": KEY}, timeout=60)
    assert [name for name, _ in parse_sse(r.text)][-1] == "done"


def test_openai_urls_are_drawn_by_either_replica_and_openai_streams_run_through_the_proxy(ray_service) -> None:
    import openai

    url, _ = ray_service
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=60)
    common: dict[str, Any] = {"prompt": "a bag", "n": 2, "size": "56x56", "extra_body": {"seed": 4}}
    links = [d.url or "" for d in client.images.generate(response_format="url", **common).data or []]
    inline = [base64.b64decode(d.b64_json or "") for d in client.images.generate(**common).data or []]
    assert all(link.startswith(f"{url}/v1/images/files/") for link in links)

    async def fetch_each_six_times() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=60) as c:  # a browser's fetch: no key
            return await asyncio.gather(*(c.get(link) for link in links for _ in range(6)))

    # A URL is drawn by whichever replica gets it, with the same bytes.
    fetched = from_both_replicas(lambda: asyncio.run(fetch_each_six_times()))
    batch = [file for file in inline for _ in range(6)]
    assert [r.content for r in fetched] == batch * (len(fetched) // len(batch))
    events = list(client.images.generate(prompt="bag", stream=True, partial_images=2, extra_body={"seed": 4}))
    assert [e.type for e in events] == ["image_generation.partial_image"] * 2 + ["image_generation.completed"]


def test_a_disconnected_stream_cancels_its_job(ray_service, metric) -> None:
    url, _ = ray_service

    async def leave_early() -> str:
        body = {"class": 0, "n": 1, "sampler": "ddim", "steps": 1000, "preview_every": 1}
        async with (
            httpx.AsyncClient(timeout=60, headers=AUTH) as c,
            c.stream("POST", f"{url}/generate/stream", json=body) as r,
        ):
            replica = r.headers["x-replica"]
            async for line in r.aiter_lines():
                if line.startswith("event: step"):
                    return replica  # leaving the block closes the connection
        raise AssertionError("no step event")

    replica = asyncio.run(leave_early())
    deadline = time.monotonic() + 30
    while True:  # /metrics answers for the replica it lands on: ask until the right one answers
        r = httpx.get(f"{url}/metrics", timeout=10)
        if r.headers["x-replica"] == replica and metric(r.text, "fashion_jobs_cancelled_total", stage="running") >= 1:
            break
        assert time.monotonic() < deadline, "the job was not cancelled"
        time.sleep(0.2)


def test_clip_rerank_errors_and_the_key_behave_as_in_one_process(ray_service, spawn_app, tiny_classifier, error_of):
    url, _ = ray_service
    single = single_process(spawn_app, tiny_classifier)
    deadline = time.monotonic() + 120
    while any(httpx.get(f"{u}/readyz", timeout=10).json()["clip"]["status"] == "loading" for u in (url, single)):
        assert time.monotonic() < deadline, "CLIP did not load"
        time.sleep(0.5)
    png = httpx.post(f"{single}/generate", json={"class": 3, "n": 1, "seed": 1}, headers=AUTH, timeout=60)
    score = {"images": [png.json()["images"][0]["png"]], "texts": ["a dress", "a boot"]}
    rerank = {"class": 3, "n": 2, "seed": 9, "rerank": {"by": "clip", "candidates": 4}}
    by_classifier = {**rerank, "rerank": {"by": "classifier", "candidates": 4}}
    a, b = (httpx.post(f"{u}/clip/score", json=score, headers=AUTH, timeout=60) for u in (url, single))
    assert a.status_code == b.status_code == 200, (a.text, b.text)
    assert a.json()["similarity"] == [pytest.approx(row, rel=1e-5) for row in b.json()["similarity"]]
    for body in (rerank, by_classifier):
        a, b = (httpx.post(f"{u}/generate", json=body, headers=AUTH, timeout=60) for u in (url, single))
        assert a.status_code == b.status_code == 200, (a.text, b.text)
        assert a.json()["images"] == b.json()["images"]  # the same candidates, the same order, the same scores
        assert a.json()["rerank"]["scores"] == pytest.approx(b.json()["rerank"]["scores"], rel=1e-5)
    # Errors: the same status and error object, field named.
    for body in [{"class": 10, "n": 1}, {"class": 1, "n": 0}, {"class": 1, "sampler": "euler"}]:
        a = httpx.post(f"{url}/generate", json=body, headers=AUTH, timeout=30)
        b = httpx.post(f"{single}/generate", json=body, headers=AUTH, timeout=30)
        assert a.status_code == b.status_code == 422
        assert error_of(a, 422) == error_of(b, 422)
    a, b = (httpx.post(f"{u}/generate", json={"class": 1, "n": 1}, timeout=30) for u in (url, single))
    assert error_of(a, 401) == error_of(b, 401)


def test_every_replicas_engine_metrics_reach_rays_prometheus_export(ray_service) -> None:
    url, ray_tmp = ray_service
    asyncio.run(generate_many(url, [{"class": 2, "n": 1, "steps": 2} for _ in range(8)]))
    # Ray writes a Prometheus file_sd file listing every node's metrics agent (deploy/prometheus.yml reads it).
    discovery = next(ray_tmp.rglob("prom_metrics_service_discovery.json"))
    deadline = time.monotonic() + 60
    while True:
        targets = [t for group in json.loads(discovery.read_text()) for t in group["targets"]]
        text = "\n".join(httpx.get(f"http://{t}/metrics", timeout=10).text for t in targets)
        lines = [line for line in text.splitlines() if line.startswith("ray_fashion_tick_rows_count{")]
        replicas = {part.split('"')[1] for line in lines for part in line.split(",") if part.startswith("replica=")}
        if len(replicas) == 2:
            break
        assert time.monotonic() < deadline, f"engine metrics of 2 replicas expected, got {replicas}"
        time.sleep(1)
    assert replicas == replica_ids(url, tries=16)


def test_a_job_is_pinned_to_its_replica_and_the_others_name_it(ray_service) -> None:
    """Jobs under two replicas that share one FASHION_JOB_DIR: each keeps its own store, a job lives in the
    replica that created it, and a status read that the proxy sends to the other replica is a 409 naming the
    owner, never a 404; polled until both replicas have answered, the job ends with its result."""
    url, _ = ray_service
    with httpx.Client(base_url=url, headers=AUTH, timeout=60) as http:
        created = http.post("/jobs", json={"class": 2, "n": 8, "steps": 2, "seed": 5, "format": "npz"})
        assert created.status_code == 202, created.text
        job = created.json()
        owner, seen = job["replica"], set()
        assert created.headers["x-replica"] == owner
        deadline = time.monotonic() + 240
        state = job["state"]
        while state != "succeeded" or len(seen) < 2:
            assert time.monotonic() < deadline, (seen, state)
            r = http.get(f"/jobs/{job['id']}")
            seen.add(r.headers["x-replica"])
            if r.status_code == 200:
                assert r.headers["x-replica"] == owner
                state = r.json()["state"]
                assert state in ("queued", "running", "succeeded"), r.json()
            else:
                assert r.status_code == 409, r.text
                error = r.json()["error"]
                assert error["code"] == "job_on_other_replica" and owner in error["message"], error
                assert r.headers["retry-after"] == "1"
        assert owner in seen and len(seen) == 2


# Deadlines, not waits: on a loaded 2-core machine (two suites at once) a 600-step request, and Ray starting a
# replacement replica (torch, the weights, the warm-up), each take several times what they take on a quiet one.
@pytest.mark.timeout(900)
def test_a_killed_replica_is_replaced_and_its_requests_end_clearly(ray_service, parse_sse) -> None:
    url, ray_tmp = ray_service
    before = replica_actors(ray_tmp)
    assert len(before) == 2
    # One image (two guided rows) each: however the router spreads the eight, a replica's jobs fit in one
    # 16-row tick, so they all step from the start and none is near its end when the victim dies.
    long = {"class": 4, "n": 1, "sampler": "ddim", "steps": 600}  # ~6 s alone

    async def run() -> tuple[str, list[Any]]:
        stepping: dict[int, str] = {}  # stream -> its replica, once its first step event has arrived

        async with httpx.AsyncClient(timeout=240, headers=AUTH) as c:

            async def stream(i: int) -> tuple[str, str, list[str], list[Any]]:
                async with c.stream("POST", f"{url}/generate/stream", json={**long, "preview_every": 50}) as r:
                    replica = r.headers["x-replica"]
                    text = ""
                    async for chunk in r.aiter_text():
                        text += chunk
                        if "event: step" in text:
                            stepping.setdefault(i, replica)
                events = parse_sse(text)
                return "stream", replica, [name for name, _ in events], [data for _, data in events]

            streams = [asyncio.ensure_future(stream(i)) for i in range(4)]
            unary = [asyncio.ensure_future(c.post(f"{url}/generate", json=long)) for _ in range(4)]
            # Kill a replica only once every stream is stepping and both replicas hold one (one more
            # stream at a time until they do, should the router have put all on one): the victim then
            # holds requests in flight and the survivor finishes some, whatever the machine's load.
            deadline = time.monotonic() + 180
            while len(stepping) < len(streams) or len(set(stepping.values())) < 2:
                assert time.monotonic() < deadline, f"{len(stepping)} of {len(streams)} streams stepping: {stepping}"
                if len(stepping) == len(streams) and len(streams) < 12:
                    streams.append(asyncio.ensure_future(stream(len(streams))))
                await asyncio.sleep(0.05)
            (victim,) = [name for name in before if name.rsplit("#", 1)[-1] == stepping[0]]
            await asyncio.to_thread(kill, victim)
            results = await asyncio.wait_for(asyncio.gather(*streams, *unary), timeout=240)  # never a hang
            return stepping[0], list(results)

    with actor_killer(ray_tmp) as kill:
        victim, results = asyncio.run(run())
    failed = ok = 0
    for result in results:
        if isinstance(result, tuple):
            _, replica, names, data = result
            if names[-1] == "done":
                ok += 1
                assert replica != victim
            else:  # the stream's replica died: the proxy ends it with the stream's error event
                failed += 1
                assert replica == victim and names[-1] == "error"
                assert data[-1]["error"]["code"] == "replica_failed"
        elif result.status_code == 200:
            ok += 1
            assert result.headers["x-replica"] != victim
        else:
            failed += 1
            assert result.status_code == 500 and result.headers["retry-after"] == "1"
            assert result.json()["error"]["code"] == "replica_failed"
    assert failed >= 1 and ok >= 1, results
    # Ray starts a replacement, and both replicas serve again.
    deadline = time.monotonic() + 240
    while True:
        now = replica_actors(ray_tmp)
        served = replica_ids(url, tries=16)
        if len(now) == 2 and now != before and len(served) == 2:
            break
        assert time.monotonic() < deadline, f"no replacement: {now}, serving {served}"
        time.sleep(1)
    assert victim not in served
