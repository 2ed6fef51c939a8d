from __future__ import annotations

import os
import sys
import uuid
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

# Test agents live in tests/support (``support.*``): every host and agent process the
# tests start inherits this and may import them. The default allow-list is rustic_ai. only.
os.environ.setdefault("RUSTIC_AGENT_HOST_ALLOWED_MODULES", "rustic_ai.,support.")

from support.nats_server import NatsServer  # noqa: E402
from support.redis_server import RedisServer  # noqa: E402


@pytest.fixture(scope="session")
def redis_server():
    """One private redis-server for the whole run; tests isolate by key prefix."""
    server = RedisServer().start()
    yield server
    server.close()


@pytest.fixture(scope="session")
def nats_server():
    """One private nats-server (JetStream) for the run, started only when a test asks for it."""
    server = NatsServer().start()
    yield server
    server.close()


@pytest.fixture(scope="session")
def redis_url(redis_server) -> str:
    return redis_server.url


@pytest.fixture(scope="module")
def key_prefix() -> str:
    """A unique registry namespace per test module (tests inside use unique guild ids)."""
    return f"t{uuid.uuid4().hex[:10]}"
