"""The lease fence (process/fence.py): an agent process ends itself when its host stops extending its deadline.

The fence exists for the host that cannot act: stalled, frozen, partitioned from Redis.
Another host may adopt the agent once the lease is gone, so by kill_at this copy must be
dead, whatever the host (or the agent's own code) is doing. The tests play the host that
stops renewing: they launch with a far deadline, then send a near one as the "last
renewal" with ``send_deadline`` (a launch's own deadline would have to outlast the launch,
and a cold launch takes a second or more to import rusticai-core). The fence takes the
newest line, nearer or not. The last test gives a near deadline at launch itself.

Every test runs once per launcher, cold and warm, as in test_process_manager.py.
"""

from __future__ import annotations

import array
import asyncio
import fcntl
import os
import signal
import termios
import time
import uuid
from pathlib import Path

import pytest
import pytest_asyncio

from rustic_ai.core.guild.builders import AgentBuilder
from rustic_ai.k8s.base.errors import AgentLaunchError
from rustic_ai.k8s.base.models import LaunchRequest
from rustic_ai.k8s.base.specs import launch_request_from_models
from rustic_ai.k8s.process import AgentProcess, AgentProcessManager, make_launcher
from rustic_ai.k8s.process.control import EXIT_FENCED
from support.agents import HANGING_IN_SHUTDOWN, TICK_DIR_ENV, HangsInShutdown, NeverReady, Ticks, tick_file
from support.deadlines import far, from_now
from support.eventually import eventually
from support.hosts import TESTS_DIR, pid_alive
from support.probe import guild_spec, responder

pytestmark = pytest.mark.asyncio(loop_scope="module")

FENCE_LOG = "has not proved its lease"  # what the fence logs when stop_at passes (fence.py)
KILLED = (-signal.SIGALRM, -signal.SIGKILL)  # the kernel timer, or the fence thread's backstop
# How long after an instant the host may notice an exit: scheduling on a loaded machine, the
# fork server's exit report, and for a cold child still importing rusticai-core at kill_at,
# the moment its fence arms (it dies then, before it reads its request).
LATE_S = 1.0


def request_for(messaging, agent_cls=None) -> LaunchRequest:
    agent_id = f"a-{uuid.uuid4().hex[:6]}"
    spec = responder(agent_id) if agent_cls is None else (
        AgentBuilder(agent_cls).set_id(agent_id).set_name(agent_id).set_description("fence test agent").build_spec()
    )
    return launch_request_from_models(guild_spec(f"g-{uuid.uuid4().hex[:8]}"), spec, messaging,
                                      organization_id="test-org")


@pytest.fixture(scope="module")
def tick_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("ticks")


@pytest_asyncio.fixture(scope="module", loop_scope="module", params=["cold", "warm"])
async def launcher(request, tick_dir):
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(TESTS_DIR), os.environ.get("PYTHONPATH", "")])),
           TICK_DIR_ENV: str(tick_dir)}
    launcher = make_launcher(request.param, env=env)
    await launcher.start()
    yield launcher
    await launcher.close()


@pytest_asyncio.fixture(loop_scope="module")
async def manager(launcher):
    # A stop grace far beyond every deadline here: nothing in these tests is ended by the
    # host, only by the fence (close() at the end cleans up after a failed test).
    async with AgentProcessManager(launch_timeout_s=30, stop_grace_s=30, output_lines=200,
                                   launcher=launcher) as manager:
        yield manager


async def exit_and_when(proc: AgentProcess, by: float) -> tuple[int, float]:
    """Awaits the exit until monotonic instant ``by``; returns the exit code and when it was seen."""
    code = await asyncio.wait_for(proc.wait(), max(by - time.monotonic(), 0.1))
    return code, time.monotonic()


def gone(pid: int) -> bool:
    """No such process at all: exited and reaped, not a zombie."""
    return not Path(f"/proc/{pid}").exists()


def unread_lease_bytes(proc: AgentProcess) -> int:
    """Bytes on the lease pipe the agent has not read yet (FIONREAD works on either end of a pipe).

    The host's end is the spawned process's; no public API exposes it, since the host never
    needs to know whether a renewal was read.
    """
    buf = array.array("i", [0])
    fcntl.ioctl(proc._spawned._lease_w, termios.FIONREAD, buf)
    return buf[0]


# -- stopping cleanly at stop_at -----------------------------------------------------------


async def test_an_agent_whose_deadline_passes_stops_itself_cleanly_before_kill_at(manager, messaging):
    proc = await manager.launch(request_for(messaging), far())
    stop_at, kill_at = from_now(0.5, 3.0)
    proc.send_deadline(stop_at, kill_at)  # the last renewal; none follows
    code, ended = await exit_and_when(proc, kill_at + LATE_S)
    assert code == EXIT_FENCED, proc.output.tail(20)
    assert stop_at <= ended < kill_at  # not before its deadline, and not by the kill
    assert not proc.stopping  # the host did not ask: its supervisor must see the fence, not a stop
    output = "\n".join(proc.output.tail(50))
    assert FENCE_LOG in output and "stopped" in output  # its own clean shutdown ran
    assert gone(proc.pid)
    proc.send_deadline(*far())  # a renewal that arrives after the agent fenced itself is harmless


async def test_extending_the_deadline_keeps_the_agent_running_past_the_first_one(manager, messaging):
    proc = await manager.launch(request_for(messaging), far())
    first = from_now(0.5, 1.0)
    proc.send_deadline(*first)
    last = first
    # Renew every 0.25 s until well past the first deadline's kill_at; the sleep is the
    # renewal period, not a wait for anything.
    while time.monotonic() < first[1] + 0.3:
        await asyncio.sleep(0.25)
        assert proc.running, proc.output.tail(20)
        last = from_now(0.5, 2.5)
        proc.send_deadline(*last)
    assert proc.running and pid_alive(proc.pid)
    # The renewals stop: the agent ends at the last deadline it was given.
    code, ended = await exit_and_when(proc, last[1] + LATE_S)
    assert code == EXIT_FENCED and last[0] <= ended < last[1]
    assert gone(proc.pid)


async def test_end_of_file_on_the_lease_pipe_leaves_the_current_deadline_standing(manager, messaging):
    proc = await manager.launch(request_for(messaging), far())
    stop_at, kill_at = from_now(1.2, 3.5)
    proc.send_deadline(stop_at, kill_at)
    # The host's end is closed: no renewal can come any more. End of file alone proves
    # nothing about the lease (PR_SET_PDEATHSIG, not the fence, handles a dead host), so
    # the deadline the agent holds stands, neither cut short nor lifted.
    proc._spawned.close_lease()
    exit_seen = asyncio.ensure_future(proc.wait())
    done, _ = await asyncio.wait([exit_seen], timeout=stop_at - time.monotonic() - 0.2)
    assert not done, f"ended early with {proc.exit_code}: {proc.output.tail(20)}"  # not killed by the EOF
    await asyncio.wait_for(exit_seen, kill_at + LATE_S - time.monotonic())
    ended = time.monotonic()
    assert proc.exit_code == EXIT_FENCED and stop_at <= ended < kill_at
    assert gone(proc.pid)


# -- dead by kill_at, whatever the agent does ----------------------------------------------


async def test_an_agent_that_never_finishes_stopping_is_dead_by_kill_at(manager, messaging):
    proc = await manager.launch(request_for(messaging, HangsInShutdown), far())
    stop_at, kill_at = from_now(0.3, 1.5)
    proc.send_deadline(stop_at, kill_at)
    code, ended = await exit_and_when(proc, kill_at + LATE_S + 0.5)
    assert code in KILLED, (code, proc.output.tail(20))
    assert kill_at <= ended <= kill_at + LATE_S
    output = "\n".join(proc.output.tail(50))
    # It did try to stop at stop_at, and was stuck in its shutdown when the kill came.
    assert FENCE_LOG in output and HANGING_IN_SHUTDOWN in output
    assert gone(proc.pid)


async def test_a_process_frozen_across_kill_at_dies_at_sigcont_without_running_again(manager, messaging, tick_dir):
    proc = await manager.launch(request_for(messaging, Ticks), far())
    ticks = tick_file(tick_dir, proc.pid)

    def read_ticks() -> list[float]:
        return [float(t) for t in ticks.read_text().split()] if ticks.exists() else []

    await eventually(lambda: len(read_ticks()) >= 3, what="the agent ticking")
    stop_at, kill_at = from_now(1.0, 1.3)
    proc.send_deadline(stop_at, kill_at)
    # The fence re-arms the kernel timer right after it takes the line off the pipe; wait for
    # the line to be taken, then a moment for the few bytecodes between read and setitimer.
    await eventually(lambda: unread_lease_bytes(proc) == 0, what="the deadline read by the fence")
    await asyncio.sleep(0.05)
    os.kill(proc.pid, signal.SIGSTOP)  # a frozen pod, a SIGSTOPped process: none of its threads run
    frozen_at = time.monotonic()
    assert frozen_at < stop_at  # frozen before the fence could even start a clean stop
    await asyncio.sleep(kill_at + 0.3 - time.monotonic())  # the point: kill_at passes while it is frozen
    state = Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    assert state == "T" and proc.running  # stopped, not dead: nothing could kill it while frozen
    thawed_at = time.monotonic()
    os.kill(proc.pid, signal.SIGCONT)
    code, _ = await exit_and_when(proc, thawed_at + 2.0)
    # The pending SIGALRM ends it on the way out of the stop (the fence thread's SIGKILL
    # would mean agent-side code ran again).
    assert code == -signal.SIGALRM, proc.output.tail(20)
    seen = read_ticks()
    assert max(seen) > frozen_at - 0.5  # it was ticking right up to the freeze
    assert max(seen) < thawed_at, "the agent ran again after SIGCONT"
    assert gone(proc.pid)


async def test_an_agent_still_being_built_is_killed_by_its_first_deadline(manager, messaging):
    # The host may lose its lease while an agent is still starting: the deadline the launch
    # carried is armed before the agent's request is even read. NeverReady never finishes
    # building, so only kill_at can end it (a clean stop waits for the build).
    stop_at, kill_at = from_now(1.0, 3.0)
    with pytest.raises(AgentLaunchError, match=r"exited with code -(14|9) before it was ready") as err:
        await manager.launch(request_for(messaging, NeverReady), (stop_at, kill_at))
    ended = time.monotonic()
    assert kill_at <= ended <= kill_at + LATE_S, (ended - kill_at, str(err.value))
    assert manager.live() == []
