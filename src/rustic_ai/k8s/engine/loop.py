"""One background event loop per process, for the synchronous engine facade.

rusticai-core calls its engines synchronously, sometimes from a thread that is itself
running an event loop (async guild code). Driving our async engine with asyncio.run()
there would fail, and a loop per engine would multiply threads and channels. So every
`K8sExecutionEngine` in the process submits its coroutines to one daemon thread's loop.
This thread is the only one in the package; hosts and agents use none.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")

_lock = threading.Lock()
_loop: asyncio.AbstractEventLoop | None = None
_thread: threading.Thread | None = None


def background_loop() -> asyncio.AbstractEventLoop:
    global _loop, _thread
    with _lock:
        if _loop is None or _loop.is_closed() or _thread is None or not _thread.is_alive():
            loop = asyncio.new_event_loop()
            ready = threading.Event()

            def run() -> None:
                asyncio.set_event_loop(loop)
                loop.call_soon(ready.set)
                loop.run_forever()

            _thread = threading.Thread(target=run, name="rustic-k8s-engine-loop", daemon=True)
            _thread.start()
            ready.wait()
            _loop = loop
        return _loop


def run_sync(coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
    """Runs ``coro`` on the background loop and waits for it from any other thread."""
    loop = background_loop()
    if threading.current_thread() is _thread:
        coro.close()
        raise RuntimeError("run_sync called from the engine loop itself; await the async engine instead")
    future = asyncio.run_coroutine_threadsafe(coro, loop)
    try:
        return future.result(timeout)
    except concurrent.futures.TimeoutError:
        future.cancel()
        raise TimeoutError(f"engine call did not finish within {timeout} s") from None


def submit(coro: Coroutine[Any, Any, Any]) -> None:
    """Schedules ``coro`` on the background loop without waiting (any thread, the loop's own
    and a garbage collector's included: no lock is taken). Dropped if the loop is gone."""
    loop = _loop
    if loop is None or loop.is_closed() or not loop.is_running():
        coro.close()
        return
    asyncio.run_coroutine_threadsafe(coro, loop)


def _stop_at_exit() -> None:
    loop, thread = _loop, _thread
    if loop is not None and thread is not None and thread.is_alive():
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=5)
    if loop is not None and not loop.is_running() and not loop.is_closed():
        loop.close()


atexit.register(_stop_at_exit)
