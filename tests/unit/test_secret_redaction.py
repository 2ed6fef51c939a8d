"""Messaging secrets: ${env:...} references, finding passwords in a config, masking them in output."""

from __future__ import annotations

import pytest

from rustic_ai.k8s import InvalidSpecError
from rustic_ai.k8s.base.envrefs import check_references, resolve_references
from rustic_ai.k8s.base.redact import Redactor, messaging_secrets
from rustic_ai.k8s.process.output import OutputBuffer

ENV = {"RUSTIC_SECRET_MSG_PW": "s3cret-from-env", "RUSTIC_K8S_REDIS_PASSWORD": "registry-pw"}


def config(**redis_client) -> dict:
    return {"backend_module": "rustic_ai.redis.messaging.backend", "backend_class": "RedisMessagingBackend",
            "backend_config": {"redis_client": {"host": "redis", "port": 6379, **redis_client}}}


def test_a_reference_is_replaced_by_the_variable_and_nothing_else_changes():
    original = config(password="${env:RUSTIC_SECRET_MSG_PW}", username="agents")
    resolved = resolve_references(original, ENV)
    assert resolved["backend_config"]["redis_client"] == {"host": "redis", "port": 6379,
                                                          "password": "s3cret-from-env", "username": "agents"}
    assert original["backend_config"]["redis_client"]["password"] == "${env:RUSTIC_SECRET_MSG_PW}"  # a copy
    check_references(original, ENV)


@pytest.mark.parametrize("ref, fragment", [
    ("${env:RUSTIC_SECRET_UNSET}", "refers to ${env:RUSTIC_SECRET_UNSET}, which is not set on this host"),
    # The host's own credentials cannot be sent to a messaging server a caller chose.
    ("${env:RUSTIC_K8S_REDIS_PASSWORD}", "only variables named RUSTIC_SECRET_* may be referenced"),
])
def test_a_reference_the_host_cannot_resolve_is_a_bad_spec_naming_the_variable(ref, fragment):
    for check in (lambda: check_references(config(password=ref), ENV),
                  lambda: resolve_references(config(password=ref), ENV)):
        with pytest.raises(InvalidSpecError) as info:
            check()
        assert fragment in str(info.value)
        assert "messaging_config.backend_config.redis_client.password" in str(info.value)
        assert "registry-pw" not in str(info.value)


def test_secrets_are_found_literal_in_urls_and_behind_references():
    guild = {"properties": {"messaging": config(token="tok-in-guild-spec")}}
    found = messaging_secrets(
        {**config(password="literal-pw", api_key="k-123456"),
         "backend_config": {**config(password="literal-pw", api_key="k-123456")["backend_config"],
                            "servers": ["nats://u:url-pw@nats:4222"], "ref": "${env:RUSTIC_SECRET_MSG_PW}",
                            "host": "redis"}},
        guild, ENV)
    assert set(found) == {"literal-pw", "k-123456", "url-pw", "s3cret-from-env", "tok-in-guild-spec"}
    assert messaging_secrets(config(), None, ENV) == []  # host names and ports are not secrets


def test_output_lines_keep_no_secret_in_any_printed_form():
    redact = Redactor(["pa'ss\"word"])
    buf = OutputBuffer(10, max_line_bytes=60, redact=redact)
    buf.feed(b"config: {'password': 'pa\\'ss\"word'} json: \"pa'ss\\\"word\"\n")
    buf.feed(b"raw pa'ss")  # a secret split across two reads of the pipe
    buf.feed(b"\"word end\n")
    buf.feed(b"x" * 52 + b"pa'ss\"word and more\n")  # cut in the middle of the secret
    lines = buf.tail()
    assert all("pa'ss" not in line and "ss\"word" not in line for line in lines), lines
    assert lines[1] == "raw *** end"
    assert lines[2].endswith("***" + " [...truncated]")
