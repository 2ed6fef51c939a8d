"""Mutual TLS between engine and hosts: only clients with a certificate from the hosts' CA get in."""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys
import uuid

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from rustic_ai.k8s import AsyncK8sEngine, EngineSettings, NoHostAvailableError
from rustic_ai.k8s.protocol.tls import channel_credentials
from rustic_ai.k8s.protocol.v1 import agent_host_pb2 as pb
from rustic_ai.k8s.protocol.v1 import agent_host_pb2_grpc as pb_grpc
from support.certs import TestCA
from support.eventually import eventually
from support.hosts import HostProcess
from support.probe import guild_spec, responder
from support.redis_server import free_port


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    root = tmp_path_factory.mktemp("pki")
    ca, other = TestCA(root, "fleet"), TestCA(root, "other")
    return {"ca": ca, "other": other, "host": ca.issue("host"), "engine": ca.issue("engine"),
            "intruder": other.issue("intruder")}


@pytest.fixture(scope="module")
def tls_host(redis_url, key_prefix, pki):
    health_port = free_port()
    host = HostProcess(redis_url, key_prefix, name="tls-host", env={
        "RUSTIC_AGENT_HOST_TLS_CERT_FILE": str(pki["host"].cert),
        "RUSTIC_AGENT_HOST_TLS_KEY_FILE": str(pki["host"].key),
        "RUSTIC_AGENT_HOST_TLS_CLIENT_CA_FILE": str(pki["ca"].ca_file),
        "RUSTIC_AGENT_HOST_ALLOW_PLAINTEXT": "false",
        "RUSTIC_AGENT_HOST_HEALTH_LISTEN": f"127.0.0.1:{health_port}",
    })
    host.health_port = health_port
    yield host
    host.close()


def tls_settings(engine_settings: EngineSettings, files) -> EngineSettings:
    return dataclasses.replace(engine_settings, tls_cert_file=str(files.cert), tls_key_file=str(files.key),
                               tls_ca_file=str(files.ca))


async def health_over(address: str, credentials: grpc.ChannelCredentials | None) -> pb.HostHealth:
    channel = (grpc.aio.secure_channel(address, credentials) if credentials is not None
               else grpc.aio.insecure_channel(address))
    async with channel:
        return await pb_grpc.AgentHostServiceStub(channel).Health(pb.HealthRequest(), timeout=3)


async def test_an_engine_with_a_fleet_certificate_launches_an_agent_on_a_tls_host(
        tls_host, engine_settings, pki, messaging):
    g = guild_spec(f"g-{uuid.uuid4().hex[:6]}")
    async with AsyncK8sEngine(tls_settings(engine_settings, pki["engine"])) as engine:
        record = await engine.run_agent(g, responder("r"), messaging)
        assert record.host == tls_host.address and record.pid > 0
        assert await engine.is_agent_running(g.id, "r")
        info = await engine.agent_info(g.id, "r")  # a second call over the same mTLS channel
        assert info.state == "running"
        await engine.stop_agent(g.id, "r")
        await eventually(lambda: _not(engine.is_agent_running(g.id, "r")), what="agent stopped")


async def _not(awaitable) -> bool:
    return not await awaitable


async def test_a_client_without_a_certificate_is_refused(tls_host, pki):
    trusting_only = grpc.ssl_channel_credentials(root_certificates=pki["ca"].ca_file.read_bytes())
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await health_over(tls_host.address, trusting_only)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    # Control: the same call with the fleet's client certificate is answered.
    good = pki["engine"]
    reply = await health_over(tls_host.address, channel_credentials(str(good.cert), str(good.key), str(good.ca)))
    assert reply.address == tls_host.address


async def test_a_client_certificate_from_another_ca_is_refused(tls_host, pki, engine_settings, messaging):
    intruder = pki["intruder"]
    creds = channel_credentials(str(intruder.cert), str(intruder.key), str(pki["ca"].ca_file))
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await health_over(tls_host.address, creds)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    # Through the engine: no host takes the agent, and nothing runs.
    settings = dataclasses.replace(tls_settings(engine_settings, intruder), tls_ca_file=str(pki["ca"].ca_file))
    g = guild_spec(f"g-{uuid.uuid4().hex[:6]}")
    async with AsyncK8sEngine(settings) as engine:
        with pytest.raises(NoHostAvailableError):
            await engine.run_agent(g, responder("r"), messaging)
        assert not await engine.is_agent_running(g.id, "r")


async def test_a_plain_text_client_is_refused(tls_host, engine_settings, messaging):
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await health_over(tls_host.address, None)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    g = guild_spec(f"g-{uuid.uuid4().hex[:6]}")
    async with AsyncK8sEngine(engine_settings) as engine:  # no TLS settings
        with pytest.raises(NoHostAvailableError):
            await engine.run_agent(g, responder("r"), messaging)
        assert not await engine.is_agent_running(g.id, "r")


async def test_the_health_port_answers_in_plain_text_and_serves_nothing_else(tls_host):
    async with grpc.aio.insecure_channel(f"127.0.0.1:{tls_host.health_port}") as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=3)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await pb_grpc.AgentHostServiceStub(channel).ListAgents(pb.ListAgentsRequest(), timeout=3)
        assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED


async def test_a_rotated_server_certificate_is_served_without_a_restart(redis_url, key_prefix, tmp_path, pki):
    ca = pki["ca"]
    files = ca.issue("rotating")
    host = HostProcess(redis_url, key_prefix, name="rotating-host", env={
        "RUSTIC_AGENT_HOST_TLS_CERT_FILE": str(files.cert),
        "RUSTIC_AGENT_HOST_TLS_KEY_FILE": str(files.key),
        "RUSTIC_AGENT_HOST_TLS_CLIENT_CA_FILE": str(ca.ca_file),
    })
    try:
        engine = pki["engine"]
        old_trust = channel_credentials(str(engine.cert), str(engine.key), str(ca.ca_file))
        assert (await health_over(host.address, old_trust)).address == host.address
        # The new server certificate comes from a new CA: only a client trusting it can connect.
        new_ca = TestCA(tmp_path, "rotated")
        renewed = new_ca.issue("rotating")
        shutil.copy(renewed.key, files.key)
        shutil.copy(renewed.cert, files.cert)
        new_trust = channel_credentials(str(engine.cert), str(engine.key), str(new_ca.ca_file))
        assert (await health_over(host.address, new_trust)).address == host.address
        with pytest.raises(grpc.aio.AioRpcError):
            await health_over(host.address, old_trust)
        assert host.proc.poll() is None
        assert "TLS certificate reloaded" in host.logs()
    finally:
        host.close()


def run_host(env: dict[str, str]) -> subprocess.CompletedProcess:
    # PYTHONPATH: the code under test (a worktree's src), not whatever is installed.
    base = {"PATH": "/usr/bin:/bin", "PYTHONPATH": os.environ.get("PYTHONPATH", ""),
            "RUSTIC_AGENT_HOST_LISTEN": "127.0.0.1:0", "RUSTIC_K8S_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"}
    return subprocess.run([sys.executable, "-m", "rustic_ai.k8s.cli.agent_host"], env={**base, **env},
                          capture_output=True, text=True, timeout=60, check=False)


@pytest.mark.parametrize("env, fragment", [
    ({"RUSTIC_AGENT_HOST_TLS_CERT_FILE": "/nonexistent/cert.pem"}, "TLS is half-configured"),
    ({"RUSTIC_AGENT_HOST_ALLOW_PLAINTEXT": "false"}, "plain text is not allowed"),
])
def test_a_host_refuses_to_start_with_half_or_no_tls_when_plain_text_is_off(env, fragment):
    run = run_host(env)
    assert run.returncode == 2, run.stderr
    assert fragment in run.stderr


def test_a_host_refuses_to_start_with_unreadable_tls_files(tmp_path, pki):
    run = run_host({"RUSTIC_AGENT_HOST_TLS_CERT_FILE": str(tmp_path / "missing.pem"),
                    "RUSTIC_AGENT_HOST_TLS_KEY_FILE": str(pki["host"].key),
                    "RUSTIC_AGENT_HOST_TLS_CLIENT_CA_FILE": str(pki["ca"].ca_file)})
    assert run.returncode == 2, run.stderr
    assert "missing.pem" in run.stderr and "cannot be read" in run.stderr
    mismatched = run_host({"RUSTIC_AGENT_HOST_TLS_CERT_FILE": str(pki["host"].cert),
                           "RUSTIC_AGENT_HOST_TLS_KEY_FILE": str(pki["engine"].key),
                           "RUSTIC_AGENT_HOST_TLS_CLIENT_CA_FILE": str(pki["ca"].ca_file)})
    assert mismatched.returncode == 2 and "do not form a pair" in mismatched.stderr, mismatched.stderr


def test_a_plain_text_host_says_so_at_start_up(start_host):
    host = start_host("plain")
    assert "WARNING" in host.logs() and "plain text" in host.logs()
