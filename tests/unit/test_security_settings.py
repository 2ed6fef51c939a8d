"""Secrets stay out of messages; TLS and Redis settings are all-or-nothing; certificates reload."""

from __future__ import annotations

import os
import shutil

import pytest

from rustic_ai.k8s import ConfigError, EngineSettings, HostSettings
from rustic_ai.k8s.base.redact import redact_text, redact_url, url_password
from rustic_ai.k8s.protocol.tls import ReloadingServerCertificates
from support.certs import TestCA

SECRET = "s3cr3t-p@ss"


@pytest.mark.parametrize("url, shown", [
    ("redis://:s3cr3t@redis:6379/0", "redis://:***@redis:6379/0"),
    ("rediss://rk8s:s3cr3t@redis:6380/1", "rediss://rk8s:***@redis:6380/1"),
    ("redis://redis:6379/0?password=s3cr3t&db=1", "redis://redis:6379/0?password=***&db=1"),
    ("unix:///run/redis.sock?password=s3cr3t", "unix:///run/redis.sock?password=***"),
    ("redis://rk8s@redis:6379/0", "redis://rk8s@redis:6379/0"),  # a user name alone is not secret
    ("redis://redis:6379/0", "redis://redis:6379/0"),
])
def test_urls_lose_their_password(url, shown):
    assert redact_url(url) == shown
    assert "s3cr3t" not in redact_url(url)


def test_secrets_are_scrubbed_from_text_also_when_url_encoded():
    assert url_password("redis://u:s3cr3t-p%40ss@h/0") == SECRET
    assert redact_text(f"AUTH {SECRET} failed; url had s3cr3t-p%40ss", SECRET) == "AUTH *** failed; url had ***"


@pytest.mark.parametrize("cls", [HostSettings, EngineSettings])
def test_settings_never_show_a_password(cls):
    env = {"RUSTIC_K8S_REDIS_URL": f"redis://u:{SECRET}@redis:6379/0", "RUSTIC_K8S_REDIS_PASSWORD": SECRET}
    settings = cls.from_env(env)
    assert settings.redis_password == SECRET
    assert SECRET not in repr(settings) and SECRET not in str(settings)
    bad = {**env, "RUSTIC_K8S_REDIS_URL": f"http://u:{SECRET}@redis:6379/0"}
    with pytest.raises(ConfigError) as info:
        cls.from_env(bad)
    assert "RUSTIC_K8S_REDIS_URL" in str(info.value) and SECRET not in str(info.value)


@pytest.mark.parametrize("cls, env, fragment", [
    (HostSettings, {"RUSTIC_AGENT_HOST_TLS_KEY_FILE": "k.pem"}, "half-configured"),
    (HostSettings, {"RUSTIC_AGENT_HOST_ALLOW_PLAINTEXT": "no"}, "plain text is not allowed"),
    (HostSettings, {"RUSTIC_AGENT_HOST_ALLOWED_MODULES": " , "}, "at least one module prefix"),
    (EngineSettings, {"RUSTIC_K8S_TLS_CA_FILE": "ca.pem"}, "half-configured"),
    (EngineSettings, {"RUSTIC_K8S_TLS_SERVER_NAME": "agent-host"}, "needs the TLS files"),
    (EngineSettings, {"RUSTIC_K8S_REDIS_CERT_FILE": "c.pem"}, "needs its key"),
    (EngineSettings, {"RUSTIC_K8S_REDIS_CA_FILE": "ca.pem"}, "must be rediss://"),
])
def test_half_configured_security_is_a_config_error(cls, env, fragment):
    with pytest.raises(ConfigError, match=fragment):
        cls.from_env(env)


def test_security_defaults():
    host = HostSettings.from_env({})
    assert host.allowed_modules == ("rustic_ai.",) and host.allow_plaintext and not host.tls
    assert host.metrics_listen == "" and host.max_agents_per_guild == 0 and host.agent_memory_mb == 0
    full = HostSettings.from_env({"RUSTIC_AGENT_HOST_TLS_CERT_FILE": "c", "RUSTIC_AGENT_HOST_TLS_KEY_FILE": "k",
                                  "RUSTIC_AGENT_HOST_TLS_CLIENT_CA_FILE": "ca",
                                  "RUSTIC_AGENT_HOST_ALLOW_PLAINTEXT": "false"})
    assert full.tls and not full.allow_plaintext


def test_the_server_certificate_is_reloaded_when_its_files_change(tmp_path):
    ca = TestCA(tmp_path)
    live = ca.issue("live")
    fetch = ReloadingServerCertificates(str(live.cert), str(live.key), str(ca.ca_file))
    assert fetch() is None  # unchanged: gRPC keeps what it has
    renewed = ca.issue("renewed")
    # Half a rotation: a new certificate whose key has not arrived yet is not used...
    shutil.copy(renewed.cert, live.cert)
    os.utime(live.cert, ns=(1, 1))
    assert fetch() is None and fetch.reloads == 0
    # ...and once the key is there too, the next handshake gets the new pair.
    shutil.copy(renewed.key, live.key)
    assert fetch() is not None and fetch.reloads == 1
    assert fetch() is None
