"""Who may do what on a host configured as the shipped manifests configure it.

TLS required, plain text refused, probes on a plain health port, and an authorization
policy file. Each refused caller is recorded with the status code it gets:

| caller | status |
|---|---|
| no client certificate | UNAVAILABLE (the handshake fails) |
| certificate from another CA | UNAVAILABLE (the handshake fails) |
| fleet certificate, identity not in the policy | PERMISSION_DENIED naming the identity |
| read-only identity launching | PERMISSION_DENIED ("may not launch") |
| identity for guilds team-a-* launching in team-b-x | PERMISSION_DENIED ("in guild 'team-b-x'") |
"""

from __future__ import annotations

import json
import uuid

import grpc
import pytest

from rustic_ai.k8s import AsyncK8sEngine, NotAuthorizedError
from rustic_ai.k8s.base.specs import launch_request_from_models
from rustic_ai.k8s.protocol import convert
from rustic_ai.k8s.protocol.tls import channel_credentials
from rustic_ai.k8s.protocol.v1 import agent_host_pb2 as pb
from rustic_ai.k8s.protocol.v1 import agent_host_pb2_grpc as pb_grpc
from support.certs import TestCA
from support.eventually import eventually
from support.hosts import HostProcess
from support.probe import guild_spec, responder
from support.redis_server import free_port
from test_tls import run_host, tls_settings

ENGINE_SPIFFE = "spiffe://cluster.local/ns/rustic-ai/sa/rustic-engine"
POLICY = {"rules": [
    # The engines, known by the SPIFFE id in their certificate's URI name (CN may be anything).
    {"identities": ["rustic-engine", "spiffe://cluster.local/ns/rustic-ai/sa/rustic-engine"],
     "allow": ["launch", "stop", "read"], "guilds": ["*"], "modules": ["rustic_ai."]},
    {"identities": ["dashboard"], "allow": ["read"]},
    {"identities": ["team-a-*"], "allow": ["launch", "stop", "read"], "guilds": ["team-a-*"],
     "modules": ["rustic_ai."]},
]}


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    root = tmp_path_factory.mktemp("authz-pki")
    ca, other = TestCA(root, "fleet"), TestCA(root, "other")
    return {
        "ca": ca, "host": ca.issue("rustic-agent-host"),
        "engine": ca.issue_with_uris("engine-7f9c", ENGINE_SPIFFE),
        "dashboard": ca.issue_with_uris("dashboard"),
        "team-a": ca.issue_with_uris("team-a-ci"),
        "stranger": ca.issue_with_uris("stranger", "spiffe://cluster.local/ns/other/sa/default"),
        "intruder": other.issue_with_uris("rustic-engine", ENGINE_SPIFFE),  # right names, wrong CA
    }


@pytest.fixture(scope="module")
def policy_host(redis_url, key_prefix, pki, tmp_path_factory):
    policy = tmp_path_factory.mktemp("authz-policy") / "policy.json"
    policy.write_text(json.dumps(POLICY))
    host = HostProcess(redis_url, key_prefix, name="policy-host", env={
        "RUSTIC_AGENT_HOST_TLS_CERT_FILE": str(pki["host"].cert),
        "RUSTIC_AGENT_HOST_TLS_KEY_FILE": str(pki["host"].key),
        "RUSTIC_AGENT_HOST_TLS_CLIENT_CA_FILE": str(pki["ca"].ca_file),
        "RUSTIC_AGENT_HOST_ALLOW_PLAINTEXT": "false",
        "RUSTIC_AGENT_HOST_HEALTH_LISTEN": f"127.0.0.1:{free_port()}",
        "RUSTIC_AGENT_HOST_AUTHZ_POLICY_FILE": str(policy),
    })
    host.policy_file = policy
    yield host
    host.close()


def creds_of(pki, who: str) -> grpc.ChannelCredentials:
    files = pki[who]
    return channel_credentials(str(files.cert), str(files.key), str(pki["ca"].ca_file))


def launch_msg(messaging, guild_id: str) -> pb.CreateAgentRequest:
    return convert.launch_to_pb(launch_request_from_models(guild_spec(guild_id), responder("r"), messaging))


async def status_of(address: str, credentials: grpc.ChannelCredentials | None, method: str, request) -> tuple:
    """(status code, details) a caller gets: OK and the reply when the call is answered."""
    channel = (grpc.aio.secure_channel(address, credentials) if credentials is not None
               else grpc.aio.insecure_channel(address))
    async with channel:
        try:
            reply = await getattr(pb_grpc.AgentHostServiceStub(channel), method)(request, timeout=20)
        except grpc.aio.AioRpcError as err:
            return err.code(), err.details() or ""
    return grpc.StatusCode.OK, reply


async def listed_guilds(address: str, credentials: grpc.ChannelCredentials) -> set[str]:
    code, reply = await status_of(address, credentials, "ListAgents", pb.ListAgentsRequest())
    assert code == grpc.StatusCode.OK, reply
    return {a.guild_id for a in reply.agents}


async def test_callers_without_a_fleet_certificate_fail_the_handshake(policy_host, pki, messaging):
    no_cert = grpc.ssl_channel_credentials(root_certificates=pki["ca"].ca_file.read_bytes())
    for credentials in (None, no_cert, creds_of(pki, "intruder")):
        code, _ = await status_of(policy_host.address, credentials, "CreateAgent", launch_msg(messaging, "g-x"))
        assert code == grpc.StatusCode.UNAVAILABLE


async def test_an_identity_the_policy_does_not_name_is_refused_by_name(policy_host, pki, messaging):
    for method, request in (("CreateAgent", launch_msg(messaging, "g-x")), ("ListAgents", pb.ListAgentsRequest()),
                            ("StopAgent", pb.StopAgentRequest(guild_id="g-x", agent_id="r"))):
        code, details = await status_of(policy_host.address, creds_of(pki, "stranger"), method, request)
        assert code == grpc.StatusCode.PERMISSION_DENIED, (method, details)
        assert "CN=stranger SAN=spiffe://cluster.local/ns/other/sa/default" in details
        assert "is not named in this host's authorization policy" in details
    # Health stays open to every certificate holder (peers ask each other for holds with it).
    code, _ = await status_of(policy_host.address, creds_of(pki, "stranger"), "Health", pb.HealthRequest())
    assert code == grpc.StatusCode.OK


async def test_a_read_only_identity_lists_but_cannot_launch(policy_host, pki, messaging):
    await listed_guilds(policy_host.address, creds_of(pki, "dashboard"))
    code, details = await status_of(policy_host.address, creds_of(pki, "dashboard"), "CreateAgent",
                                    launch_msg(messaging, "g-ro"))
    assert code == grpc.StatusCode.PERMISSION_DENIED
    assert "CN=dashboard may not launch" in details
    # Refused before its request is decoded: a caller without the right learns nothing from parse errors.
    code, details = await status_of(policy_host.address, creds_of(pki, "dashboard"), "CreateAgent",
                                    pb.CreateAgentRequest(guild_spec_json=b"{not json"))
    assert code == grpc.StatusCode.PERMISSION_DENIED, details


async def test_an_identity_for_team_a_guilds_cannot_launch_in_team_b(policy_host, pki, engine_settings, messaging):
    code, details = await status_of(policy_host.address, creds_of(pki, "team-a"), "CreateAgent",
                                    launch_msg(messaging, "team-b-x"))
    assert code == grpc.StatusCode.PERMISSION_DENIED
    assert "CN=team-a-ci may not launch in guild 'team-b-x'" in details
    # Through an engine: the refusal is final (every host has the same policy), nothing runs.
    async with AsyncK8sEngine(tls_settings(engine_settings, pki["team-a"])) as engine:
        with pytest.raises(NotAuthorizedError, match="team-a-ci"):
            await engine.run_agent(guild_spec("team-b-x"), responder("r"), messaging)
        assert not await engine.is_agent_running("team-b-x", "r")


async def test_the_engines_identity_launches_lists_and_stops(policy_host, pki, engine_settings, messaging):
    g = guild_spec(f"g-{uuid.uuid4().hex[:6]}")
    async with AsyncK8sEngine(tls_settings(engine_settings, pki["engine"])) as engine:
        record = await engine.run_agent(g, responder("r"), messaging)
        assert record.host == policy_host.address and record.pid > 0
        listed = await engine.pool.client(policy_host.address).list_agents(g.id)
        assert [a.agent_id for a in listed] == ["r"]
        # A listing of every guild shows each caller the guilds it may read.
        assert g.id in await listed_guilds(policy_host.address, creds_of(pki, "dashboard"))
        assert g.id not in await listed_guilds(policy_host.address, creds_of(pki, "team-a"))
        await engine.stop_agent(g.id, "r")
        await eventually(lambda: _stopped(engine, g.id), what="agent stopped")


async def _stopped(engine, guild_id: str) -> bool:
    return not await engine.is_agent_running(guild_id, "r")


async def test_a_changed_policy_file_is_in_force_without_a_restart(policy_host, pki):
    widened = {"rules": [*POLICY["rules"], {"identities": ["stranger"], "allow": ["read"]}]}
    replacement = policy_host.policy_file.with_suffix(".new")
    replacement.write_text(json.dumps(widened))
    replacement.replace(policy_host.policy_file)  # as a ConfigMap update swaps the file

    async def stranger_reads() -> bool:
        code, _ = await status_of(policy_host.address, creds_of(pki, "stranger"), "ListAgents",
                                  pb.ListAgentsRequest())
        return code == grpc.StatusCode.OK

    try:
        await eventually(stranger_reads, timeout=10, what="the widened policy in force")
        assert "authorization policy reloaded" in policy_host.logs()
    finally:
        policy_host.policy_file.write_text(json.dumps(POLICY))
        await eventually(_not(stranger_reads), timeout=10, what="the original policy back in force")


def _not(check):
    async def negated() -> bool:
        return not await check()
    return negated


@pytest.mark.parametrize("policy, fragment", [
    ("{not json", "is not valid JSON"),
    (json.dumps({"rules": [{"identities": ["x"], "allow": ["admin"]}]}), "unknown actions ['admin']"),
])
def test_a_host_with_a_bad_policy_file_refuses_to_start(tmp_path, pki, policy, fragment):
    path = tmp_path / "policy.json"
    path.write_text(policy)
    run = run_host({"RUSTIC_AGENT_HOST_TLS_CERT_FILE": str(pki["host"].cert),
                    "RUSTIC_AGENT_HOST_TLS_KEY_FILE": str(pki["host"].key),
                    "RUSTIC_AGENT_HOST_TLS_CLIENT_CA_FILE": str(pki["ca"].ca_file),
                    "RUSTIC_AGENT_HOST_AUTHZ_POLICY_FILE": str(path)})
    assert run.returncode == 2, run.stderr
    errors = [line for line in run.stderr.splitlines() if "configuration error" in line]
    assert len(errors) == 1 and fragment in errors[0] and str(path) in errors[0], run.stderr


def test_a_policy_without_tls_refuses_to_start(tmp_path):
    run = run_host({"RUSTIC_AGENT_HOST_AUTHZ_POLICY_FILE": str(tmp_path / "p.json")})
    assert run.returncode == 2 and "needs mutual TLS" in run.stderr, run.stderr

