"""The service on a free loopback port: as a process (``python -m app``; ``Spawner`` for several, killed
together) or under uvicorn in a thread, and waiting for what it does on other threads, with a deadline
and never a fixed sleep."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    """A loopback port nobody listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(check: Callable[[], bool], what: str, timeout: float = 60.0, interval: float = 0.02) -> None:
    """Poll ``check`` until it is true; AssertionError naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"{what} (within {timeout:.0f} s)"
        time.sleep(interval)


def wait_ready(
    url: str,
    proc: subprocess.Popen[Any] | None = None,
    timeout: float = 120.0,
    until: Callable[[httpx.Response], bool] | None = None,
) -> None:
    """Wait until ``GET url/readyz`` answers 200 (or satisfies ``until``); fails at once, with the
    process's output when it was captured, if ``proc`` exits first."""

    def ready() -> bool:
        if proc is not None and proc.poll() is not None:
            output = proc.communicate()[0] if proc.stdout is not None else ""
            raise AssertionError(f"the server exited with {proc.returncode} before it was ready\n{output or ''}")
        try:
            r = httpx.get(f"{url}/readyz", timeout=5)
        except httpx.TransportError:
            return False
        return until(r) if until is not None else r.status_code == 200

    wait_for(ready, f"{url}/readyz not ready", timeout, interval=0.1)


def app_env(settings: Mapping[str, str], *, repo: Path = REPO, keep: bool = False) -> dict[str, str]:
    """The environment of a server process: ``settings`` as ``FASHION_<NAME>``, ``repo`` first on the
    path; this process's own FASHION_* variables only with ``keep``."""
    env = {k: v for k, v in os.environ.items() if keep or not k.startswith("FASHION_")}
    env.update({f"FASHION_{k.upper()}": str(v) for k, v in settings.items()})
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(repo), env.get("PYTHONPATH")]))
    return env


def start_app(
    settings: Mapping[str, str],
    *,
    args: Sequence[str] = ("-m", "app"),
    repo: Path = REPO,
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
    capture: bool = True,
    ready: bool = True,
    timeout: float = 120.0,
) -> tuple[subprocess.Popen[str], str]:
    """``python -m app`` (or ``args``) from ``repo`` on a free loopback port, with ``settings`` as
    FASHION_* variables (``env``: the whole environment instead, e.g. ``app_env(..., keep=True)``);
    once /readyz says 200 unless ``ready=False``. (process, base URL); stopping it is the caller's."""
    port = free_port()
    command = [sys.executable, *args, "--port", str(port)]
    out = subprocess.PIPE if capture else None
    proc = subprocess.Popen(
        command,
        cwd=cwd or repo,
        env=dict(env) if env is not None else app_env(settings, repo=repo),
        stdout=out,
        stderr=subprocess.STDOUT if capture else None,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    if ready:
        try:
            wait_ready(url, proc, timeout)
        except BaseException:
            stop(proc)
            raise
    return proc, url


def stop(proc: subprocess.Popen[Any], timeout: float = 60.0) -> None:
    """SIGTERM (the server drains), then SIGKILL if it has not exited within ``timeout`` seconds."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
    proc.communicate()


class Spawner:
    """``spawn(*args, ready=True, **settings)``: ``python -m app`` (or ``args``) as a real process, by
    :func:`start_app`, with ``settings`` over ``defaults`` (FASHION_* names without the prefix; a
    ``models`` setting drops a ``weights`` default, the one-model form of the same setting), one
    thread per process, in ``cwd``; once /readyz says 200 unless ``ready=False``. (process, base URL).

    ``close`` (or the end of ``with Spawner(...) as spawn:``) kills whatever is still running, so one
    Spawner serves a test, or a module whose tests share one server."""

    def __init__(self, defaults: Mapping[str, str], cwd: Path | None = None, timeout: float = 90.0) -> None:
        self.defaults, self.cwd, self.timeout = dict(defaults), cwd, timeout
        self.procs: list[subprocess.Popen[str]] = []

    def __call__(self, *args: str, ready: bool = True, **settings: str) -> tuple[subprocess.Popen[str], str]:
        defaults = {k: v for k, v in self.defaults.items() if not (k == "weights" and "models" in settings)}
        values = {**defaults, **settings}
        env = {**app_env(values), "OMP_NUM_THREADS": "1"}
        proc, url = start_app(values, args=args or ("-m", "app"), cwd=self.cwd, env=env, ready=False)
        self.procs.append(proc)
        if ready:
            wait_ready(url, proc, self.timeout)
        return proc, url

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()

    def __enter__(self) -> Spawner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@contextlib.contextmanager
def serve_in_thread(settings: Any, log_level: str = "warning", port: int | None = None) -> Iterator[str]:
    """``with serve_in_thread(settings) as url:`` the real app of ``app.main.create_app(settings)``
    under uvicorn in a thread, on a free loopback port (or ``port``: a restart on the same address),
    until the block ends."""
    import uvicorn

    from app.main import create_app

    port = port or free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, log_level=log_level))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_for(lambda: server.started or not thread.is_alive(), "uvicorn did not start")
    assert thread.is_alive(), "uvicorn stopped while starting"
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)
    assert not thread.is_alive()
