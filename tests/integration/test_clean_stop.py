"""A drain or a fence finishes the message in hand: the agent's next copy never handles it again.

Each agent here spends 0.2 s on every message after recording it in its ledger
(support.ledger_agents.SlowHandlerLedgerAgent) while the sender publishes 4 a second, so
whenever a stop comes a message is almost surely in hand. Cut off there — the process
exiting as soon as the agent shut down, or the fence's kernel timer ending it — that
message's position was never saved, and the next copy handles it again: a duplicate a
drain or a stall must not cost (only a crash may). Judged by the exactly-once checker
(agents' own ledgers and /proc), with 0 handled twice allowed.
"""

from __future__ import annotations

import asyncio

import pytest

from support import faults
from support.ledger_fleet import LEASE_S, LedgerFleet, fleet_under_traffic

pytestmark = [pytest.mark.timeout(120), pytest.mark.serial]

AGENTS = ["q0", "q1", "q2"]
SLOW_HANDLER = "support.ledger_agents.SlowHandlerLedgerAgent"


def slow_fleet():
    return fleet_under_traffic(agents=AGENTS, class_name=SLOW_HANDLER, rate_per_s=4.0)


async def judge(fleet: LedgerFleet) -> None:
    report = await fleet.checker.settle()
    report.assert_exactly_once(max_twice=0, recover_within_s=10.0)


async def test_a_drain_finishes_the_message_in_hand():
    async with slow_fleet() as fleet:
        victim = fleet.host_of("q0")
        with fleet.checker.fault("host SIGTERM (drain), slow handlers"):
            code = await asyncio.to_thread(victim.process.terminate, 30)
        assert code == 0, fleet.logs()
        await judge(fleet)


async def test_a_fenced_agent_finishes_the_message_in_hand():
    async with slow_fleet() as fleet:
        victim = fleet.host_of("q0")
        with fleet.checker.fault("host paused (pid) past its lease, slow handlers"):
            with faults.paused(victim.process.pid):
                await asyncio.sleep(1.5 * LEASE_S)
        await judge(fleet)
