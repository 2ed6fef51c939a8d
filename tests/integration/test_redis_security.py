"""The registry behind Redis AUTH (password, ACL user) and TLS (rediss://), end to end.

Each test runs a private redis-server with the security feature on, a real host and an
engine against it, and launches an agent; the agents' messaging stays on the session's
plain Redis. Passwords must never show up in logs or error messages.
"""

from __future__ import annotations

import uuid

import pytest

from rustic_ai.k8s import AsyncK8sEngine, EngineSettings, RegistryUnavailableError
from support.certs import TestCA
from support.eventually import eventually
from support.hosts import HostProcess
from support.probe import guild_spec, responder
from support.redis_server import free_port, running_redis

PASSWORD = "pw-" + uuid.uuid4().hex  # unique, so finding it anywhere is a leak


async def launch_and_stop(redis_url: str, key_prefix: str, messaging, host_env: dict[str, str] | None = None,
                          **engine_overrides) -> None:
    host = HostProcess(redis_url, key_prefix, name="secure-redis-host", env=host_env)
    try:
        settings = EngineSettings.from_env({}, redis_url=redis_url, key_prefix=key_prefix, launch_timeout_s=30.0,
                                           discovery_refresh_s=0.2, **engine_overrides)
        g = guild_spec(f"g-{uuid.uuid4().hex[:6]}")
        async with AsyncK8sEngine(settings) as engine:
            # The host registered itself through the secured Redis, so placement finds it.
            await eventually(lambda: engine.hosts(), what="host registered")
            record = await engine.run_agent(g, responder("r"), messaging)
            assert record.host == host.address
            assert await engine.is_agent_running(g.id, "r")
            await engine.stop_agent(g.id, "r")
            assert not await engine.is_agent_running(g.id, "r")
        assert PASSWORD not in host.logs()
    finally:
        host.close()


async def test_a_password_in_the_url(key_prefix, messaging):
    with running_redis("--requirepass", PASSWORD) as redis:
        url = f"redis://:{PASSWORD}@127.0.0.1:{redis.port}/0"
        await launch_and_stop(url, key_prefix, messaging)


async def test_an_acl_user_with_the_password_from_its_own_variable(key_prefix, messaging):
    acl = ("--user", "rk8s", "on", f">{PASSWORD}", "~*", "&*", "+@all", "--user", "default", "off")
    with running_redis(*acl) as redis:
        url = f"redis://127.0.0.1:{redis.port}/0"  # no credentials in the URL at all
        creds = {"RUSTIC_K8S_REDIS_USERNAME": "rk8s", "RUSTIC_K8S_REDIS_PASSWORD": PASSWORD}
        await launch_and_stop(url, key_prefix, messaging, host_env=creds,
                              redis_username="rk8s", redis_password=PASSWORD)


async def test_tls_with_a_client_certificate(key_prefix, messaging, tmp_path):
    ca = TestCA(tmp_path, "redis-ca")
    server, client = ca.issue("redis"), ca.issue("rk8s-client")
    tls_port = free_port()
    with running_redis("--tls-port", str(tls_port), "--tls-cert-file", str(server.cert), "--tls-key-file",
                       str(server.key), "--tls-ca-cert-file", str(ca.ca_file), "--tls-auth-clients", "yes"):
        url = f"rediss://127.0.0.1:{tls_port}/0"
        files = {"RUSTIC_K8S_REDIS_CA_FILE": str(ca.ca_file), "RUSTIC_K8S_REDIS_CERT_FILE": str(client.cert),
                 "RUSTIC_K8S_REDIS_KEY_FILE": str(client.key)}
        await launch_and_stop(url, key_prefix, messaging, host_env=files, redis_ca_file=str(ca.ca_file),
                              redis_cert_file=str(client.cert), redis_key_file=str(client.key))
        # Control: without a client certificate the TLS port does not let the engine in.
        bare = EngineSettings.from_env({}, redis_url=url, key_prefix=key_prefix, redis_ca_file=str(ca.ca_file))
        async with AsyncK8sEngine(bare) as engine:
            with pytest.raises(RegistryUnavailableError):
                await engine.registry.list_hosts()


async def test_wrong_credentials_are_reported_without_the_password(key_prefix):
    wrong = "wrong-" + uuid.uuid4().hex
    with running_redis("--requirepass", PASSWORD) as redis:
        url = f"redis://rk8s:{wrong}@127.0.0.1:{redis.port}/0"
        settings = EngineSettings.from_env({}, redis_url=url, key_prefix=key_prefix)
        assert wrong not in repr(settings)
        async with AsyncK8sEngine(settings) as engine:
            with pytest.raises(RegistryUnavailableError) as info:
                await engine.is_agent_running("g", "a")
        assert "credentials" in str(info.value) and wrong not in str(info.value)
        assert "rk8s:***@" in str(info.value)
        # A host with the wrong password keeps trying and says why, without the password.
        host = HostProcess(url, key_prefix, name="wrong-password-host",
                           env={"RUSTIC_AGENT_HOST_LOG_LEVEL": "INFO"})
        try:
            await eventually(lambda: "credentials" in host.logs(), what="the host logs the refusal")
            assert wrong not in host.logs()
        finally:
            host.close()
