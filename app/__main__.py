"""``python -m app [--host H] [--port P]``: serve with uvicorn; settings come from FASHION_* variables.

Exits non-zero (uvicorn's 3) when startup fails, e.g. missing or corrupt weights.
"""

from __future__ import annotations

import argparse
import os

import uvicorn


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m app", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1", help="interface to bind (0.0.0.0 for all)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--weights", help="weights .safetensors (default: FASHION_WEIGHTS or the shipped weights)")
    parser.add_argument("--device", help="auto, cpu, cuda, cuda:N (default: FASHION_DEVICE or auto)")
    parser.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    args = parser.parse_args(argv)
    # Flags are shorthands for the environment, so Settings stays the one source of configuration.
    if args.weights:
        os.environ["FASHION_WEIGHTS"] = args.weights
    if args.device:
        os.environ["FASHION_DEVICE"] = args.device
    uvicorn.run("app.main:app", host=args.host, port=args.port, log_level=args.log_level)


if __name__ == "__main__":
    main()
