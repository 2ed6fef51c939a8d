"""Agents moved between hosts keep their messages over rusticai-nats too.

A drained host hands its agents to the other host while numbered messages flow; the
exactly-once checker (support.exactly_once: the agents' own ledgers, /proc, the sender's
record) finds every message handled once and never two live copies. rusticai-nats keeps a
durable JetStream consumer per agent and topic, so the copy on the new host resumes where
the old one acknowledged. Crashes are not in this module: a message the dead copy had not
acknowledged comes back only after the library's fixed 30 s ack wait (docs/messaging.md).
"""

from __future__ import annotations

import asyncio

import pytest

from support.eventually import eventually
from support.ledger_fleet import LedgerFleet
from support.probe import close_nats_event_loops

pytestmark = pytest.mark.timeout(90)

AGENTS = ["l0", "l1"]


async def test_a_drained_hosts_agents_move_to_the_other_host_exactly_once(nats_server, monkeypatch):
    close_nats_event_loops(monkeypatch)  # the checker's sender is a NATS client in this process
    async with LedgerFleet(nats=nats_server) as fleet:
        fleet.start_hosts(2)
        await fleet.launch(AGENTS)
        checker = fleet.start_checker(AGENTS)
        await checker.wait_answering()
        victim = fleet.host_of("l0")
        with checker.fault("host SIGTERM (drain)"):
            code = await asyncio.to_thread(victim.process.terminate, 30)
        assert code == 0, fleet.logs()
        [survivor] = fleet.live_hosts
        await eventually(lambda: all(fleet.host_of(a) is survivor for a in AGENTS), timeout=10,
                         what="every agent running on the other host")
        report = await checker.settle()
        print(f"\n{report.summary()}")
        report.assert_exactly_once(max_twice=0, logs=fleet.logs)
