"""Where a warm launch spends its time: ``.venv/bin/python -m benchmarks.profile [steps|pyspy|guild]``.

``steps`` (the default) times the agent side of a warm launch step by step, in children
forked from a process that imported what a fresh fork server imports (and then, a second
time, the agent's own module too, as a fork server that learned the class has): parse and validate
the request (``child.prepare``, which imports the agent's class), build the wrapper,
create the messaging interface, build the agent, subscribe it, notify ready. These are
the calls ``rustic_ai.k8s.process.child.run`` and rusticai-core's
``AgentWrapper.initialize_agent`` make, in that order; the rest of ``run_agent`` (engine,
gRPC, registry, fork, pipes) is the launch scenario's total minus this.

``pyspy`` starts a one-host LocalCluster (warm launches), attaches ``py-spy record --subprocesses``
to the host (so the fork server and every agent it forks are sampled too), launches N
responders one after the other exactly as the launch scenario does, and sums the
samples by phase. py-spy samples on-CPU stacks only: waiting on Redis or a pipe does not
show, so this says where the CPU goes, and the launch scenario says how long it takes.
Needs py-spy (``pip install py-spy``; part of the ``bench`` extra).

``guild`` times the caller's side of ``Guild.launch_agent`` with ``K8sExecutionEngine`` (what
users call): the Guild's own ``is_agent_running`` and ``to_spec``, the facade's calls with
their hops to the background loop, the engine's steps on the loop, and ``create_agent``
(the host, the fork and the agent's build), medians over N launches, each in a fresh guild.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid

AGENT_MODULE = "rustic_ai.testing.execution.integration_agents"  # as in engines.py

# (label, frame-name fragment) in order: a sample counts for the first phase whose frame it contains.
AGENT_PHASES = [
    ("import the agent's module (AgentSpec validation -> get_class_from_name)", "get_class_from_name"),
    ("other request parsing and validation (child.prepare)", "prepare"),
    ("messaging: MessagingInterface(), Redis client + pub/sub thread", "MessagingInterface.__init__"),
    ("subscribe to topics (+ backlog replay)", "subscribe_agent_with_messaging"),
    ("build the agent from its spec", "build_agent_from_spec"),
    ("agent ready notification (_notify_ready)", "_notify_ready"),
    ("shutdown after the measurement (not in the launch path)", "AgentWrapper.shutdown"),
    ("messaging threads (delivery, pub/sub polling)", "Thread._bootstrap"),
]
HOST_PHASES = [
    ("create_agent: spec validation (parse_launch)", "parse_launch"),
    ("create_agent: registry claim/update", "LocationRegistry"),
    ("create_agent: spawn (pipes, fork request)", "spawn"),
    ("create_agent: other", "create_agent"),
    ("stop_agent", "stop_agent"),
    ("heartbeat", "Heartbeat"),
    ("gRPC server machinery", "grpc"),
]


def classify(frames: list[str], phases: list[tuple[str, str]]) -> str:
    names = [f.split(" (")[0] for f in frames]
    for label, fragment in phases:
        if any(fragment in n for n in names):
            return label
    return "other"


def analyse(raw_path: str) -> dict[str, collections.Counter]:
    out: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    with open(raw_path) as f:
        for line in f:
            stack, _, count = line.rstrip("\n").rpartition(" ")
            if not count.isdigit():
                continue
            frames = stack.split(";")
            depth = sum(1 for fr in frames if fr.startswith("process "))
            kind = {1: "host", 2: "fork server"}.get(depth, "agents")
            phases = AGENT_PHASES if kind == "agents" else HOST_PHASES
            out[kind][classify(frames, phases) if kind != "fork server" else "fork server loop (fork, reap)"] += int(count)
    return out


def top_other(raw_path: str, kind: str, phases: list[tuple[str, str]], n: int = 8) -> list[tuple[str, int]]:
    """The innermost project/library frames of the samples no phase claimed (to name new phases)."""
    c: collections.Counter = collections.Counter()
    with open(raw_path) as f:
        for line in f:
            stack, _, count = line.rstrip("\n").rpartition(" ")
            frames = stack.split(";")
            depth = sum(1 for fr in frames if fr.startswith("process "))
            if {1: "host", 2: "fork server"}.get(depth, "agents") != kind or classify(frames, phases) != "other":
                continue
            c[" > ".join(fr.split(" (")[0] for fr in frames[-3:])] += int(count)
    return c.most_common(n)


async def run(launches: int, preload: bool, rate: int, keep: str = "") -> int:
    from .common import guild_spec, ms, percentile, responder
    from .engines import K8sAdapter
    from .probe import Probe

    spy = shutil.which("py-spy") or os.path.join(os.path.dirname(sys.executable), "py-spy")
    if not os.path.exists(spy):
        print("py-spy is not installed: .venv/bin/pip install py-spy")
        return 2
    adapter = K8sAdapter("warm", hosts=1, preload=AGENT_MODULE if preload else "")
    await adapter.start()
    fd, raw = tempfile.mkstemp(prefix="rk8s-profile-", suffix=".txt")
    os.close(fd)
    try:
        host_pid = next(iter(adapter.host_pids().values()))
        for i in range(2):  # warm-up, not sampled
            g, a = guild_spec(f"prof-w-{uuid.uuid4().hex[:6]}"), responder(f"w{i}")
            await adapter.run_agent(g, a, 1)
            await adapter.stop_agent(g.id, a.id)
        proc = subprocess.Popen([spy, "record", "--pid", str(host_pid), "--subprocesses", "--format", "raw",
                                 "--rate", str(rate), "--nonblocking", "-o", raw],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        await asyncio.sleep(1.0)
        took = []
        for i in range(launches):
            gid = f"prof-{uuid.uuid4().hex[:6]}"
            probe = Probe(gid, adapter.messaging)
            a = responder(f"p{i}")
            t0 = time.perf_counter()
            await adapter.run_agent(guild_spec(gid), a, (i % 200) + 1)
            probe.hello()
            ack = (await asyncio.to_thread(probe.wait_answers, {a.id}, 30.0)).get(a.id)
            took.append(ms(ack.at - t0) if ack else float("nan"))
            await adapter.stop_agent(gid, a.id)
            probe.close()
            await asyncio.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        proc.wait(30)
    finally:
        await adapter.close()
    counts = analyse(raw)
    if keep:
        shutil.copy(raw, keep)
        for kind, phases in (("agents", AGENT_PHASES), ("host", HOST_PHASES)):
            print(f"unclassified {kind} samples, innermost frames:")
            for stack, n in top_other(raw, kind, phases):
                print(f"  {n:5d} {stack[:200]}")
    os.unlink(raw)
    print(f"warm launches{' with RUSTIC_AGENT_HOST_PRELOAD=' + AGENT_MODULE if preload else ''}: {launches}, "
          f"launch -> first reply p50 {percentile(took, 50):.0f} ms while sampled at {rate} Hz")
    for kind in ("agents", "host", "fork server"):
        total = sum(counts[kind].values())
        if not total:
            continue
        print(f"\n{kind}: {total} on-CPU samples ({total / rate / launches * 1000:.0f} ms CPU per launch)")
        for label, n in counts[kind].most_common():
            print(f"  {100 * n / total:5.1f}%  {n / rate / launches * 1000:6.1f} ms/launch  {label}")
    return 0


# -- steps ----------------------------------------------------------------------------------------


def run_steps(n: int) -> int:
    """In a fresh interpreter: this one has imported more than a fork server does."""
    return subprocess.call([sys.executable, "-m", "benchmarks.launch_steps", str(n)],
                           cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.profile", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", nargs="?", default="steps", choices=["steps", "pyspy", "guild"])
    p.add_argument("--launches", type=int, default=20)
    p.add_argument("--preload", action="store_true", help=f"hosts preload {AGENT_MODULE}")
    p.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    p.add_argument("--raw", default="", help="keep py-spy's raw stacks here and list unclassified ones")
    args = p.parse_args()
    if args.mode == "steps":
        sys.exit(run_steps(args.launches))
    if args.mode == "guild":
        from .guild_launch import profile

        sys.exit(profile(args.launches))
    sys.exit(asyncio.run(run(args.launches, args.preload, args.rate, args.raw)))


if __name__ == "__main__":
    main()
