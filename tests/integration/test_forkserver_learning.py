"""Adaptive preload: the fork server learns the modules of agent classes it has launched."""

from __future__ import annotations

import os

import pytest

from rustic_ai.k8s.base.specs import launch_request_from_models
from rustic_ai.k8s.process import AgentProcessManager, ForkServerLauncher
from support.deadlines import far
from support.eventually import eventually
from support.hosts import TESTS_DIR
from support.probe import guild_spec, redis_messaging, responder


@pytest.fixture
def child_env():
    return {"PYTHONPATH": os.pathsep.join(filter(None, [str(TESTS_DIR), os.environ.get("PYTHONPATH", "")]))}


def request(spec, port):
    return launch_request_from_models(guild_spec("learn-g"), spec, redis_messaging(port))


async def test_a_launched_class_module_is_preloaded_for_later_forks(redis_server, child_env):
    launcher = ForkServerLauncher(env=child_env)
    module = "rustic_ai.testing.execution.integration_agents"
    try:
        async with AgentProcessManager(launch_timeout_s=30, stop_grace_s=2, output_lines=50,
                                       launcher=launcher) as manager:
            await manager.launch(request(responder("first"), redis_server.port), far())
            await eventually(lambda: module in launcher.learned, timeout=10, what="module learned")
            second = await manager.launch(request(responder("second"), redis_server.port), far())
            assert module in second.ready_info.get("preloaded", []), second.ready_info
    finally:
        await launcher.close()


async def test_a_module_that_starts_threads_is_not_learned_and_still_launches(redis_server, child_env):
    launcher = ForkServerLauncher(env=child_env)
    # Built as plain JSON: importing the module here would start its thread in pytest.
    base = request(responder("threaded"), redis_server.port)
    threaded = base.model_copy(update={"agent_spec": {**base.agent_spec,
                                                      "class_name": "support.threaded_agents.ThreadedImportAgent"}})
    try:
        async with AgentProcessManager(launch_timeout_s=30, stop_grace_s=2, output_lines=50,
                                       launcher=launcher) as manager:
            proc = await manager.launch(threaded, far())
            assert proc.running
            # The trial import reports threads; the server refuses and stays single-threaded.
            await eventually(lambda: "support.threaded_agents" in launcher.learn_refusals, timeout=10,
                             what="learning refused")
            assert "threads" in launcher.learn_refusals["support.threaded_agents"]
            assert "support.threaded_agents" not in launcher.learned
            again = await manager.launch(threaded.model_copy(
                update={"agent_spec": {**threaded.agent_spec, "id": "threaded-2"}}), far())
            assert again.running
    finally:
        await launcher.close()


async def test_learning_can_be_turned_off(redis_server, child_env):
    launcher = ForkServerLauncher(env={**child_env, "RUSTIC_AGENT_HOST_LEARN_PRELOAD": "0"})
    try:
        async with AgentProcessManager(launch_timeout_s=30, stop_grace_s=2, output_lines=50,
                                       launcher=launcher) as manager:
            await manager.launch(request(responder("x"), redis_server.port), far())
            module = "rustic_ai.testing.execution.integration_agents"
            await eventually(lambda: module in launcher.learn_refusals, timeout=10, what="learning refused")
            assert launcher.learn_refusals[module] == "learning is off" and launcher.learned == set()
    finally:
        await launcher.close()


async def test_a_module_whose_import_is_slow_is_not_learned(redis_server, child_env):
    # The server forks every agent of its host: an import that takes seconds there would
    # hold every launch up meanwhile, so such a module stays imported per agent instead.
    launcher = ForkServerLauncher(env=child_env)
    module = "support.slow_preload_agents"
    base = request(responder("slow"), redis_server.port)
    slow = base.model_copy(update={"agent_spec": {**base.agent_spec, "class_name": f"{module}.SlowImportAgent"}})
    try:
        async with AgentProcessManager(launch_timeout_s=30, stop_grace_s=2, output_lines=50,
                                       launcher=launcher) as manager:
            await manager.launch(slow, far())
            await eventually(lambda: module in launcher.learn_refusals, timeout=10, what="learning refused")
            assert "took" in launcher.learn_refusals[module] and module not in launcher.learned
            again = await manager.launch(slow.model_copy(update={"agent_spec": {**slow.agent_spec, "id": "slow-2"}}),
                                         far())
            # Launched all the same, importing the module itself.
            assert again.running and module not in again.ready_info["preloaded"]
    finally:
        await launcher.close()
