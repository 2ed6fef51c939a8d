"""Which messaging backends a host accepts: those with a server every host reaches, not the
in-memory one, under any of the module names rusticai-core exports it from (docs/messaging.md)."""

from __future__ import annotations

import pytest

from rustic_ai.core.messaging import MessagingConfig
from rustic_ai.k8s import InvalidSpecError
from rustic_ai.k8s.base.specs import launch_request_from_models, summarize_launch
from support.probe import guild_spec, nats_messaging, redis_messaging, responder


def summarize(messaging: MessagingConfig):
    return summarize_launch(launch_request_from_models(guild_spec("g"), responder("a"), messaging))


@pytest.mark.parametrize("module", ["rustic_ai.core.messaging.backend", "rustic_ai.core.messaging",
                                    "rustic_ai.core", "rustic_ai.core.messaging.backend.in_memory_backend"])
def test_the_in_memory_backend_is_refused_with_what_to_use_instead(module):
    with pytest.raises(InvalidSpecError, match="keeps messages inside one process.*RedisMessagingBackend"):
        summarize(MessagingConfig(backend_module=module, backend_class="InMemoryMessagingBackend",
                                  backend_config={}))


@pytest.mark.parametrize("messaging", [redis_messaging(6379), nats_messaging("nats://nats:4222"),
                                       MessagingConfig(backend_module="mycompany.messaging",
                                                       backend_class="InMemoryMessagingBackend", backend_config={})],
                         ids=["redis", "nats", "a user's class of the same name"])
def test_backends_with_a_server_are_accepted(messaging):
    assert summarize(messaging).agent_id == "a"
