"""Poll-with-deadline helpers: the tests' only way to wait for something to become true."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")


async def eventually(check: Callable[[], Awaitable[T] | T], *, timeout: float = 10.0, interval: float = 0.05,
                     what: str = "condition") -> T:
    """Awaits ``check()`` until it returns a truthy value; fails with the last value or error."""
    deadline = time.monotonic() + timeout
    last: object = None
    while True:
        try:
            result = check()
            if asyncio.iscoroutine(result) or isinstance(result, Awaitable):
                result = await result
            if result:
                return result
            last = result
        except AssertionError as exc:
            last = exc
        if time.monotonic() >= deadline:
            raise AssertionError(f"{what} not reached within {timeout} s (last: {last!r})")
        await asyncio.sleep(interval)


def eventually_sync(check: Callable[[], T], *, timeout: float = 10.0, interval: float = 0.05,
                    what: str = "condition") -> T:
    deadline = time.monotonic() + timeout
    last: object = None
    while True:
        try:
            result = check()
            if result:
                return result
            last = result
        except AssertionError as exc:
            last = exc
        if time.monotonic() >= deadline:
            raise AssertionError(f"{what} not reached within {timeout} s (last: {last!r})")
        time.sleep(interval)
