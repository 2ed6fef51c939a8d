"""Fuzzing the host's gRPC API with hypothesis: every request gets a proper status, none breaks the host.

One real host for the module and one bystander agent on it. Requests are valid launch
requests with one field mutated (replaced by arbitrary JSON, deleted, or a key added),
arbitrary bytes in the JSON fields, and arbitrary strings and numbers in every other
field of CreateAgent, StopAgent, GetAgentInfo and ListAgents. Each must be answered
(no hang) with a status a caller can act on: never INTERNAL or UNKNOWN. After each
example the host still answers Health and the bystander still runs. Agents a mutated
request happened to launch are stopped again.

Examples are derandomized (the same ones every run) so the suite is stable; set
RK8S_FUZZ=1 for fresh random examples and more of them.
"""

from __future__ import annotations

import json
import os
import uuid
from typing import Any

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rustic_ai.k8s.protocol.v1 import agent_host_pb2 as pb
from rustic_ai.k8s.protocol.v1 import agent_host_pb2_grpc as pb_grpc
from support.hosts import HostProcess, pid_alive
from support.probe import guild_spec, redis_messaging, responder

RANDOM = os.environ.get("RK8S_FUZZ") == "1"
FUZZ = settings(
    max_examples=300 if RANDOM else 60,
    deadline=None,
    derandomize=not RANDOM,
    database=None,  # no .hypothesis directory in the checkout
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
CALL_TIMEOUT_S = 20.0
# What a bad request may be answered with. DEADLINE_EXCEEDED: a request valid enough to
# start a process whose agent then never became ready (the host's launch timeout).
ACCEPTABLE = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.ALREADY_EXISTS,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.DEADLINE_EXCEEDED,
}

json_scalars = st.none() | st.booleans() | st.integers(-(2**63), 2**63) | st.floats(allow_nan=False) | st.text(max_size=40)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=12,
)


class Fuzzed:
    """The module's host, a sync stub to it, and the bystander."""

    def __init__(self, host: HostProcess, messaging) -> None:
        self.host = host
        self.messaging = messaging
        self.channel = grpc.insecure_channel(host.address)
        self.stub = pb_grpc.AgentHostServiceStub(self.channel)
        self.guild = guild_spec(f"g-fuzz-{uuid.uuid4().hex[:6]}")
        reply = self.stub.CreateAgent(self.create(agent=json.loads(responder("bystander").model_dump_json())),
                                      timeout=60)
        self.bystander_pid = reply.agent.pid
        self.codes: dict[str, set[str]] = {}

    def create(self, guild: Any = None, agent: Any = None, messaging: Any = None, **fields) -> pb.CreateAgentRequest:
        def enc(value: Any, default: Any) -> bytes:
            return json.dumps(default if value is None else value).encode()

        return pb.CreateAgentRequest(
            guild_spec_json=enc(guild, json.loads(self.guild.model_dump_json())),
            agent_spec_json=enc(agent, json.loads(responder("a").model_dump_json())),
            messaging_config_json=enc(messaging, json.loads(self.messaging.model_dump_json())),
            **fields,
        )

    def call(self, method: str, request) -> grpc.StatusCode:
        try:
            reply = getattr(self.stub, method)(request, timeout=CALL_TIMEOUT_S)
            code = grpc.StatusCode.OK
        except grpc.RpcError as err:
            code, reply = err.code(), None
            assert code != grpc.StatusCode.DEADLINE_EXCEEDED or method == "CreateAgent", \
                f"{method} hung for {CALL_TIMEOUT_S} s on {request!r:.300}"
            assert code in ACCEPTABLE, f"{method} answered {code.name}: {err.details()!r:.500}\nrequest: {request!r:.500}"
        self.codes.setdefault(method, set()).add(code.name)
        if method == "CreateAgent" and reply is not None:
            # The mutation still made a valid agent: do not let launches pile up.
            self.stub.StopAgent(pb.StopAgentRequest(guild_id=reply.agent.guild_id, agent_id=reply.agent.agent_id),
                                timeout=CALL_TIMEOUT_S)
        return code

    def still_serving(self) -> None:
        health = self.stub.Health(pb.HealthRequest(), timeout=5)
        assert health.state == pb.HOST_STATE_SERVING
        info = self.stub.GetAgentInfo(pb.GetAgentInfoRequest(guild_id=self.guild.id, agent_id="bystander"), timeout=5)
        assert info.state == pb.AGENT_STATE_RUNNING and info.pid == self.bystander_pid
        assert pid_alive(self.bystander_pid)

    def close(self) -> None:
        self.channel.close()


@pytest.fixture(scope="module")
def fuzzed(redis_url, key_prefix, redis_server):
    host = HostProcess(redis_url, key_prefix, name="fuzz-host", env={
        "RUSTIC_AGENT_HOST_LAUNCH_TIMEOUT_S": "5",
        "RUSTIC_AGENT_HOST_MAX_MESSAGE_BYTES": str(256 * 1024),
        "RUSTIC_AGENT_HOST_CAPACITY": "5",
        "RUSTIC_AGENT_HOST_MAX_RESTARTS": "0",
    })
    f = Fuzzed(host, redis_messaging(redis_server.port))
    yield f
    f.close()
    host.close()


def _paths(value: Any, prefix: tuple = ()) -> list[tuple]:
    out = [prefix]
    if isinstance(value, dict):
        for k, v in value.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            out += _paths(v, (*prefix, i))
    return out


@st.composite
def mutated_specs(draw) -> tuple[str, Any]:
    """(which spec, the spec with one place mutated): replaced, deleted, or given an extra key."""
    which = draw(st.sampled_from(["guild", "agent", "messaging"]))
    base = {
        "guild": json.loads(guild_spec("g-fuzz-mutant").model_dump_json()),
        "agent": json.loads(responder(f"m-{draw(st.integers(0, 10**6))}").model_dump_json()),
        "messaging": json.loads(redis_messaging(1).model_dump_json()),  # port 1: nothing listens
    }[which]
    path = draw(st.sampled_from(_paths(base)))
    action = draw(st.sampled_from(["replace", "delete", "add"]))
    if not path:
        return which, draw(json_values)
    parent = base
    for step in path[:-1]:
        parent = parent[step]
    leaf = path[-1]
    if action == "replace":
        parent[leaf] = draw(json_values)
    elif action == "delete":
        del parent[leaf]
    elif isinstance(parent[leaf], dict):
        parent[leaf][draw(st.text(max_size=12))] = draw(json_values)
    else:
        parent[leaf] = draw(json_values)
    return which, base


@FUZZ
@given(mutated_specs())
def test_mutated_specs_get_a_status_and_do_not_hurt_the_host(fuzzed, mutant):
    which, spec = mutant
    fuzzed.call("CreateAgent", fuzzed.create(**{which: spec}))
    fuzzed.still_serving()


text_fields = st.text(max_size=60) | st.sampled_from(["", ".", "rustic_ai", "a" * 600, "support.agents.Chatty",
                                                     "rustic_ai.k8s.process.child.main", "os.system"])
json_bytes = st.binary(max_size=200) | json_values.map(lambda v: json.dumps(v).encode())


@FUZZ
@given(st.builds(
    pb.CreateAgentRequest,
    guild_spec_json=json_bytes,
    agent_spec_json=json_bytes,
    messaging_config_json=json_bytes,
    machine_id=st.integers(-(2**31), 2**31 - 1),
    client_type=text_fields,
    client_properties_json=json_bytes,
    organization_id=text_fields,
    default_topic=text_fields,
    restart_policy_json=json_bytes,
))
def test_arbitrary_create_agent_requests(fuzzed, request_pb):
    fuzzed.call("CreateAgent", request_pb)
    fuzzed.still_serving()


@FUZZ
@given(
    client_type=text_fields,
    client_properties=json_values,
    restart=json_values,
    machine_id=st.integers(-(2**31), 2**31 - 1),
    default_topic=text_fields,
)
def test_valid_specs_with_arbitrary_other_fields(fuzzed, client_type, client_properties, restart, machine_id,
                                                 default_topic):
    agent = json.loads(responder(f"o-{uuid.uuid4().hex[:6]}").model_dump_json())
    fuzzed.call("CreateAgent", fuzzed.create(
        agent=agent, client_type=client_type, client_properties_json=json.dumps(client_properties).encode(),
        restart_policy_json=json.dumps(restart).encode(), machine_id=machine_id, default_topic=default_topic))
    fuzzed.still_serving()


@FUZZ
@given(guild_id=text_fields, agent_id=text_fields, lines=st.integers(-(2**31), 2**31 - 1))
def test_arbitrary_ids_for_stop_info_and_list(fuzzed, guild_id, agent_id, lines):
    if (guild_id, agent_id) == (fuzzed.guild.id, "bystander"):
        return
    fuzzed.call("GetAgentInfo", pb.GetAgentInfoRequest(guild_id=guild_id, agent_id=agent_id, output_lines=lines))
    fuzzed.call("StopAgent", pb.StopAgentRequest(guild_id=guild_id, agent_id=agent_id))
    fuzzed.call("ListAgents", pb.ListAgentsRequest(guild_id=guild_id))
    fuzzed.still_serving()


def test_the_fuzzing_reached_past_validation(fuzzed):
    """Not vacuous: the examples above were answered with more than one kind of status."""
    create = fuzzed.codes.get("CreateAgent", set())
    assert {"INVALID_ARGUMENT", "OK"} <= create, fuzzed.codes
    assert "NOT_FOUND" in fuzzed.codes.get("StopAgent", set()), fuzzed.codes
    fuzzed.still_serving()
