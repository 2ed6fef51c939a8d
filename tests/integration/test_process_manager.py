"""AgentProcessManager with real agent processes, both launchers, and a real (private) Redis.

Every test runs once per launcher: "cold" (a fresh interpreter per agent) and "warm"
(forked from a fork server). One launcher of each kind is shared by the tests of this
module (a fork server takes about a second to import rusticai-core); each test gets its
own manager. Nothing waits by sleeping: exits are awaited, conditions are polled with
``eventually``.

The manager keeps no table of agents (which agent runs where, duplicates and capacity are
the host supervisor's business): what is tested here is the ``AgentProcess`` handle it
hands out and ``live()``/``close()``. Every launch carries a lease deadline (fence.py);
these tests pass one far beyond their end, test_fence.py is about fencing.
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
    AgentLaunchError,
    HostUnavailableError,
    InvalidSpecError,
    LaunchTimeoutError,
)
from rustic_ai.k8s.base.models import AgentKey, LaunchRequest
from rustic_ai.k8s.base.specs import launch_request_from_models
from rustic_ai.k8s.process import AgentProcessManager, ForkServerLauncher, make_launcher
from support.agents import CHATTY_LINES, HELPER_PID, Chatty, FailsOnInit, IgnoresSigterm, NeverReady, StartsHelper
from support.deadlines import far
from support.eventually import eventually
from support.fleet import answers
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


@pytest_asyncio.fixture(loop_scope="module")
async def make_manager(launcher):
    managers: list[AgentProcessManager] = []

    async def make(**overrides) -> AgentProcessManager:
        kwargs = dict(launch_timeout_s=30.0, stop_grace_s=5.0, output_lines=200, launcher=launcher)
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
    proc = await manager.launch(request_for(messaging, guild=guild, agent_id="r"), far())
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
    assert manager.live() == [proc]
    assert proc.key == AgentKey(guild, "r") and proc.ready_info["pid"] == proc.pid
    assert abs(proc.started_at - time.time()) < 60


async def test_launches_run_concurrently(make_manager, messaging):
    manager = await make_manager()
    guild = gid()
    procs = await asyncio.gather(*(manager.launch(request_for(messaging, guild=guild, agent_id=f"c{i}"), far())
                                   for i in range(2)))
    assert len({p.pid for p in procs}) == 2 and all(pid_alive(p.pid) for p in procs)
    # Every child was started before any reported ready: no launch waited for another.
    started = [p.started_at for p in procs]
    ready = [p.started_at + p.launch_s for p in procs]
    assert max(started) < min(ready)


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
    results = await asyncio.gather(*(manager.launch(r, far()) for r in requests.values()), return_exceptions=True)
    for expected, result in zip(requests, results, strict=True):
        assert isinstance(result, InvalidSpecError) and expected in str(result), (expected, result)
    assert manager.live() == []


async def test_an_agent_whose_init_raises_is_a_launch_error_with_its_message(make_manager, messaging):
    manager = await make_manager()
    with pytest.raises(AgentLaunchError) as err:
        await manager.launch(request_for(messaging, FailsOnInit), far())
    text = str(err.value)
    assert "RuntimeError: boom from FailsOnInit.__init__" in text
    assert "--- last output ---" in text and "in __init__" in text  # the traceback it logged, quoted
    assert manager.live() == []


async def test_launch_timeout_kills_the_child(launcher, make_manager, messaging):
    # Long enough for a cold interpreter to import rusticai-core and print, short for a test.
    manager = await make_manager(launch_timeout_s=3.0 if launcher.mode == "cold" else 1.5)
    with pytest.raises(LaunchTimeoutError) as err:
        await manager.launch(request_for(messaging, NeverReady), far())
    pid = int(re.search(r"\(pid (\d+), killed\)", str(err.value)).group(1))
    assert not pid_alive(pid)
    assert manager.live() == []


async def test_a_cancelled_launch_leaves_no_process(make_manager, messaging):
    manager = await make_manager()
    launch = asyncio.create_task(manager.launch(request_for(messaging, NeverReady), far()))
    # Cancelled once the child exists (it never reports ready, so the launch is still waiting).
    [proc] = await eventually(manager.live, timeout=10, what="the child started")
    launch.cancel()
    with pytest.raises(asyncio.CancelledError):
        await launch
    # By the time the cancelled launch re-raised, its child was killed and reaped.
    assert proc.exit_code == -signal.SIGKILL and not pid_alive(proc.pid)
    assert manager.live() == []


# -- exits and stops -------------------------------------------------------------------------


async def test_a_killed_agent_is_noticed_at_once(make_manager, messaging):
    manager = await make_manager()
    proc = await manager.launch(request_for(messaging), far())
    os.kill(proc.pid, signal.SIGKILL)  # from outside: a crash, as the OOM killer would
    assert await asyncio.wait_for(proc.wait(), 5) == -signal.SIGKILL
    assert proc.exit_code == -signal.SIGKILL and not proc.running
    assert not proc.stopping  # nobody asked it to stop: its owner treats the exit as a crash
    assert manager.live() == []


async def test_kill_takes_the_agents_process_group_and_reads_as_a_crash(make_manager, messaging):
    manager = await make_manager()
    proc = await manager.launch(request_for(messaging, StartsHelper), far())
    line = await eventually(lambda: [ln for ln in proc.output.tail() if HELPER_PID in ln], what="the helper's pid")
    helper = int(line[0].rsplit("=", 1)[1])
    assert pid_alive(helper)
    proc.kill()
    assert await asyncio.wait_for(proc.wait(), 5) == -signal.SIGKILL
    assert not proc.stopping
    # A helper the agent started dies with it (the same process group), not left running.
    await eventually(lambda: not pid_alive(helper), timeout=5, what="the helper gone")


async def test_stop_terminates_cleanly_within_grace(make_manager, messaging):
    manager = await make_manager()
    proc = await manager.launch(request_for(messaging), far())
    began = time.monotonic()
    assert await proc.stop(grace_s=10) == 0
    assert time.monotonic() - began < 10  # SIGTERM did it, not the SIGKILL after the grace
    assert proc.exit_code == 0 and proc.stopping and not proc.running  # a requested stop, not a crash
    assert not pid_alive(proc.pid) and manager.live() == []
    assert any("stopped" in line for line in proc.output.tail(5))  # the child's own shutdown log
    # Stopping an agent that already exited answers at once with how it ended.
    assert await asyncio.wait_for(proc.stop(), 1) == 0


async def test_a_second_stop_joins_the_first(make_manager, messaging):
    manager = await make_manager()
    proc = await manager.launch(request_for(messaging, IgnoresSigterm), far())
    began = time.monotonic()
    # The second one's longer grace changes nothing: both wait for the one stop under way,
    # which kills the agent when its 0.5 s run out.
    first, second = await asyncio.wait_for(asyncio.gather(proc.stop(grace_s=0.5), proc.stop(grace_s=60)), 10)
    assert first == second == -signal.SIGKILL
    assert time.monotonic() - began < 10


async def test_a_cancelled_stop_still_ends_the_agent(make_manager, messaging):
    manager = await make_manager()
    proc = await manager.launch(request_for(messaging, IgnoresSigterm), far())
    stopping = asyncio.create_task(proc.stop(grace_s=0.5))
    await eventually(lambda: proc.stopping, what="the stop under way")
    stopping.cancel()  # e.g. the caller's own deadline ran out
    with pytest.raises(asyncio.CancelledError):
        await stopping
    # Shielded: the stop went on to its SIGKILL without the caller.
    assert await asyncio.wait_for(proc.wait(), 5) == -signal.SIGKILL and not pid_alive(proc.pid)


async def test_an_agent_ignoring_sigterm_is_killed_after_the_grace(make_manager, messaging):
    manager = await make_manager()
    proc = await manager.launch(request_for(messaging, IgnoresSigterm), far())
    began = time.monotonic()
    assert await proc.stop(grace_s=0.5) == -signal.SIGKILL
    assert time.monotonic() - began >= 0.5
    assert proc.exit_code == -signal.SIGKILL and not pid_alive(proc.pid)


async def test_close_stops_everything_and_is_idempotent(launcher, messaging):
    manager = AgentProcessManager(launch_timeout_s=30, stop_grace_s=5, output_lines=10, launcher=launcher)
    await manager.close()  # before start: harmless
    # rusticai-redis's shutdown may take about a second (it joins its threads): a grace
    # the well-behaved agents meet, after which the stubborn one is killed.
    manager = AgentProcessManager(launch_timeout_s=30, stop_grace_s=3, output_lines=50, launcher=launcher)
    await manager.start()
    guild = gid()
    *procs, stubborn = await asyncio.gather(
        *(manager.launch(request_for(messaging, guild=guild, agent_id=f"x{i}"), far()) for i in range(2)),
        manager.launch(request_for(messaging, IgnoresSigterm, guild=guild, agent_id="stubborn"), far()),
    )
    began = time.monotonic()
    await asyncio.gather(manager.close(), manager.close())
    assert time.monotonic() - began < 2 * manager.stop_grace_s  # concurrently, not one grace after another
    assert [p.exit_code for p in procs] == [0, 0]
    assert stubborn.exit_code == -signal.SIGKILL
    assert not any(pid_alive(p.pid) for p in [*procs, stubborn])
    assert all(p.stopping for p in [*procs, stubborn])  # ended on purpose: no owner restarts them
    assert manager.live() == []
    await manager.close()
    with pytest.raises(HostUnavailableError):
        await manager.launch(request_for(messaging), far())


async def test_output_is_kept_and_bounded(make_manager, messaging):
    manager = await make_manager(output_lines=50)
    proc = await manager.launch(request_for(messaging, Chatty), far())
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
from support.deadlines import far

async def main():
    manager = AgentProcessManager(launch_timeout_s=60, stop_grace_s=1, output_lines=10, launch_mode=sys.argv[1])
    await manager.start()
    proc = await manager.launch(LaunchRequest.model_validate_json(sys.stdin.read()), far())
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
    proc = await manager.launch(request_for(messaging), far())
    assert warm_launcher.hello["threads"] == 1  # forking is safe: the server runs no threads
    assert parent_of(proc.pid) == warm_launcher.server_pid == proc.ready_info["forkserver_pid"]
    assert proc.ready_info["warm"] is True
    assert {"rustic_ai.core.guild.agent", "rustic_ai.core.guild.execution.agent_wrapper",
            "rustic_ai.redis.messaging.backend"} <= set(proc.ready_info["preloaded"])


@warm_only
async def test_fork_server_death_takes_its_agents_and_the_next_launch_restarts_it(warm_launcher, make_manager,
                                                                                   messaging):
    manager = await make_manager()
    proc = await manager.launch(request_for(messaging, agent_id="victim"), far())
    old_server, starts = warm_launcher.server_pid, warm_launcher.starts
    os.kill(old_server, signal.SIGKILL)
    # Launched at once, before the loop could notice the death: the launcher finds out
    # on the way (or on the failed fork) and starts a new server.
    again = await manager.launch(request_for(messaging, agent_id="next"), far())
    # Noticed through the pidfd, though the server that could have reported it is gone; a crash.
    assert await asyncio.wait_for(proc.wait(), 5) == -signal.SIGKILL
    assert not proc.stopping and not pid_alive(proc.pid)
    assert warm_launcher.starts == starts + 1 and warm_launcher.server_pid not in (None, old_server)
    assert parent_of(again.pid) == warm_launcher.server_pid
    assert await again.stop() == 0


RESPONDER_MODULE = "rustic_ai.testing.execution.integration_agents"


def children_of(pid: int) -> set[int]:
    return {int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()}


async def spare_of(launcher: ForkServerLauncher, agents: set[int]) -> int:
    """The fork server's child that is no agent: the one it forked ahead once idle for a moment.

    A trial import (learning a module) is a short-lived child too: the responder's module is
    learned first, and the spare is the one extra child that stays the same for a while."""
    module = RESPONDER_MODULE
    await eventually(lambda: module in launcher.learned or module in launcher.learn_refusals, timeout=10,
                     what="the responder's module learned")
    seen: list[int] = []

    def check() -> int:
        extra = [p for p in children_of(launcher.server_pid) - agents if pid_alive(p)]
        seen.append(extra[0] if len(extra) == 1 else 0)
        return seen[-1] if len(seen) >= 4 and len(set(seen[-4:])) == 1 else 0

    return await eventually(check, timeout=10, interval=0.1, what="a spare child of the fork server")


async def learned_responder(manager: AgentProcessManager, messaging) -> None:
    proc = await manager.launch(request_for(messaging, agent_id="teacher"), far())
    assert await proc.stop() == 0


@warm_only
async def test_a_warm_launch_takes_the_child_forked_ahead(warm_launcher, make_manager, messaging, probe_factory):
    manager = await make_manager()
    await learned_responder(manager, messaging)
    spare = await spare_of(warm_launcher, set())
    guild = gid()
    proc = await manager.launch(request_for(messaging, guild=guild, agent_id="ahead"), far())
    assert proc.pid == spare  # existed before the request: no fork on the launch's path
    assert await answers(probe_factory(guild), "ahead")
    assert await spare_of(warm_launcher, {proc.pid}) != spare  # the next one
    assert await proc.stop() == 0


@warm_only
async def test_a_spare_that_died_unused_is_not_an_agent_and_is_replaced(warm_launcher, make_manager, messaging):
    manager = await make_manager()
    await learned_responder(manager, messaging)
    spare = await spare_of(warm_launcher, set())
    os.kill(spare, signal.SIGKILL)
    await eventually(lambda: spare not in children_of(warm_launcher.server_pid), timeout=5, what="the spare reaped")
    proc = await manager.launch(request_for(messaging, agent_id="after-spare"), far())
    assert proc.pid != spare and parent_of(proc.pid) == warm_launcher.server_pid
    replacement = await spare_of(warm_launcher, {proc.pid})
    assert replacement not in (spare, proc.pid)
    assert proc.exit_code is None and manager.live() == [proc]  # the dead spare was nobody's exit
    assert await proc.stop() == 0


async def test_measure_launch_time_and_memory(launcher, make_manager, messaging):
    """Prints numbers for the record (run with -s); asserts only that they were measured."""
    manager = await make_manager()
    guild = gid()
    times, pss = [], []
    for i in range(3):
        began = time.monotonic()
        proc = await manager.launch(request_for(messaging, guild=guild, agent_id=f"m{i}"), far())
        times.append(time.monotonic() - began)
        pss.append(pss_kib(proc.pid))
    print(f"\n[{launcher.mode}] launch() to ready: median {statistics.median(times) * 1000:.0f} ms "
          f"({', '.join(f'{t * 1000:.0f}' for t in times)}); idle agent PSS: median {statistics.median(pss)} KiB")
    assert len(times) == 3 and all(p > 0 for p in pss)
