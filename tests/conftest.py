from __future__ import annotations

import sys
import uuid
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from support.redis_server import RedisServer  # noqa: E402


@pytest.fixture(scope="session")
def redis_server():
    """One private redis-server for the whole run; tests isolate by key prefix."""
    server = RedisServer().start()
    yield server
    server.close()


@pytest.fixture(scope="session")
def redis_url(redis_server) -> str:
    return redis_server.url


@pytest.fixture(scope="module")
def key_prefix() -> str:
    """A unique registry namespace per test module (tests inside use unique guild ids)."""
    return f"t{uuid.uuid4().hex[:10]}"
