"""Waits on conditions, never on the clock alone: poll until true, fail after a generous timeout."""
from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Callable

TIMEOUT_S = 120.0  # generous: a loaded 2-core machine is many times slower than an idle one


def wait_until(predicate: Callable[[], object], timeout: float = TIMEOUT_S, what: str = "condition",
               interval: float = 0.01):
    """The predicate's first truthy value; AssertionError naming `what` after `timeout` s."""
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not met within {timeout} s")
        time.sleep(interval)
    return value


async def until(predicate: Callable[[], object], timeout: float = TIMEOUT_S, what: str = "condition",
                interval: float = 0.005):
    """wait_until for coroutines: yields to the event loop between polls; the predicate may be
    a coroutine function (e.g. one that sends a request)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not (value := await _result(predicate())):
        if loop.time() > deadline:
            raise AssertionError(f"{what} not met within {timeout} s")
        await asyncio.sleep(interval)
    return value


async def _result(value):
    return await value if inspect.isawaitable(value) else value
