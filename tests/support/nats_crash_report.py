"""Measures what rusticai-nats delivers across crashes; run by hand, not by the suite.

    cd tests && PYTHONPATH=../src ../.venv/bin/python -m support.nats_crash_report [agent-sigkill] [host-sigkill]
        [nats-restart] [rounds]

Each round: one private nats-server for the run, 2 hosts, 3 ledger agents, 20 numbered
messages a second; one agent process (or the host of one) is SIGKILLed, and the host restarts
it (or another host takes it over), or nats-server restarts with its store; then the
exactly-once checker waits up to 45 s for every message. Printed per agent: lost, handled
twice, the most live copies at once, how many were handled more than 2 s after they were sent,
and the latest of them. docs/messaging.md gives the figures. Not a test: the gap it shows (a
message the dead copy had not acknowledged comes back only after rusticai-nats's fixed 30 s ack
wait) would make a test either fail or take 30 s.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys

from .eventually import eventually
from .ledger_fleet import LedgerFleet
from .nats_server import running_nats

AGENTS = ["l0", "l1", "l2"]
LATE_S = 2.0


async def one_round(fault: str, nats) -> None:
    async with LedgerFleet(nats=nats) as fleet:
        fleet.start_hosts(2)
        await fleet.launch(AGENTS)
        checker = fleet.start_checker(AGENTS)
        await checker.wait_answering()
        with checker.fault(fault):
            if fault == "agent-sigkill":
                [pid] = fleet.live_pids("l0")
                os.kill(pid, signal.SIGKILL)
                await eventually(lambda: pid not in fleet.live_pids("l0"), timeout=5, what="the copy gone")
            elif fault == "host-sigkill":
                fleet.host_of("l0").process.kill()
            elif fault == "nats-restart":  # SIGTERM, down 1 s, back on the same port with its store
                nats.stop()
                await asyncio.sleep(1.0)  # the outage itself
                nats.start()
            else:
                raise SystemExit(f"unknown fault {fault!r}: agent-sigkill, host-sigkill or nats-restart")
        # Long enough for the library's redelivery after its 30 s ack wait.
        report = await checker.settle(deadline_s=45.0, quiet_s=35.0)
        sent = checker.sender.sent
        times = sorted(sent.values())
        gap = max((b - a for a, b in zip(times, times[1:])), default=0.0)
        print(f"--- {fault}: {report.summary().splitlines()[0]}; longest pause between sends {gap:.1f} s")
        for agent_id, entry in sorted(checker.ledgers.agents.items()):
            late = [(seq, round(at - sent[seq], 1)) for seq, _pid, at in entry.handled
                    if seq in sent and at - sent[seq] > LATE_S]
            a = report.agents[agent_id]
            latest = max(late, key=lambda x: x[1], default=None)
            print(f"{agent_id}: sent {a.sent}, lost {len(a.lost)}, twice {len(a.twice)}, "
                  f"most live copies {a.max_copies}, late {len(late)}, latest (seq, s) {latest}", flush=True)


async def main(argv: list[str]) -> None:
    rounds = int(argv[-1]) if argv and argv[-1].isdigit() else 1
    faults = [a for a in argv if not a.isdigit()] or ["agent-sigkill", "host-sigkill"]
    os.environ.setdefault("RUSTIC_AGENT_HOST_ALLOWED_MODULES", "rustic_ai.,support.")
    with running_nats() as nats:
        for _ in range(rounds):
            for fault in faults:
                await one_round(fault, nats)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1:]))
