"""Bad requests get a clear status; the host keeps serving and its other agents keep running."""

from __future__ import annotations

import json
import uuid

import grpc
import pytest

from rustic_ai.core.messaging import MessagingConfig
from rustic_ai.k8s import (
    AgentAlreadyExistsError,
    AgentNotFoundError,
    AsyncK8sEngine,
    InvalidSpecError,
    NoHostAvailableError,
)
from rustic_ai.k8s.base.models import AgentKey
from rustic_ai.k8s.protocol.v1 import agent_host_pb2 as pb
from rustic_ai.k8s.protocol.v1 import agent_host_pb2_grpc as pb_grpc
from support.eventually import eventually
from support.hosts import HostProcess, pid_alive
from support.probe import guild_spec, responder


@pytest.fixture(scope="module")
def host(redis_url, key_prefix):
    """One small host for the whole module; each test's engine stops what it launched."""
    h = HostProcess(redis_url, key_prefix, name="bad-input-host",
                    env={"RUSTIC_AGENT_HOST_CAPACITY": "2", "RUSTIC_AGENT_HOST_MAX_MESSAGE_BYTES": "65536"})
    yield h
    h.close()


@pytest.fixture
async def stub(host):
    async with grpc.aio.insecure_channel(host.address) as channel:
        yield pb_grpc.AgentHostServiceStub(channel)


@pytest.fixture
async def bystander(host, engine, messaging):
    """An agent that must survive every bad request below."""
    g = guild_spec(f"g-{uuid.uuid4().hex[:6]}")
    return await engine.run_agent(g, responder("bystander"), messaging)


def create_request(messaging, guild=None, agent=None, **overrides) -> pb.CreateAgentRequest:
    fields = dict(
        guild_spec_json=(guild or guild_spec("g-bad")).model_dump_json().encode(),
        agent_spec_json=(agent or responder("a")).model_dump_json().encode(),
        messaging_config_json=messaging.model_dump_json().encode(),
    )
    fields.update(overrides)
    return pb.CreateAgentRequest(**fields)


async def expect(stub, request, code: grpc.StatusCode, fragment: str) -> str:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.CreateAgent(request, timeout=30)
    assert info.value.code() == code, info.value.details()
    assert fragment in info.value.details()
    return info.value.details()


async def still_healthy(stub, bystander) -> None:
    health = await stub.Health(pb.HealthRequest(), timeout=5)
    assert health.agents_running >= 1
    assert pid_alive(bystander.pid)
    info = await stub.GetAgentInfo(pb.GetAgentInfoRequest(guild_id=bystander.guild_id, agent_id="bystander"),
                                   timeout=5)
    assert info.state == pb.AGENT_STATE_RUNNING


@pytest.mark.parametrize(
    "field, value, fragment",
    [
        ("guild_spec_json", b"{not json", "guild_spec_json is not valid JSON"),
        ("agent_spec_json", b"[1, 2]", "agent_spec_json must be a JSON object"),
        ("messaging_config_json", b"\xff\xfe", "messaging_config_json is not valid JSON"),
        ("agent_spec_json", json.dumps({"id": "a", "name": 5}).encode(), "invalid agent spec"),
        ("messaging_config_json", b"{}", "invalid messaging config"),
        ("client_properties_json", b'"x"', "client_properties_json must be a JSON object"),
    ],
)
async def test_malformed_or_invalid_specs_are_invalid_argument(stub, bystander, messaging, field, value, fragment):
    await expect(stub, create_request(messaging, **{field: value}), grpc.StatusCode.INVALID_ARGUMENT, fragment)
    await still_healthy(stub, bystander)


async def test_agent_class_that_cannot_be_imported(stub, bystander, messaging):
    spec = json.loads(responder("a").model_dump_json())
    spec["class_name"] = "support.no_such_module.NoSuchAgent"  # inside the module allow-list (test_allowlist.py)
    await expect(stub, create_request(messaging, agent_spec_json=json.dumps(spec).encode()),
                 grpc.StatusCode.INVALID_ARGUMENT, "no_such_module")
    await still_healthy(stub, bystander)


async def test_class_that_is_not_an_agent(stub, bystander, messaging):
    spec = json.loads(responder("a").model_dump_json())
    spec["class_name"] = "rustic_ai.k8s.base.models.AgentRecord"
    await expect(stub, create_request(messaging, agent_spec_json=json.dumps(spec).encode()),
                 grpc.StatusCode.INVALID_ARGUMENT, "AgentRecord")
    await still_healthy(stub, bystander)


async def test_unknown_client_type(stub, bystander, messaging):
    await expect(stub, create_request(messaging, client_type="rustic_ai.k8s.base.models.AgentRecord"),
                 grpc.StatusCode.INVALID_ARGUMENT, "AgentRecord")
    await still_healthy(stub, bystander)


async def test_duplicate_launch(engine, bystander, messaging, stub):
    g = guild_spec(bystander.guild_id)
    with pytest.raises(AgentAlreadyExistsError, match="already running"):
        await engine.run_agent(g, responder("bystander"), messaging)
    await expect(stub, create_request(messaging, guild=g, agent=responder("bystander")),
                 grpc.StatusCode.ALREADY_EXISTS, "already running")
    await still_healthy(stub, bystander)


async def test_an_in_memory_messaging_backend_is_refused(engine, bystander, stub):
    """Its messages never leave the agent's own process, so the agent could talk to no one
    (rusticai-core's GuildBuilder picks it when no messaging is configured)."""
    in_memory = MessagingConfig(backend_module="rustic_ai.core.messaging.backend",
                                backend_class="InMemoryMessagingBackend", backend_config={})
    with pytest.raises(InvalidSpecError, match="InMemoryMessagingBackend keeps messages inside one process"):
        await engine.run_agent(guild_spec(bystander.guild_id), responder("lonely"), in_memory)
    await still_healthy(stub, bystander)


async def test_stopping_an_unknown_agent_is_not_found(stub, bystander, engine, host):
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.StopAgent(pb.StopAgentRequest(guild_id="g", agent_id="ghost"), timeout=5)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(AgentNotFoundError):
        await engine.pool.client(host.address).stop_agent(AgentKey("g", "ghost"))
    await still_healthy(stub, bystander)


async def test_request_over_the_maximum_message_size(stub, bystander, messaging, engine):
    spec = responder("big")
    spec.description = "x" * 100_000
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.CreateAgent(create_request(messaging, agent=spec), timeout=10)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    with pytest.raises((InvalidSpecError, NoHostAvailableError), match="maximum message size"):
        await engine.run_agent(guild_spec("g-big"), spec, messaging)
    await still_healthy(stub, bystander)


async def test_host_at_capacity(stub, bystander, messaging, engine, host):
    g = guild_spec(f"g-{uuid.uuid4().hex[:6]}")
    await engine.run_agent(g, responder("second"), messaging)  # capacity is 2
    await expect(stub, create_request(messaging, guild=g, agent=responder("third")),
                 grpc.StatusCode.RESOURCE_EXHAUSTED, "full")
    # Whether the engine already saw the load (placement skips the host) or asked and was
    # refused, the error says the host is full.
    with pytest.raises(NoHostAvailableError, match=f"{host.address}.*(serving 2/2|is full)"):
        await engine.run_agent(g, responder("third"), messaging)
    assert not await engine.is_agent_running(g.id, "third")
    await still_healthy(stub, bystander)


async def test_agent_that_fails_during_start(stub, bystander, messaging):
    spec = json.loads(responder("a").model_dump_json())
    spec["class_name"] = "support.failing_agents.FailsOnInit"
    details = await expect(stub, create_request(messaging, agent_spec_json=json.dumps(spec).encode()),
                           grpc.StatusCode.FAILED_PRECONDITION, "boom from __init__")
    assert "RuntimeError" in details
    await still_healthy(stub, bystander)


async def test_run_agent_refuses_a_non_spec(engine, messaging):
    with pytest.raises(InvalidSpecError, match="needs an AgentSpec"):
        await engine.run_agent(guild_spec("g"), object(), messaging)  # type: ignore[arg-type]


async def test_a_stopped_host_is_skipped(start_host, engine_settings, messaging):
    a, b = start_host("a"), start_host("b")
    a.terminate()
    async with AsyncK8sEngine(engine_settings) as eng:
        rec = await eng.run_agent(guild_spec("g-skip"), responder("r"), messaging)
        assert rec.host != a.address
        await eventually(lambda: eng.is_agent_running("g-skip", "r"), what="running")


