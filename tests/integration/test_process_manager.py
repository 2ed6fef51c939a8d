"""AgentProcessManager with real agent processes, both launchers, and a real (private) Redis.

Every test runs once per launcher: "cold" (a fresh interpreter per agent) and "warm"
(forked from a fork server). One launcher of each kind is shared by the tests of this
module (a fork server takes about a second to import rusticai-core); each test gets its
own manager. Nothing waits by sleeping: exits are awaited, conditions are polled with
``eventually``.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import pytest_asyncio
import redis

from rustic_ai.core.guild.builders import AgentBuilder
from rustic_ai.k8s.base.errors import (
    AgentAlreadyExistsError,
    AgentLaunchError,
    AgentNotFoundError,
    HostFullError,
    HostUnavailableError,
    InvalidSpecError,
    LaunchTimeoutError,
)
from rustic_ai.k8s.base.models import AgentKey, LaunchRequest
from rustic_ai.k8s.base.specs import launch_request_from_models
from rustic_ai.k8s.process import AgentProcess, AgentProcessManager, ForkServerLauncher, make_launcher
from support.agents import CHATTY_LINES, Chatty, FailsOnInit, IgnoresSigterm, NeverReady
from support.eventually import eventually
from support.hosts import pid_alive
from support.probe import guild_spec, responder

pytestmark = pytest.mark.asyncio(loop_scope="module")

TESTS_DIR = Path(__file__).resolve().parent.parent
CHILD_ENV = {"PYTHONPATH": os.pathsep.join(filter(None, [str(TESTS_DIR), os.environ.get("PYTHONPATH", "")]))}


def gid() -> str:
    return f"g-{uuid.uuid4().hex[:8]}"


def request_for(messaging, agent_cls=None, *, guild: str | None = None, agent_id: str = "a",
                class_name: str | None = None) -> LaunchRequest:
    spec = responder(agent_id) if agent_cls is None else (
        AgentBuilder(agent_cls).set_id(agent_id).set_name(agent_id).set_description("test agent").build_spec()
    )
    req = launch_request_from_models(guild_spec(guild or gid()), spec, messaging, organization_id="test-org")
    if class_name is not None:
        req = req.model_copy(update={"agent_spec": {**req.agent_spec, "class_name": class_name}})
    return req


def parent_of(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def pss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1])
    raise AssertionError("no Pss line")


@pytest_asyncio.fixture(scope="module", loop_scope="module", params=["cold", "warm"])
async def launcher(request):
    launcher = make_launcher(request.param, env=CHILD_ENV)
    await launcher.start()
    yield launcher
    await launcher.close()


class Exits:
    """Collects on_exit calls; ``seen`` is set on each one."""

    def __init__(self) -> None:
        self.procs: list[AgentProcess] = []
        self.seen = asyncio.Event()

    async def __call__(self, proc: AgentProcess) -> None:
        self.procs.append(proc)
        self.seen.set()


@pytest_asyncio.fixture(loop_scope="module")
async def make_manager(launcher):
    managers: list[AgentProcessManager] = []

    async def make(**overrides) -> AgentProcessManager:
        kwargs = dict(capacity=10, launch_timeout_s=30.0, stop_grace_s=5.0, output_lines=200, launcher=launcher)
        kwargs.update(overrides)
        manager = AgentProcessManager(**kwargs)
        await manager.start()
        managers.append(manager)
        return manager

    yield make
    for manager in managers:
        await manager.close()


# -- launching -------------------------------------------------------------------------------


async def test_launch_returns_a_running_subscribed_agent(make_manager, messaging, probe_factory, redis_server):
    manager = await make_manager()
    guild = gid()
    probe = probe_factory(guild)
    proc = await manager.launch(request_for(messaging, guild=guild, agent_id="r"))
    # Subscribed at the Redis level the moment launch() returned: the agent's own inbox
    # (which nothing else listens to) has a subscriber already, no polling. This is the
    # strict check: rusticai-redis replays a topic's stored backlog to a new subscriber,
    # so the message round trip below would pass even for a slightly early "ready".
    client = redis.Redis(host="127.0.0.1", port=redis_server.port)
    try:
        [(_, subscribers)] = client.pubsub_numsub(f"{guild}:agent_self_inbox:r")
    finally:
        client.close()
    assert subscribers >= 1
    # And it answers the very first message published right after launch() returned.
    probe.hello()
    await eventually(lambda: probe.acks_from("r"), timeout=10, what="answer to the first hello")
    os.kill(proc.pid, 0)  # a real process
    assert proc.running and proc.exit_code is None and proc.pid != os.getpid()
    assert manager.get(proc.key) is proc and manager.list() == [proc] and len(manager) == 1
    assert proc.key == AgentKey(guild, "r") and proc.ready_info["pid"] == proc.pid
    assert abs(proc.started_at - time.time()) < 60


async def test_launches_run_concurrently(make_manager, messaging):
    manager = await make_manager()
    guild = gid()
    procs = await asyncio.gather(*(manager.launch(request_for(messaging, guild=guild, agent_id=f"c{i}"))
                                   for i in range(2)))
    assert len({p.pid for p in procs}) == 2 and all(pid_alive(p.pid) for p in procs)
    # Every child was started before any reported ready: no launch waited for another.
    started = [p.started_at for p in procs]
    ready = [p.started_at + p.launch_s for p in procs]
    assert max(started) < min(ready)


async def test_duplicate_key_is_refused_even_while_starting(make_manager, messaging):
    manager = await make_manager()
    req = request_for(messaging)
    results = await asyncio.gather(manager.launch(req), manager.launch(req), return_exceptions=True)
    assert sum(isinstance(r, AgentProcess) for r in results) == 1
    assert sum(isinstance(r, AgentAlreadyExistsError) for r in results) == 1
    with pytest.raises(AgentAlreadyExistsError):
        await manager.launch(req)
    assert len(manager) == 1


async def test_capacity_counts_running_and_starting_agents(make_manager, messaging):
    manager = await make_manager(capacity=1)
    guild = gid()
    # The second launch is refused while the first is only starting, not yet running.
    results = await asyncio.gather(manager.launch(request_for(messaging, guild=guild, agent_id="one")),
                                   manager.launch(request_for(messaging, guild=guild, agent_id="two")),
                                   return_exceptions=True)
    assert isinstance(results[0], AgentProcess)
    assert isinstance(results[1], HostFullError)
    with pytest.raises(HostFullError):
        await manager.launch(request_for(messaging, guild=guild, agent_id="three"))
    await manager.stop(AgentKey(guild, "one"))
    assert len(manager) == 0  # the slot is free again


async def test_unusable_classes_are_invalid_specs(make_manager, messaging):
    manager = await make_manager()
    guild = gid()
    # Names inside the module allow-list (tests allow rustic_ai. and support., conftest.py):
    # outside it they would be refused as ForbiddenModuleError before any import.
    requests = {
        "cannot be imported": request_for(messaging, guild=guild, agent_id="a1",
                                          class_name="support.no_such_package.agents.Missing"),
        "not a subclass of Agent": request_for(messaging, guild=guild, agent_id="a2",
                                               class_name="rustic_ai.k8s.base.models.AgentRecord"),
        "client type": request_for(messaging, guild=guild, agent_id="a3").model_copy(
            update={"client_type": "rustic_ai.k8s.base.models.AgentRecord"}),
    }
    # Concurrently, only to keep the cold variant quick.
    results = await asyncio.gather(*(manager.launch(r) for r in requests.values()), return_exceptions=True)
    for expected, result in zip(requests, results, strict=True):
        assert isinstance(result, InvalidSpecError) and expected in str(result), (expected, result)
    assert len(manager) == 0 and manager.list() == []


async def test_an_agent_whose_init_raises_is_a_launch_error_with_its_message(make_manager, messaging):
    manager = await make_manager()
    with pytest.raises(AgentLaunchError) as err:
        await manager.launch(request_for(messaging, FailsOnInit))
    text = str(err.value)
    assert "RuntimeError: boom from FailsOnInit.__init__" in text
    assert "--- last output ---" in text and "in __init__" in text  # the traceback it logged, quoted
    assert len(manager) == 0


async def test_launch_timeout_kills_the_child(launcher, make_manager, messaging):
    # Long enough for a cold interpreter to import rusticai-core and print, short for a test.
    manager = await make_manager(launch_timeout_s=3.0 if launcher.mode == "cold" else 1.5)
    with pytest.raises(LaunchTimeoutError) as err:
        await manager.launch(request_for(messaging, NeverReady))
    pid = int(re.search(r"\(pid (\d+), killed\)", str(err.value)).group(1))
    assert not pid_alive(pid)
    assert len(manager) == 0


# -- exits and stops -------------------------------------------------------------------------


async def test_a_killed_agent_is_reported_at_once(make_manager, messaging):
    exits = Exits()
    manager = await make_manager(on_exit=exits)
    proc = await manager.launch(request_for(messaging))
    os.kill(proc.pid, signal.SIGKILL)
    await asyncio.wait_for(exits.seen.wait(), 5)
    assert exits.procs == [proc]
    assert proc.exit_code == -signal.SIGKILL and not proc.running
    assert manager.get(proc.key) is None and len(manager) == 0
    assert await proc.wait() == -signal.SIGKILL


async def test_stop_terminates_cleanly_within_grace(make_manager, messaging):
    exits = Exits()
    manager = await make_manager(on_exit=exits)
    proc = await manager.launch(request_for(messaging))
    began = time.monotonic()
    stopped = await manager.stop(proc.key, grace_s=10)
    assert stopped is proc and proc.exit_code == 0
    assert time.monotonic() - began < 10  # SIGTERM did it, not the SIGKILL after the grace
    assert not pid_alive(proc.pid) and manager.get(proc.key) is None
    assert any("stopped" in line for line in proc.output.tail(5))  # the child's own shutdown log
    assert exits.procs == []  # a requested stop is not a crash
    with pytest.raises(AgentNotFoundError):
        await manager.stop(proc.key)


async def test_stopping_one_agent_twice_at_once_is_safe(make_manager, messaging):
    manager = await make_manager()
    proc = await manager.launch(request_for(messaging))
    first, second = await asyncio.gather(manager.stop(proc.key), manager.stop(proc.key))
    assert first is second is proc and proc.exit_code == 0


async def test_an_agent_ignoring_sigterm_is_killed_after_the_grace(make_manager, messaging):
    manager = await make_manager()
    proc = await manager.launch(request_for(messaging, IgnoresSigterm))
    began = time.monotonic()
    await manager.stop(proc.key, grace_s=0.5)
    assert time.monotonic() - began >= 0.5
    assert proc.exit_code == -signal.SIGKILL and not pid_alive(proc.pid)


async def test_close_stops_everything_and_is_idempotent(launcher, messaging):
    manager = AgentProcessManager(capacity=5, launch_timeout_s=30, stop_grace_s=5, output_lines=10, launcher=launcher)
    await manager.close()  # before start: harmless
    # rusticai-redis's shutdown may take about a second (it joins its threads): a grace
    # the well-behaved agents meet, after which the stubborn one is killed.
    manager = AgentProcessManager(capacity=5, launch_timeout_s=30, stop_grace_s=3, output_lines=50, launcher=launcher)
    await manager.start()
    guild = gid()
    *procs, stubborn = await asyncio.gather(
        *(manager.launch(request_for(messaging, guild=guild, agent_id=f"x{i}")) for i in range(2)),
        manager.launch(request_for(messaging, IgnoresSigterm, guild=guild, agent_id="stubborn")),
    )
    began = time.monotonic()
    await asyncio.gather(manager.close(), manager.close())
    assert time.monotonic() - began < 2 * manager.stop_grace_s  # concurrently, not one grace after another
    assert [p.exit_code for p in procs] == [0, 0]
    assert stubborn.exit_code == -signal.SIGKILL
    assert not any(pid_alive(p.pid) for p in [*procs, stubborn])
    assert len(manager) == 0
    await manager.close()
    with pytest.raises(HostUnavailableError):
        await manager.launch(request_for(messaging))


async def test_output_is_kept_and_bounded(make_manager, messaging):
    manager = await make_manager(output_lines=50)
    proc = await manager.launch(request_for(messaging, Chatty))
    await eventually(lambda: any("ready" in line for line in proc.output.tail()), what="the ready log line")
    lines = proc.output.tail()
    assert len(lines) == 50 and proc.output.total_lines > CHATTY_LINES
    assert any(line.startswith("x" * 100) and line.endswith("[...truncated]") and len(line) < 9000
               for line in proc.output.tail())
    assert any(f"[agent {proc.key} pid {proc.pid}]" in line for line in lines)  # stderr logging, merged
    assert proc.output.tail(3) == lines[-3:]


# -- the host's lifetime bounds its children -------------------------------------------------

HOST_SCRIPT = """
import asyncio, json, sys
from rustic_ai.k8s.base.models import LaunchRequest
from rustic_ai.k8s.process import AgentProcessManager

async def main():
    manager = AgentProcessManager(capacity=1, launch_timeout_s=60, stop_grace_s=1, output_lines=10,
                                  launch_mode=sys.argv[1])
    await manager.start()
    proc = await manager.launch(LaunchRequest.model_validate_json(sys.stdin.read()))
    print(json.dumps({"agent": proc.pid, "server": getattr(manager.launcher, "server_pid", None)}), flush=True)
    await asyncio.Event().wait()

asyncio.run(main())
"""


async def test_agents_die_with_a_killed_host(launcher, messaging):
    host = await asyncio.create_subprocess_exec(
        sys.executable, "-c", HOST_SCRIPT, launcher.mode,
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, env={**os.environ, **CHILD_ENV},
    )
    try:
        host.stdin.write(request_for(messaging).model_dump_json().encode())
        host.stdin.close()
        out = json.loads(await asyncio.wait_for(host.stdout.readline(), 60))
        pids = [p for p in (out["agent"], out["server"]) if p]
        assert all(pid_alive(p) for p in pids)
    finally:
        host.kill()
        await host.wait()
    await eventually(lambda: not any(pid_alive(p) for p in pids), timeout=5, what="children of the dead host gone")


# -- warm launches -------------------------------------------------------------------------


warm_only = pytest.mark.parametrize("launcher", ["warm"], indirect=True)


@pytest_asyncio.fixture(loop_scope="module")
async def warm_launcher(launcher) -> ForkServerLauncher:
    assert isinstance(launcher, ForkServerLauncher)
    return launcher


@warm_only
async def test_warm_agents_are_forked_from_the_preloaded_server(warm_launcher, make_manager, messaging):
    manager = await make_manager()
    proc = await manager.launch(request_for(messaging))
    assert warm_launcher.hello["threads"] == 1  # forking is safe: the server runs no threads
    assert parent_of(proc.pid) == warm_launcher.server_pid == proc.ready_info["forkserver_pid"]
    assert proc.ready_info["warm"] is True
    assert {"rustic_ai.core.guild.agent", "rustic_ai.core.guild.execution.agent_wrapper",
            "rustic_ai.redis.messaging.backend"} <= set(proc.ready_info["preloaded"])


@warm_only
async def test_fork_server_death_takes_its_agents_and_the_next_launch_restarts_it(warm_launcher, make_manager,
                                                                                   messaging):
    exits = Exits()
    manager = await make_manager(on_exit=exits)
    proc = await manager.launch(request_for(messaging, agent_id="victim"))
    old_server, starts = warm_launcher.server_pid, warm_launcher.starts
    os.kill(old_server, signal.SIGKILL)
    # Launched at once, before the loop could notice the death: the launcher finds out
    # on the way (or on the failed fork) and starts a new server.
    again = await manager.launch(request_for(messaging, agent_id="next"))
    await asyncio.wait_for(exits.seen.wait(), 5)  # noticed through the pidfd, reported as a crash
    assert exits.procs == [proc] and proc.exit_code == -signal.SIGKILL and not pid_alive(proc.pid)
    assert warm_launcher.starts == starts + 1 and warm_launcher.server_pid not in (None, old_server)
    assert parent_of(again.pid) == warm_launcher.server_pid
    assert (await manager.stop(again.key)).exit_code == 0


async def test_measure_launch_time_and_memory(launcher, make_manager, messaging):
    """Prints numbers for the record (run with -s); asserts only that they were measured."""
    manager = await make_manager()
    guild = gid()
    times, pss = [], []
    for i in range(3):
        began = time.monotonic()
        proc = await manager.launch(request_for(messaging, guild=guild, agent_id=f"m{i}"))
        times.append(time.monotonic() - began)
        pss.append(pss_kib(proc.pid))
    print(f"\n[{launcher.mode}] launch() to ready: median {statistics.median(times) * 1000:.0f} ms "
          f"({', '.join(f'{t * 1000:.0f}' for t in times)}); idle agent PSS: median {statistics.median(pss)} KiB")
    assert len(times) == 3 and all(p > 0 for p in pss)
