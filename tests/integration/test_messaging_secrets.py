"""A messaging password stays out of what the host keeps and shows, and out of Redis when referenced.

The agents' messaging Redis requires a password (so an agent that reports ready used the
right one); the registry stays on the session's plain Redis. rusticai-core logs the whole
messaging config at INFO when an agent builds its messaging: that line must be kept
masked, in GetAgentInfo's output, in `rustic-k8s agent` and in the host's own log.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid

import pytest
import redis

from rustic_ai.core.messaging import MessagingConfig
from rustic_ai.k8s import InvalidSpecError
from support.hosts import TESTS_DIR, HostProcess
from support.probe import guild_spec, responder
from support.redis_server import running_redis

PASSWORD = "msg-pw-" + uuid.uuid4().hex  # unique: finding it anywhere is a leak
SECRET_ENV = "RUSTIC_SECRET_MESSAGING_PASSWORD"
CONFIG_LINE = "Initializing backend from config"  # rusticai-core's INFO line with the whole config


@pytest.fixture(scope="module")
def messaging_redis():
    with running_redis("--requirepass", PASSWORD) as server:
        yield server


@pytest.fixture(scope="module")
def secret_host(redis_url, key_prefix):
    host = HostProcess(redis_url, key_prefix, name="secret-host", env={SECRET_ENV: PASSWORD})
    yield host
    host.close()


def messaging(port: int, password: str) -> MessagingConfig:
    return MessagingConfig(backend_module="rustic_ai.redis.messaging.backend", backend_class="RedisMessagingBackend",
                           backend_config={"redis_client": {"host": "127.0.0.1", "port": port, "password": password}})


def agent_command(redis_url: str, key_prefix: str, guild_id: str, agent_id: str) -> str:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(TESTS_DIR), os.environ.get("PYTHONPATH")])))
    run = subprocess.run([sys.executable, "-m", "rustic_ai.k8s.cli.main", "agent", guild_id, agent_id, "--lines",
                          "200", "--redis-url", redis_url, "--key-prefix", key_prefix],
                         capture_output=True, text=True, timeout=60, env=env, check=False)
    assert run.returncode == 0, run.stderr
    return run.stdout + run.stderr


def registry_contents(redis_url: str, key_prefix: str) -> str:
    """Every value under the fleet's key prefix, read straight from Redis."""
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    out = []
    try:
        for key in client.scan_iter(f"{key_prefix}:*"):
            kind = client.type(key)
            if kind == "hash":
                out += [f"{k}={v}" for k, v in client.hgetall(key).items()]
            elif kind == "string":
                out.append(client.get(key) or "")
            elif kind == "list":
                out += client.lrange(key, 0, -1)
            elif kind in ("set", "zset"):
                out += list(client.smembers(key)) if kind == "set" else client.zrange(key, 0, -1)
    finally:
        client.close()
    return "\n".join(out)


@pytest.mark.parametrize("password", [PASSWORD, "${env:" + SECRET_ENV + "}"], ids=["literal", "reference"])
async def test_the_password_is_masked_in_the_output_the_host_keeps_and_shows(
        password, secret_host, engine, messaging_redis, redis_url, key_prefix):
    g = guild_spec(f"g-{uuid.uuid4().hex[:6]}")
    record = await engine.run_agent(g, responder("r"), messaging(messaging_redis.port, password))
    assert record.host == secret_host.address  # ready: it subscribed to a Redis that requires the password
    info = await engine.agent_info(g.id, "r", output_lines=200)
    config_lines = [line for line in info.output if CONFIG_LINE in line]
    assert config_lines and all("'password': '***'" in line for line in config_lines), info.output
    assert not any(PASSWORD in line for line in info.output)
    shown = agent_command(redis_url, key_prefix, g.id, "r")
    assert CONFIG_LINE in shown and PASSWORD not in shown
    if password != PASSWORD:
        # A reference keeps the password out of the desired state: Redis holds the reference.
        stored = registry_contents(redis_url, key_prefix)
        assert "${env:" + SECRET_ENV + "}" in stored and PASSWORD not in stored
    await engine.stop_agent(g.id, "r")
    assert PASSWORD not in secret_host.logs()


@pytest.mark.parametrize("ref, fragment", [
    ("${env:RUSTIC_SECRET_NOT_SET}", "RUSTIC_SECRET_NOT_SET}, which is not set on this host"),
    ("${env:RUSTIC_K8S_REDIS_URL}", "only variables named RUSTIC_SECRET_* may be referenced"),
])
async def test_a_reference_the_host_cannot_resolve_is_refused(ref, fragment, secret_host, engine, messaging_redis):
    g = guild_spec(f"g-{uuid.uuid4().hex[:6]}")
    with pytest.raises(InvalidSpecError, match=fragment.replace("$", r"\$").replace("{", r"\{").replace("*", r"\*")):
        await engine.run_agent(g, responder("r"), messaging(messaging_redis.port, ref))
    assert not await engine.is_agent_running(g.id, "r")
