"""Blocking torch work awaited from the event loop, on threads that end with it."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


async def on_fresh_thread(fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)`` on a new thread that ends with it, awaited on the event loop.

    With torch's OpenMP build, every thread that runs a parallel region keeps its own team of
    OpenMP workers for as long as it lives, and once the process holds more such workers than CPUs,
    libgomp stops spinning and wakes them through the kernel at every parallel region: the engine's
    ticks then ran 2x slower on 2 cores, measured, because the weights had been loaded on a worker
    thread that stayed alive in a pool. A thread that ends takes its team with it, so torch work at
    startup runs here, and the engine's device thread keeps the only team."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[T] = loop.create_future()

    def settle(result: Any, error: BaseException | None) -> None:
        if done.done():  # the awaiting task was cancelled meanwhile
            return
        if error is not None:
            done.set_exception(error)
        else:
            done.set_result(result)

    def run() -> None:
        try:
            loop.call_soon_threadsafe(settle, fn(*args), None)
        except BaseException as error:  # handed to the awaiting task
            loop.call_soon_threadsafe(settle, None, error)

    threading.Thread(target=run, name="fashion-load", daemon=True).start()
    return await done
