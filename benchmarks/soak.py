"""Soak: a seeded run of mixed faults from the fault matrix, judged by the exactly-once checker.

    .venv/bin/python -m benchmarks.soak --faults 40 --seed 7

One fleet for the whole run: a private Redis, 3 agent hosts (each reaching Redis through
a TCP proxy of its own, so one can be cut off), 4 ledger agents, and the checker of
``tests/support/exactly_once.py`` — a sender publishing 20 numbered messages a second,
each agent's own ledger and a /proc sampler; nothing the engine or the hosts report is
believed. Faults are drawn with the seed from: agent SIGKILL, host SIGKILL, host SIGTERM
(drain), host paused 3-10 s (the host alone, and the host with its agents, as a pod frozen whole) (the lease is 3 s), Redis paused
1 s and 2-30 s, Redis restarted with its data and empty, one host cut off from Redis past
its lease. Durations are drawn with the seed too. A killed or drained host is replaced (a killed one after the
fault, while the fleet recovers; a drained one first). After each fault the run
waits (bounded) until every agent has one live process and handles new messages; an
agent that does not is stopped and launched again, and the fault counts as not
recovered.

Per fault class it prints and writes to ``benchmarks/results/soak.json``: messages lost,
messages destroyed with a Redis restarted empty (apart from lost, only on the checker's
proof: see tests/support/exactly_once.py), and handled twice (each message is charged to
the fault whose window it was sent in: from the fault's start to the next fault's), the
most live copies of one agent seen in
the window, and the time to recover (heal → the slowest agent handling a message sent
after the heal).
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import contextlib
import json
import os
import random
import signal
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

from .common import machine_info

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"
sys.path.insert(0, str(ROOT / "tests"))  # the checker, fault helpers and ledger agents live in tests/support
os.environ.setdefault("RUSTIC_AGENT_HOST_ALLOWED_MODULES", "rustic_ai.,support.")

from support import faults  # noqa: E402
from support.eventually import eventually  # noqa: E402
from support.ledger_fleet import LEASE_S, LedgerFleet, ledger_spec  # noqa: E402

PAST_LEASE_S = 1.5 * LEASE_S
CLASSES = {  # fault class -> weight
    "agent SIGKILL": 3, "host SIGKILL": 2, "host SIGTERM (drain)": 2, "host paused (pid)": 2,
    "host paused (tree)": 1, "redis paused 1 s": 2, "redis paused 2-30 s": 2,
    "redis restarted with data": 1, "redis restarted empty": 1, "host cut off from redis": 2,
}
AGENTS = [f"s{i}" for i in range(4)]
HOST_PAUSE_S = (LEASE_S, 10.0)  # the 3-10 s: from the (test) lease to past three of them
REDIS_PAUSE_S = (2.0, 30.0)  # every host cut off at once, up to 30 s (the hold lasts up to 45 s)


async def inject(fleet: LedgerFleet, kind: str, rng: random.Random) -> str:
    """Applies one fault and heals it (every helper heals in a finally); returns what it hit."""
    if kind == "agent SIGKILL":
        victim = rng.choice(AGENTS)
        for pid in fleet.live_pids(victim):  # none when an earlier fault left it down; all, if two
            os.kill(pid, signal.SIGKILL)
        await eventually(lambda: not fleet.live_pids(victim), timeout=5, what="victim gone")
        return victim
    # A host fault on a host that runs nothing tests little: prefer one that runs agents.
    busy = [h for h in fleet.live_hosts if any(h in fleet.hosts_of(a) for a in AGENTS)]
    host = rng.choice(busy or fleet.live_hosts)
    if kind == "host SIGKILL":
        # The fault is the kill (and its agents dying with the host); the replacement pod starts
        # after it, during the recovery, as Kubernetes would start one.
        doomed = [a for a in AGENTS if host in fleet.hosts_of(a)]
        host.process.kill()
        await eventually(lambda: not any(fleet.live_pids(a) for a in doomed), timeout=5, what="agents died with it")
    elif kind == "host SIGTERM (drain)":
        await asyncio.to_thread(fleet.start_hosts, 1, via_proxy=True)  # the rolling-update order
        await asyncio.to_thread(host.process.terminate, 30)
    elif kind.startswith("host paused"):
        pause = faults.paused if "pid" in kind else faults.paused_tree
        with pause(host.process.pid):
            await asyncio.sleep(rng.uniform(*HOST_PAUSE_S))
    elif kind.startswith("redis paused"):
        with faults.redis_paused(fleet.redis):
            await asyncio.sleep(1.0 if kind.endswith(" 1 s") else rng.uniform(*REDIS_PAUSE_S))
    elif kind.startswith("redis restarted"):
        with faults.redis_down(fleet.redis, keep_data=kind.endswith("with data")):
            await asyncio.sleep(1.0)
    elif kind == "host cut off from redis":
        with faults.cut_off(host.proxy, "stall"):
            await asyncio.sleep(PAST_LEASE_S)
    else:
        raise ValueError(kind)
    return "redis" if kind.startswith("redis") else f"{host.process.name} (pid {host.process.pid})"


async def soak(n_faults: int, seed: int) -> dict:
    rng = random.Random(seed)
    kinds, weights = zip(*CLASSES.items())
    windows: list[dict] = []
    async with LedgerFleet() as fleet:
        fleet.start_hosts(3, via_proxy=True)
        await fleet.launch(AGENTS)
        checker = fleet.start_checker(AGENTS)
        await checker.wait_answering()
        checker.take_max_copies()
        # Every class once first (in a seeded order), then weighted draws: even a short soak covers them all.
        plan = rng.sample(kinds, len(kinds))[:n_faults]
        plan += rng.choices(kinds, weights, k=n_faults - len(plan))
        for n, kind in enumerate(plan):
            began = time.monotonic()
            with checker.fault(kind):
                target = await inject(fleet, kind, rng)
            healed = time.monotonic()
            if len(fleet.live_hosts) < 3:
                replacement = asyncio.create_task(asyncio.to_thread(fleet.start_hosts, 1, via_proxy=True))
            else:
                replacement = None
            settled = True
            try:
                await eventually(lambda: all(len(fleet.live_pids(a)) == 1 for a in AGENTS), timeout=20,
                                 interval=0.1, what="one live copy per agent")
                await checker.wait_answering(timeout=20)
            except AssertionError as exc:
                settled = False
                print(f"  (did not settle: {exc})", flush=True)
            if replacement is not None:
                await replacement
            recover = checker.recovery_s(healed, AGENTS)
            if not settled:
                await repair(fleet)
            most = checker.take_max_copies()
            windows.append({"kind": kind, "target": target, "began": began, "healed": healed, "settled": settled,
                            "recover_s": recover, "max_copies": max((m[0] for m in most.values()), default=0),
                            "max_copies_pids": {a: m[1] for a, m in most.items() if m[0] > 1}})
            rec = "never" if recover is None else f"{recover:.2f} s"
            print(f"fault {n + 1:2}/{n_faults}: {kind:28} on {target:18} most copies {windows[-1]['max_copies']}, "
                  f"recovered {rec}", flush=True)
        report = await checker.settle()
        per_fault = charge(windows, checker, report)
        detail = lost_detail(windows, report, checker.sender)
    return {**summarise(windows, per_fault, report, seed), "lost_detail": detail}


async def repair(fleet: LedgerFleet) -> None:
    """What an operator does after a fault the fleet did not recover from: stop every agent that
    does not have exactly one live copy and launch it again, so later faults start from a
    working fleet. The fault is still counted as not recovered."""
    for a in AGENTS:
        if len(fleet.live_pids(a)) == 1:
            continue
        with contextlib.suppress(Exception):  # best effort: what is still broken shows in the next window
            await fleet.engine.stop_agent(fleet.guild.id, a)
            await eventually(lambda a=a: not fleet.live_pids(a), timeout=10, what=f"{a} stopped")
        try:
            await fleet.engine.run_agent(fleet.guild, ledger_spec(a), fleet.messaging)
            print(f"  (relaunched {a})", flush=True)
        except Exception as exc:  # noqa: BLE001 - reported, the soak goes on
            print(f"  (could not relaunch {a}: {exc})", flush=True)


def charge(windows: list[dict], checker, report) -> list[dict]:
    """Lost and handled-twice messages per fault, by the window each message was sent in. A message
    the checker proves was destroyed with a Redis restarted empty (acknowledged by it, never read
    by the agent) is counted apart, as ``destroyed``, not as lost."""
    starts = [w["began"] for w in windows]
    sent = dict(checker.sender.sent)
    out = [{"lost": 0, "destroyed": 0, "twice": 0} for _ in windows]
    for a in AGENTS:
        entry = checker.ledgers.agents.get(a)
        counts = Counter(seq for seq, _p, _t in entry.handled) if entry else Counter()
        destroyed = set(report.agents[a].destroyed)
        for seq, t in sent.items():
            i = bisect.bisect_right(starts, t) - 1
            if i < 0:
                continue  # sent before the first fault
            if counts[seq] == 0:
                out[i]["destroyed" if seq in destroyed else "lost"] += 1
            elif counts[seq] > 1:
                out[i]["twice"] += counts[seq] - 1
    return out


def lost_detail(windows: list[dict], report, sender) -> list[dict]:
    """Every message lost or destroyed: when it was sent (from the start of its fault window) and
    which Redis instance acknowledged it (None: not provably one), for finding the mechanism."""
    starts = [w["began"] for w in windows]
    view = {"sent": dict(sender.sent), "acked_by": dict(sender.acked_by)}
    out = []
    for a in report.agents.values():
        for what, seqs in (("lost", a.lost), ("destroyed", a.destroyed)):
            for seq in seqs:
                t = view["sent"].get(seq)
                i = bisect.bisect_right(starts, t) - 1 if t is not None else -1
                out.append({"agent": a.agent_id, "seq": seq, "what": what, "fault": i,
                            "kind": windows[i]["kind"] if i >= 0 else None,
                            "after_fault_began_s": round(t - starts[i], 3) if i >= 0 else None,
                            "acked_by": view["acked_by"].get(seq)})
    return out


def summarise(windows: list[dict], per_fault: list[dict], report, seed: int) -> dict:
    classes: dict[str, dict] = defaultdict(lambda: {"faults": 0, "lost": 0, "destroyed": 0, "twice": 0,
                                                    "max_copies": 0,
                                                    "recover_s": [], "never_recovered": 0})
    for w, c in zip(windows, per_fault):
        k = classes[w["kind"]]
        k["faults"] += 1
        k["lost"] += c["lost"]
        k["destroyed"] += c["destroyed"]
        k["twice"] += c["twice"]
        k["max_copies"] = max(k["max_copies"], w["max_copies"])
        if w["recover_s"] is None:
            k["never_recovered"] += 1
        else:
            k["recover_s"].append(round(w["recover_s"], 3))
    totals = report.totals()
    # The checker's own maximum restarts with every window; the run's is the largest window's.
    totals["max_copies"] = max([totals["max_copies"], *(w["max_copies"] for w in windows)])
    return {"machine": machine_info(), "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "seed": seed, "faults": len(windows),
            # time.time() - time.monotonic(): turns the windows' monotonic times into the hosts' log times
            "wall_minus_monotonic_s": time.time() - time.monotonic(), "agents": len(AGENTS), "lease_s": LEASE_S,
            "classes": dict(classes),
            "totals": {**totals, "recover_s": None if totals["recover_s"] == float("inf") else totals["recover_s"]},
            "checker": report.summary(),
            "faults_in_order": [{**w, **c} for w, c in zip(windows, per_fault)]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.soak", description=__doc__.split("\n\n")[0])
    p.add_argument("--faults", type=int, default=40)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--out", type=Path, default=RESULTS / "soak.json",
                   help="where the results go (default benchmarks/results/soak.json)")
    args = p.parse_args(argv)
    t0 = time.monotonic()
    results = asyncio.run(soak(args.faults, args.seed))
    results["seconds"] = round(time.monotonic() - t0, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(f"\nsoak: {results['faults']} faults, seed {args.seed}, {results['seconds']} s\n")
    print("| fault class | n | lost | destroyed with Redis | handled twice | most live copies | recover p50 / max "
          "| never recovered |")
    print("|---|---:|---:|---:|---:|---:|---|---:|")
    for kind, k in sorted(results["classes"].items()):
        rec = sorted(k["recover_s"])
        spread = f"{rec[len(rec) // 2]:.2f} / {rec[-1]:.2f} s" if rec else "—"
        print(f"| {kind} | {k['faults']} | {k['lost']} | {k['destroyed']} | {k['twice']} | {k['max_copies']} "
              f"| {spread} | "
              f"{k['never_recovered']} |")
    t = results["totals"]
    print(f"\ntotal: lost {t['lost']} messages ({t['destroyed_with_redis']} more destroyed with Redis), "
          f"{t['twice']} messages handled twice, most live copies {t['max_copies']}")
    ok = t["lost"] == 0 and t["max_copies"] <= 1
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
