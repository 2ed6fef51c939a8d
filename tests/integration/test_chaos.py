"""Chaos: seeded random faults against a live fleet under traffic, judged by the exactly-once checker.

A fixed seed makes the fault order repeatable. Faults: SIGKILL an agent process, SIGKILL
a host (a replacement starts), SIGTERM a host (drain; the replacement starts first, as a
rolling update does), pause Redis, restart Redis with its data or empty after real
downtime, launch and stop agents concurrently. A sender publishes numbered messages
throughout; the checker (support.exactly_once) reads each agent's own ledger and /proc,
never the registry or a host's table. After each fault every wanted agent must have
exactly one live process and handle new messages; at the end: no message lost, never
two live copies of an agent, no message handled twice except once per crash of one of
the agent's copies, no stopped agent left alive, no process of the fleet left behind.
Bounded: RUSTIC_K8S_CHAOS_FAULTS faults (default 20), each checkpoint with a deadline.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
from collections import Counter

import pytest

from support import faults
from support.eventually import eventually
from support.fleet import processes_with_env
from support.ledger_fleet import LedgerFleet

SEED = 20261127
FAULTS = int(os.environ.get("RUSTIC_K8S_CHAOS_FAULTS", "20"))
KEEP_DATA = {"1": True, "0": False}.get(os.environ.get("RUSTIC_K8S_CHAOS_REDIS_KEEP", ""))
# Redis restarts are added with RUSTIC_K8S_CHAOS_REDIS_RESTARTS=1 only. Their message losses
# next to agent kills are fixed (process/redis_delivery.py; 3 of 3 runs of this seed with
# restarts: 0 lost), but a host SIGKILLed ~0.3-0.4 s after Redis came back *empty* leaves
# its agents unadopted (nobody re-registered them yet), which would flake CI; the soak and
# the fault matrix's restart rows measure restarts meanwhile.
KINDS = ["kill_agent", "kill_agent", "sigkill_host", "sigterm_host", "pause_redis", "launch_and_stop",
         *(["restart_redis"] if os.environ.get("RUSTIC_K8S_CHAOS_REDIS_RESTARTS") == "1" else [])]

pytestmark = pytest.mark.serial  # run alone after the rest (scripts/dev test): see test_fault_matrix.py


@pytest.mark.timeout(420)
async def test_chaos_keeps_every_agent_running_exactly_once():
    rng = random.Random(SEED)
    log: list[str] = []
    crashes: Counter[str] = Counter()  # agent -> crashes of its copies: each may cost one duplicate
    async with LedgerFleet() as fleet:
        prefix = fleet.prefix
        fleet.start_hosts(3)
        wanted = {f"a{i}" for i in range(6)}
        await fleet.launch(sorted(wanted))
        checker = fleet.start_checker(sorted(wanted))
        await checker.wait_answering()
        next_id = len(wanted)
        try:
            for n in range(FAULTS):
                fault = rng.choice(KINDS)
                log.append(fault)
                print(f"fault {n}: {fault}", flush=True)
                with checker.fault(fault):
                    if fault == "kill_agent":
                        victim = rng.choice(sorted(wanted))
                        [pid] = fleet.live_pids(victim)
                        os.kill(pid, signal.SIGKILL)
                        crashes[victim] += 1
                        # Checked once the kill has landed: the instant before, the old copy is alive.
                        await eventually(lambda: pid not in fleet.live_pids(victim), timeout=5, what="victim gone")
                    elif fault == "sigkill_host":
                        host = rng.choice(fleet.live_hosts)
                        crashes.update(a for a in wanted if fleet.host_of(a) is host)
                        host.process.kill()
                        await asyncio.to_thread(fleet.start_hosts, 1)
                    elif fault == "sigterm_host":
                        host = rng.choice(fleet.live_hosts)
                        await asyncio.to_thread(fleet.start_hosts, 1)  # new pod first, then the old one drains
                        assert await asyncio.to_thread(host.process.terminate, 30) == 0, fleet.logs()
                    elif fault == "pause_redis":
                        with faults.redis_paused(fleet.redis):
                            await asyncio.sleep(rng.choice([0.5, 1.0]))
                    elif fault == "restart_redis":
                        keep = rng.random() < 0.5
                        with faults.redis_down(fleet.redis, keep_data=KEEP_DATA if KEEP_DATA is not None else keep):
                            await asyncio.sleep(0.5)  # real downtime, not an instant restart
                    else:
                        new = [f"a{next_id}", f"a{next_id + 1}"]
                        next_id += 2
                        gone = rng.sample(sorted(wanted), 2)
                        for a in gone:
                            checker.retire(a)
                        for a in new:
                            checker.add_agent(a)
                        outcome = await asyncio.gather(
                            fleet.engine.launch_many([fleet.request(a) for a in new]),
                            *(fleet.engine.stop_agent(fleet.guild.id, a) for a in gone))
                        assert not [r for r in outcome[0] if isinstance(r, BaseException)], outcome[0]
                        wanted = (wanted - set(gone)) | set(new)
                await checkpoint(fleet, wanted)
            report = await checker.settle()
        except BaseException:
            print(f"\nfaults: {log}\n{checker.report().summary()}\n--- host logs ---\n{fleet.logs()}")
            raise
        print(f"\n{report.summary()}")
        report.assert_exactly_once(max_twice=dict(crashes), logs=fleet.logs)
        totals = report.totals()
        print(f"chaos: {len(log)} faults {dict(Counter(log))}; lost {totals['lost']}, handled twice "
              f"{totals['twice']}, most live copies {totals['max_copies']}; final agents {len(wanted)}")
    # No agent process, fork server or host of this fleet outlives it.
    await eventually(lambda: not processes_with_env(f"RUSTIC_K8S_KEY_PREFIX={prefix}"), timeout=10,
                     what=f"no orphan processes (faults: {log})")


async def checkpoint(fleet: LedgerFleet, wanted: set[str]) -> None:
    """Every wanted agent has exactly one live process (/proc) and handles messages sent from now on."""
    def one_copy_each() -> bool:
        copies = {a: fleet.live_pids(a) for a in wanted}
        assert all(len(p) == 1 for p in copies.values()), copies
        return True

    await eventually(one_copy_each, timeout=20, interval=0.1, what="every agent running exactly once")
    await fleet.checker.wait_answering(wanted, timeout=20)
