"""``python -m app [--host H] [--port P]``: serve with uvicorn; settings come from FASHION_* variables.

SIGTERM or Ctrl-C drains (``app.main.begin_drain``): the listener closes, new generations get 503,
running and queued jobs, streams included, get ``FASHION_DRAIN_SECONDS`` to finish and be delivered,
and then the process exits 0. Exits non-zero (uvicorn's 3) when startup fails, e.g. missing or
corrupt weights.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import copy
import math
import os
from collections.abc import Iterator
from types import FrameType

import uvicorn

DRAIN_MARGIN_S = 5  # uvicorn waits this much longer than the drain, so late jobs still get their 503


class DrainingServer(uvicorn.Server):
    """uvicorn's server, telling the app to drain when the exit signal comes, and exiting 0 after it
    (uvicorn re-raises the signal once it has shut down, which would end the process by SIGTERM)."""

    def __init__(self, config: uvicorn.Config, application) -> None:  # type: ignore[no-untyped-def]
        super().__init__(config)
        self.application = application

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        first = not self.should_exit
        super().handle_exit(sig, frame)
        if first:
            from app.main import begin_drain

            try:  # the handler runs on the loop's thread, between two of its callbacks
                asyncio.get_running_loop().call_soon_threadsafe(begin_drain, self.application)
            except RuntimeError:
                begin_drain(self.application)

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        with super().capture_signals():
            yield
            self._captured_signals.clear()  # drained and shut down cleanly: nothing left to re-raise


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m app", description=__doc__)
    parser.add_argument(
        "--host", default=os.environ.get("UVICORN_HOST", "127.0.0.1"), help="interface to bind (0.0.0.0 for all)"
    )
    parser.add_argument("--port", type=int, default=int(os.environ.get("UVICORN_PORT", "8000")))
    parser.add_argument(
        "--weights", help="serve this one model (FASHION_WEIGHTS; default: FASHION_MODELS or the shipped models)"
    )
    parser.add_argument("--device", help="auto, cpu, cuda, cuda:N (default: FASHION_DEVICE or auto)")
    parser.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    args = parser.parse_args(argv)
    # Flags are shorthands for the environment, so Settings stays the one source of configuration.
    if args.weights:
        os.environ["FASHION_WEIGHTS"] = args.weights
    if args.device:
        os.environ["FASHION_DEVICE"] = args.device
    from app.main import create_app

    application = create_app()
    drain = application.state.settings.drain_seconds
    log_config = copy.deepcopy(uvicorn.config.LOGGING_CONFIG)
    log_config["loggers"]["app"] = {"handlers": ["default"], "level": args.log_level.upper(), "propagate": False}
    config = uvicorn.Config(
        application,
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        log_config=log_config,
        timeout_graceful_shutdown=math.ceil(drain) + DRAIN_MARGIN_S,
    )
    DrainingServer(config, application).run()


if __name__ == "__main__":
    main()
