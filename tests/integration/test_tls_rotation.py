"""An engine survives the rotation of its client certificate, and of the CA with it.

Certificates are projected as the kubelet projects a Secret (support.certs.SecretVolume:
a ``..data`` symlink swapped atomically), for the engine and for the host alike.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import uuid

import grpc
import pytest

from rustic_ai.k8s import AsyncK8sEngine, RusticK8sError
from rustic_ai.k8s.base.authz import PolicyFile
from rustic_ai.k8s.base.models import AgentRecord, HostRecord, HostState
from rustic_ai.k8s.protocol import ChannelPool, GrpcHostServer
from rustic_ai.k8s.protocol.tls import ReloadingChannelCredentials, channel_credentials, server_credentials
from support.certs import SecretVolume, TestCA
from support.eventually import eventually
from support.hosts import HostProcess
from support.probe import guild_spec, responder
from support.proxy import CuttableProxy
from support.redis_server import free_port
from test_tls import health_over


async def test_an_engine_keeps_working_when_host_and_engine_move_to_a_new_ca(
        redis_url, key_prefix, tmp_path, engine_settings, messaging):
    old_ca, new_ca = TestCA(tmp_path, "ca-2026"), TestCA(tmp_path, "ca-2027")
    host_volume = SecretVolume(tmp_path / "host-tls").write(old_ca.issue("rustic-agent-host"))
    engine_volume = SecretVolume(tmp_path / "engine-tls").write(old_ca.issue("rustic-engine"))
    old_engine = old_ca.issue("rustic-engine")  # a copy of the engine's first credentials
    # The engine reaches the host through a proxy, so the test can drop established connections:
    # without that, a connection made before the rotation would carry on and prove nothing.
    listen = free_port()
    proxy = CuttableProxy(listen).start()
    host = HostProcess(redis_url, key_prefix, name="rotated-host", env={
        "RUSTIC_AGENT_HOST_LISTEN": f"127.0.0.1:{listen}",
        "RUSTIC_AGENT_HOST_ADVERTISE": f"127.0.0.1:{proxy.port}",
        "RUSTIC_AGENT_HOST_TLS_CERT_FILE": str(host_volume.cert),
        "RUSTIC_AGENT_HOST_TLS_KEY_FILE": str(host_volume.key),
        "RUSTIC_AGENT_HOST_TLS_CLIENT_CA_FILE": str(host_volume.ca),
        "RUSTIC_AGENT_HOST_ALLOW_PLAINTEXT": "false",
    })
    settings = dataclasses.replace(engine_settings, tls_cert_file=str(engine_volume.cert),
                                   tls_key_file=str(engine_volume.key), tls_ca_file=str(engine_volume.ca))
    g = guild_spec(f"g-{uuid.uuid4().hex[:6]}")
    try:
        async with AsyncK8sEngine(settings) as engine:
            assert (await engine.run_agent(g, responder("a"), messaging)).host == host.address
            # cert-manager renews both from a new CA; the kubelet swaps both Secrets' files.
            host_volume.write(new_ca.issue("rustic-agent-host"))
            engine_volume.write(new_ca.issue("rustic-engine"))
            proxy.heal()  # resets every relayed connection: the next call needs a new handshake

            async def answered() -> bool:
                try:
                    return (await engine.agent_info(g.id, "a")).state == "running"
                except RusticK8sError:
                    return False

            await eventually(answered, timeout=10, what="the host answers the engine after the rotation")
            assert (await engine.run_agent(g, responder("b"), messaging)).host == host.address
            for agent_id in ("a", "b"):
                await engine.stop_agent(g.id, agent_id)
        # The old credentials no longer get in: the calls above used the new files.
        old = channel_credentials(str(old_engine.cert), str(old_engine.key), str(old_ca.ca_file))
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await health_over(host.address, old)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        assert host.proc.poll() is None
    finally:
        host.close()
        proxy.close()


@dataclasses.dataclass
class _SlowListings:
    """A HostApi whose ListAgents of guild "slow" waits until released: a call in flight."""

    entered: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)
    release: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)

    async def list_agents(self, guild_id: str) -> list[AgentRecord]:
        if guild_id == "slow":
            self.entered.set()
            await self.release.wait()
        return [AgentRecord(guild_id, "a")]

    def health(self) -> HostRecord:
        return HostRecord("x", "x", 1, 0, HostState.SERVING, "0", 0.0)


async def test_a_call_in_flight_finishes_on_the_old_channel_while_new_calls_use_the_new_certificate(tmp_path):
    ca = TestCA(tmp_path, "ca")
    server_files = ca.issue("host")
    # Each certificate may read one guild only: a call answered proves which certificate made it.
    policy = tmp_path / "policy.json"
    policy.write_text(json.dumps({"rules": [
        {"identities": ["engine-old"], "allow": ["read"], "guilds": ["slow"]},
        {"identities": ["engine-new"], "allow": ["read"], "guilds": ["fast"]},
    ]}))
    api = _SlowListings()
    server = GrpcHostServer(api, "127.0.0.1:0", max_message_bytes=1 << 20, policy=PolicyFile(str(policy)),
                            credentials=server_credentials(str(server_files.cert), str(server_files.key),
                                                           str(ca.ca_file)))
    port = await server.start()
    volume = SecretVolume(tmp_path / "engine-tls").write(ca.issue("engine-old"))
    pool = ChannelPool(credentials=ReloadingChannelCredentials(str(volume.cert), str(volume.key), str(volume.ca),
                                                               check_every_s=0))
    try:
        client = pool.client(f"127.0.0.1:{port}")
        slow = asyncio.create_task(client.list_agents("slow"))
        await asyncio.wait_for(api.entered.wait(), 5)
        volume.write(ca.issue("engine-new"))
        assert [a.guild_id for a in await client.list_agents("fast")] == ["fast"]
        assert pool.channels_replaced == 1
        api.release.set()
        assert [a.guild_id for a in await asyncio.wait_for(slow, 5)] == ["slow"]
    finally:
        await pool.close()
        await server.stop(None)


def test_half_rotated_client_files_keep_the_credentials_in_use(tmp_path):
    ca = TestCA(tmp_path, "ca")
    volume = SecretVolume(tmp_path / "tls").write(ca.issue("one"))
    creds = ReloadingChannelCredentials(str(volume.cert), str(volume.key), str(volume.ca), check_every_s=0)
    first = creds.current()
    volume.cert.resolve().write_bytes(ca.issue("two").cert.read_bytes())  # the key does not match it
    assert creds.current() == first
    volume.write(ca.issue("three"))
    generation, _ = creds.current()
    assert generation == first[0] + 1
