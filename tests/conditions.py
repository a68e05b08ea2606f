"""Bounded waits for tests: poll a condition until it holds, or fail with a message saying what never happened.

Tests never synchronise on a sleep or a wall-clock guess; the bound here only turns a hang into a failure, so it is
generous (a loaded CI box can be ten times slower than an idle one).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")
DEFAULT_TIMEOUT_S = 120.0


def wait_until(condition: Callable[[], T], what: str, timeout_s: float = DEFAULT_TIMEOUT_S, poll_s: float = 0.05) -> T:
    """Poll `condition` until it returns something truthy and return that; AssertionError naming `what` after timeout_s."""
    deadline = time.monotonic() + timeout_s
    while not (value := _poll(condition, what, timeout_s, deadline)):
        time.sleep(poll_s)
    return value


async def async_wait_until(
    condition: Callable[[], T], what: str, timeout_s: float = DEFAULT_TIMEOUT_S, poll_s: float = 0.01
) -> T:
    """wait_until for coroutines: polls without blocking the event loop."""
    deadline = time.monotonic() + timeout_s
    while not (value := _poll(condition, what, timeout_s, deadline)):
        await asyncio.sleep(poll_s)
    return value


def _poll(condition: Callable[[], T], what: str, timeout_s: float, deadline: float) -> T:
    """One call of `condition`, its value returned (falsy: not yet); AssertionError naming `what` once past the deadline."""
    value = condition()
    if not value and time.monotonic() > deadline:
        raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what} (last value: {value!r})")
    return value
