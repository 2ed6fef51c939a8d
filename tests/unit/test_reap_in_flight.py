"""A host asked for a hold while its own reap request is unanswered (host/reconciler.py).

The reap may still run when Redis answers again, so the grant normally waits until it has
answered or can no longer run (REAP_VALIDITY_S after sending). That wait costs the asker
most of its clean-stop margin — enough, measured, to fence every agent of a fleet through
a Redis pause that nobody could adopt in. When the reap's last possible instant comes
before the asker's lease ends (both on Redis's clock), it cannot touch the asker: no wait.
"""

from __future__ import annotations

import asyncio
import time

from rustic_ai.k8s.host.reconciler import REAP_VALIDITY_S, Reconciler


class HangingReaps:
    """A registry whose reap request never gets an answer (Redis paused)."""

    def __init__(self) -> None:
        self.sent = asyncio.Event()

    async def reap_dead_hosts(self, address, *, spare, sent_ms, validity_ms):
        self.sent.set()
        await asyncio.sleep(3600)


class FixedClockLease:
    def __init__(self, redis_ms: int) -> None:
        self.ms = redis_ms

    def redis_now_ms(self) -> int:
        return self.ms


async def in_flight_reconciler(redis_ms: int) -> tuple[Reconciler, asyncio.Task]:
    registry = HangingReaps()
    reconciler = Reconciler(
        registry,  # type: ignore[arg-type]
        address=lambda: "h2:1", interval_s=0.1, free_slots=lambda: 0, adopt=None,  # type: ignore[arg-type]
        lease=FixedClockLease(redis_ms), spare=list,  # type: ignore[arg-type]
    )
    task = asyncio.create_task(reconciler._reap())
    await registry.sent.wait()
    return reconciler, task


async def test_a_reap_that_must_run_before_the_askers_lease_ends_does_not_delay_the_grant():
    reconciler, task = await in_flight_reconciler(redis_ms=1_000_000)
    try:
        started = time.monotonic()
        lease_end = 1_000_000 + int(REAP_VALIDITY_S * 1000) + 500
        assert await reconciler.wait_no_reap_in_flight(harmless_before_ms=lease_end)
        assert time.monotonic() - started < 0.1
    finally:
        task.cancel()


async def test_a_reap_that_could_run_after_the_askers_lease_ends_is_waited_for():
    reconciler, task = await in_flight_reconciler(redis_ms=1_000_000)
    try:
        started = time.monotonic()
        lease_end = 1_000_000 + int(REAP_VALIDITY_S * 1000) - 1  # the reap may run just after it
        assert await reconciler.wait_no_reap_in_flight(harmless_before_ms=lease_end)
        assert time.monotonic() - started >= REAP_VALIDITY_S  # until the reap can no longer run
    finally:
        task.cancel()


async def test_an_asker_that_gives_no_lease_end_always_waits():
    reconciler, task = await in_flight_reconciler(redis_ms=1_000_000)
    try:
        started = time.monotonic()
        assert await reconciler.wait_no_reap_in_flight()
        assert time.monotonic() - started >= REAP_VALIDITY_S
    finally:
        task.cancel()
