"""The shipped deployment, run for real: a host and Redis configured exactly as the rendered
manifests configure them, with the Secrets `rustic-k8s certs` writes.

`support.manifests.Mounts` plays the kubelet: secrets.yaml and the ConfigMaps become files,
and the host's and Redis' environment and arguments are taken from `kubectl kustomize
docker/k8s` with mount paths mapped to those files. Only what a laptop cannot have is
changed: loopback addresses and free ports instead of pod IPs and fixed ports.

Refused, and what the caller gets: no client certificate, a certificate from another CA,
plain text — UNAVAILABLE (the TLS handshake fails; no RPC reaches the host); a Redis
client without the password — NOAUTH; with it but a @dangerous command — NOPERM.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import uuid
from pathlib import Path

import grpc
import pytest
import redis as redis_py
import yaml
from rustic_ai.core.messaging import MessagingConfig

from rustic_ai.k8s import AsyncK8sEngine, EngineSettings, NoHostAvailableError, NotAuthorizedError
from rustic_ai.k8s.cli import certs
from rustic_ai.k8s.protocol.tls import channel_credentials
from rustic_ai.k8s.protocol.v1 import agent_host_pb2 as pb
from rustic_ai.k8s.protocol.v1 import agent_host_pb2_grpc as pb_grpc
from support.eventually import eventually
from support.fleet import answers
from support.hosts import HostProcess
from support.manifests import K8S, ROOT, Mounts, container, kustomize, pod_spec
from support.probe import Probe, guild_spec, responder
from support.redis_server import RedisServer, free_port

HOST = ("Deployment", "rustic-agent-host")
REDIS = ("StatefulSet", "redis")


def issue(out: Path) -> Path:
    run = subprocess.run([sys.executable, "-m", "rustic_ai.k8s.cli.main", "certs", "--out", str(out)],
                         capture_output=True, text=True, timeout=60, check=False)
    assert run.returncode == 0, run.stderr
    return out


class Deployment:
    """The rendered base with its Secrets mounted; a Redis and a host started from it."""

    def __init__(self, root: Path, key_prefix: str) -> None:
        self.secrets = issue(root / "secrets")
        self.docs = kustomize(K8S)
        self.mounts = Mounts(root / "mounts").add_secrets(self.secrets / "secrets.yaml").add_config_maps(self.docs)
        self.password = self.mounts.data[("Secret", certs.REDIS_SECRET)]["password"].decode()
        redis_args = self.mounts.args(pod_spec(self.docs, *REDIS), container(self.docs, *REDIS))
        self.redis = RedisServer(None, *redis_args).start()
        self.redis_url = f"redis://127.0.0.1:{self.redis.port}/0"  # no password: the host reads it from the Secret
        self.health_port = free_port()
        env = self.mounts.env(pod_spec(self.docs, *HOST), container(self.docs, *HOST))
        env.update({"RUSTIC_K8S_REDIS_URL": self.redis_url, "RUSTIC_AGENT_HOST_LISTEN": "127.0.0.1:0",
                    "RUSTIC_AGENT_HOST_HEALTH_LISTEN": f"127.0.0.1:{self.health_port}",
                    "RUSTIC_AGENT_HOST_METRICS_LISTEN": ""})
        self.host_env = env
        self.host = HostProcess(self.redis_url, key_prefix, name="secure-host", env=env)

    def files(self, secret: str) -> tuple[str, str, str]:
        d = self.mounts.root / secret
        return str(d / "tls.crt"), str(d / "tls.key"), str(d / "ca.crt")

    def engine_settings(self, key_prefix: str, secret: str = f"{certs.DEFAULT_ENGINE}-tls", **overrides):
        cert, key, ca = self.files(secret)
        values = dict(redis_url=self.redis_url, redis_password=self.password, key_prefix=key_prefix,
                      tls_cert_file=cert, tls_key_file=key, tls_ca_file=ca,
                      # What the manifest tells engines inside host pods to check; yours set the same.
                      tls_server_name=self.host_env["RUSTIC_K8S_TLS_SERVER_NAME"],
                      call_timeout_s=5.0, launch_timeout_s=30.0, discovery_refresh_s=0.2)
        values.update(overrides)
        return EngineSettings.from_env({}, **values)

    def messaging(self) -> MessagingConfig:
        return MessagingConfig(backend_module="rustic_ai.redis.messaging.backend",
                               backend_class="RedisMessagingBackend",
                               backend_config={"redis_client": {"host": "127.0.0.1", "port": self.redis.port,
                                                                "password": self.password}})

    def close(self) -> None:
        self.host.close()
        self.redis.close()


@pytest.fixture(scope="module")
def deployment(tmp_path_factory, key_prefix):
    d = Deployment(tmp_path_factory.mktemp("deploy"), key_prefix)
    yield d
    d.close()


@pytest.fixture(scope="module")
def stranger(tmp_path_factory) -> Path:
    """An engine certificate from another run of `rustic-k8s certs`: another CA."""
    out = tmp_path_factory.mktemp("other")
    certs.write_secrets(out, namespace="rustic-ai", engines=[certs.DEFAULT_ENGINE], extra_dns=[], days=1, ca_days=1,
                        new_redis_password=False)
    return out / f"{certs.DEFAULT_ENGINE}-tls"


async def health_over(address: str, credentials: grpc.ChannelCredentials | None, server_name: str = ""):
    options = [("grpc.ssl_target_name_override", server_name)] if server_name else []
    channel = (grpc.aio.secure_channel(address, credentials, options=options) if credentials is not None
               else grpc.aio.insecure_channel(address))
    async with channel:
        return await pb_grpc.AgentHostServiceStub(channel).Health(pb.HealthRequest(), timeout=3)


async def test_the_issued_engine_certificate_launches_an_agent_that_talks_through_the_password_redis(
        deployment, key_prefix):
    g = guild_spec(f"g-{uuid.uuid4().hex[:6]}")
    async with AsyncK8sEngine(deployment.engine_settings(key_prefix)) as engine:
        await eventually(lambda: engine.hosts(), what="host registered through the password Redis")
        record = await engine.run_agent(g, responder("r"), deployment.messaging())
        assert record.host == deployment.host.address and record.pid > 0
        # The agent's messaging goes through the same Redis, as the ACL's default user.
        probe = Probe(g.id, deployment.messaging())
        try:
            assert await answers(probe, "r")
        finally:
            probe.close()
        await engine.stop_agent(g.id, "r")
        assert not await engine.is_agent_running(g.id, "r")
    assert deployment.password not in deployment.host.logs()


async def test_the_host_certificate_is_also_a_client_identity(deployment):
    """What a guild-manager agent in a host pod dials other hosts with (RUSTIC_K8S_TLS_* of the manifest)."""
    env = deployment.host_env
    creds = channel_credentials(env["RUSTIC_K8S_TLS_CERT_FILE"], env["RUSTIC_K8S_TLS_KEY_FILE"],
                                env["RUSTIC_K8S_TLS_CA_FILE"])
    reply = await health_over(deployment.host.address, creds, env["RUSTIC_K8S_TLS_SERVER_NAME"])
    assert reply.address == deployment.host.address


@pytest.mark.parametrize("client", ["no certificate", "another CA", "plain text"])
async def test_strangers_are_refused_in_the_handshake(deployment, stranger, client):
    server_name = deployment.host_env["RUSTIC_K8S_TLS_SERVER_NAME"]
    _, _, fleet_ca = deployment.files(certs.HOST_SECRET)
    if client == "no certificate":
        creds = grpc.ssl_channel_credentials(root_certificates=Path(fleet_ca).read_bytes())
    elif client == "another CA":
        creds = channel_credentials(str(stranger / "tls.crt"), str(stranger / "tls.key"), fleet_ca)
    else:
        creds = None
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await health_over(deployment.host.address, creds, server_name)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_an_engine_from_another_ca_places_nothing(deployment, key_prefix, stranger):
    settings = deployment.engine_settings(key_prefix, tls_cert_file=str(stranger / "tls.crt"),
                                          tls_key_file=str(stranger / "tls.key"))
    g = guild_spec(f"g-{uuid.uuid4().hex[:6]}")
    async with AsyncK8sEngine(settings) as engine:
        with pytest.raises(NoHostAvailableError):
            await engine.run_agent(g, responder("r"), deployment.messaging())
        assert not await engine.is_agent_running(g.id, "r")


async def test_an_identity_of_the_fleet_ca_that_the_shipped_policy_does_not_name_may_not_launch(
        deployment, key_prefix, tmp_path):
    """The same CA, another name (`rustic-k8s certs --engine rustic-stranger`): past the handshake,
    refused by the default policy of docker/k8s/authz.yaml, and nothing runs."""
    out = tmp_path / "same-ca"
    (out / "ca").mkdir(parents=True)
    for name in ("ca.crt", "ca.key"):
        (out / "ca" / name).write_bytes((deployment.secrets / "ca" / name).read_bytes())
    certs.write_secrets(out, namespace="rustic-ai", engines=["rustic-stranger"], extra_dns=[], days=1, ca_days=1,
                        new_redis_password=False)
    d = out / "rustic-stranger-tls"
    settings = deployment.engine_settings(key_prefix, tls_cert_file=str(d / "tls.crt"), tls_key_file=str(d / "tls.key"))
    g = guild_spec(f"g-{uuid.uuid4().hex[:6]}")
    async with AsyncK8sEngine(settings) as engine:
        await eventually(lambda: engine.hosts(), what="host registered")
        with pytest.raises(NotAuthorizedError, match="rustic-stranger"):
            await engine.run_agent(g, responder("r"), deployment.messaging())
        assert not await engine.is_agent_running(g.id, "r")


async def test_the_kubelet_probe_port_answers_in_plain_text_and_the_serving_port_does_not(deployment):
    """The image's health check (docker/healthcheck.py) on the manifest's HEALTH_LISTEN, as the kubelet probes."""
    async def healthcheck(*args: str) -> int:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, str(ROOT / "docker" / "healthcheck.py"), *args,
            env={**os.environ, "RUSTIC_HEALTHCHECK_TIMEOUT_S": "2",
                 "RUSTIC_AGENT_HOST_HEALTH_LISTEN": deployment.host_env["RUSTIC_AGENT_HOST_HEALTH_LISTEN"]},
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
        async with asyncio.timeout(30):
            return await proc.wait()

    assert await healthcheck() == 0
    assert await healthcheck(deployment.host.address) == 1  # plain text on the mTLS port: refused


def test_redis_wants_the_password_and_refuses_dangerous_commands(deployment):
    assert deployment.redis.command("PING").startswith(b"-NOAUTH")
    assert deployment.redis.command("AUTH", "not-it").startswith(b"-WRONGPASS")
    client = redis_py.Redis(port=deployment.redis.port, password=deployment.password, socket_timeout=5)
    try:
        assert client.ping()
        with pytest.raises(redis_py.exceptions.NoPermissionError):
            client.flushall()
        with pytest.raises(redis_py.exceptions.NoPermissionError):
            client.config_get("requirepass")
    finally:
        client.close()


async def test_compose_redis_and_demo_run_a_guild_with_the_password(key_prefix, tmp_path):
    """compose.yaml's Redis command and the hosts' and demo's environment, with RUSTIC_REDIS_PASSWORD set."""
    services = yaml.safe_load((ROOT / "compose.yaml").read_text())["services"]
    password = "pw-" + uuid.uuid4().hex
    # Compose interpolation: ${RUSTIC_REDIS_PASSWORD:?...} becomes the password, $$ becomes $.
    def compose_env(service: str) -> dict[str, str]:
        return {k: password if str(v).startswith("${RUSTIC_REDIS_PASSWORD") else str(v)
                for k, v in services[service]["environment"].items()}

    sh, flag, script = services["redis"]["command"]
    port = free_port()
    script = script.replace("$$", "$") + f" --port {port} --bind 127.0.0.1 --dir {tmp_path}"
    redis = subprocess.Popen([sh, flag, script], env={"PATH": os.environ["PATH"], **compose_env("redis")},
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    host = None
    try:
        await eventually(lambda: _pings(port, password), what="compose redis up")
        with pytest.raises(redis_py.AuthenticationError):
            redis_py.Redis(port=port, socket_timeout=5).ping()
        url = f"redis://127.0.0.1:{port}/0"
        host_port = free_port()
        host_env = {**compose_env("agent-host"), "RUSTIC_K8S_REDIS_URL": url,
                    "RUSTIC_AGENT_HOST_LISTEN": f"127.0.0.1:{host_port}", "RUSTIC_AGENT_HOST_ADVERTISE": ""}
        host = HostProcess(url, key_prefix, name="compose-host", env=host_env)
        demo_env = {**os.environ, **compose_env("demo"), "RUSTIC_K8S_REDIS_URL": url,
                    "RUSTIC_K8S_KEY_PREFIX": key_prefix, "RUSTIC_K8S_DNS_NAME": "localhost", "RUSTIC_K8S_DNS_PORT": str(host_port), "DEMO_AGENTS": "2",
                    "DEMO_HOSTS": "1", "DEMO_WAIT_S": "30"}
        proc = await asyncio.create_subprocess_exec(sys.executable, str(ROOT / "docker" / "compose_demo.py"),
                                                    env=demo_env, stdout=asyncio.subprocess.PIPE,
                                                    stderr=asyncio.subprocess.STDOUT)
        try:
            async with asyncio.timeout(90):
                out, _ = await proc.communicate()
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        text = out.decode(errors="replace")
        assert proc.returncode == 0, text[-4000:] + "\n--- host log ---\n" + host.logs()
        assert "baton came back" in text
        assert password not in host.logs()
    finally:
        if host is not None:
            host.close()
        redis.terminate()
        redis.wait(10)


def _pings(port: int, password: str | None) -> bool:
    client = redis_py.Redis(port=port, password=password, socket_timeout=1, socket_connect_timeout=0.5)
    try:
        return bool(client.ping())
    except redis_py.ConnectionError:  # not up yet (AuthenticationError is one too: a wrong password fails here)
        return False
    finally:
        client.close()
