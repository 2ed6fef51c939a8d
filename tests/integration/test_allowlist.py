"""Requests naming modules outside the allow-list: refused before any process imports them."""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

import grpc
import pytest

from rustic_ai.k8s import ForbiddenModuleError
from rustic_ai.k8s.base.allowlist import ALLOWED_MODULES_ENV
from rustic_ai.k8s.base.specs import launch_request_from_models
from rustic_ai.k8s.process import AgentProcessManager
from rustic_ai.k8s.protocol.v1 import agent_host_pb2 as pb
from rustic_ai.k8s.protocol.v1 import agent_host_pb2_grpc as pb_grpc
from support.deadlines import far
from support.eventually import eventually
from support.hosts import TESTS_DIR, HostProcess, pid_alive
from support.probe import guild_spec, responder

MARKER = "support.marker_module"


@pytest.fixture(scope="module")
def marker_file(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("marker") / "imported"


@pytest.fixture(scope="module")
def host(redis_url, key_prefix, marker_file):
    """A host with the default allow-list (rustic_ai. only): support.* is outside it."""
    h = HostProcess(redis_url, key_prefix, name="allowlist-host",
                    env={ALLOWED_MODULES_ENV: "rustic_ai.", "RK8S_TEST_IMPORT_MARKER": str(marker_file)})
    yield h
    h.close()


@pytest.fixture
async def stub(host):
    async with grpc.aio.insecure_channel(host.address) as channel:
        yield pb_grpc.AgentHostServiceStub(channel)


def request(messaging, guild: str = "g-allow", **changes) -> pb.CreateAgentRequest:
    g = json.loads(guild_spec(guild).model_dump_json())
    a = json.loads(responder("a").model_dump_json())
    m = json.loads(messaging.model_dump_json())
    extra = {}
    for path, value in changes.items():
        target, _, leaf = path.partition(".")
        if target == "client_type":
            extra["client_type"] = value
        else:
            {"guild": g, "agent": a, "messaging": m}[target][leaf] = value
    return pb.CreateAgentRequest(guild_spec_json=json.dumps(g).encode(), agent_spec_json=json.dumps(a).encode(),
                                 messaging_config_json=json.dumps(m).encode(), **extra)


@pytest.mark.parametrize("change", [
    {"agent.class_name": f"{MARKER}.MarkerAgent"},
    {"client_type": f"{MARKER}.MarkerClient"},
    {"messaging.backend_module": MARKER},
    {"guild.dependency_map": {"db": {"class_name": f"{MARKER}.MarkerResolver"}}},
    {"agent.dependency_map": {"db": {"class_name": f"{MARKER}.MarkerResolver"}}},
    {"guild.agents": [{"id": "x", "name": "x", "description": "x", "class_name": f"{MARKER}.MarkerAgent"}]},
], ids=lambda c: next(iter(c)))
async def test_a_module_outside_the_allow_list_is_refused_and_never_imported(stub, messaging, marker_file, change):
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.CreateAgent(request(messaging, **change), timeout=30)
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED, info.value.details()
    assert f"'{MARKER}'" in info.value.details()
    assert not marker_file.exists(), marker_file.read_text()


async def test_the_engine_raises_forbidden_module_error_and_the_host_keeps_serving(
        host, engine, messaging, marker_file, stub):
    g = guild_spec(f"g-{uuid.uuid4().hex[:6]}")
    allowed = await engine.run_agent(g, responder("ok"), messaging)  # rustic_ai.testing: allowed
    spec = responder("bad")
    spec.class_name = f"{MARKER}.MarkerAgent"
    with pytest.raises(ForbiddenModuleError, match=MARKER):
        await engine.run_agent(g, spec, messaging)
    assert not await engine.is_agent_running(g.id, "bad")
    assert not marker_file.exists()
    assert pid_alive(allowed.pid)
    assert (await stub.Health(pb.HealthRequest(), timeout=5)).agents_running >= 1


@pytest.mark.parametrize("mode", ["cold", "warm"])
async def test_with_no_host_check_in_front_the_agent_process_refuses_too(mode, messaging, tmp_path):
    """The process manager has no allow-list of its own: only the agent process stands in the way."""
    marker = tmp_path / "imported"
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(TESTS_DIR), os.environ.get("PYTHONPATH", "")])),
           ALLOWED_MODULES_ENV: "rustic_ai.", "RK8S_TEST_IMPORT_MARKER": str(marker)}
    req = launch_request_from_models(guild_spec(f"g-{uuid.uuid4().hex[:6]}"), responder("a"), messaging)
    req = req.model_copy(update={"agent_spec": {**req.agent_spec, "class_name": f"{MARKER}.MarkerAgent"}})
    async with AgentProcessManager(launch_timeout_s=30, stop_grace_s=2, output_lines=50,
                                   launch_mode=mode, env=env) as manager:
        with pytest.raises(ForbiddenModuleError, match=MARKER):
            await manager.launch(req, far())
        if mode == "warm":
            # The fork server imports the modules of launched agent classes itself (adaptive
            # preload), asked through agent_ready(). Asked about this one, it must refuse too.
            manager.launcher.agent_ready(req)
            refusals = await eventually(lambda: manager.launcher.learn_refusals, what="the fork server's answer")
            assert "allow-list" in refusals[MARKER], refusals
        # Control: with the module allowed, the same launch imports it (the marker works).
        allowed = AgentProcessManager(launch_timeout_s=30, stop_grace_s=2, output_lines=50,
                                      launch_mode=mode, env={**env, ALLOWED_MODULES_ENV: "rustic_ai.,support."})
        assert not marker.exists()
        async with allowed:
            proc = await allowed.launch(req, far())
            assert proc.pid > 0
        assert marker.read_text().startswith(f"{MARKER} imported")
