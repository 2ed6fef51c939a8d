"""A private redis-server on a free loopback port, for the tests and the local cluster.

Never the machine's own Redis: the tests own every process they talk to.

Nothing is persisted on its own (``--save ""``, no AOF): `restart(keep_data=True)` asks for
a SAVE first, so the server comes back from its RDB file in its own directory, as a Redis
with persistence would; `restart()` removes that file and comes back empty.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator

from rustic_ai.k8s.cli.local_redis import redis_server_binary


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    def __init__(self, port: int | None = None, *extra_args: str) -> None:
        self.port = port or free_port()
        self.extra_args = extra_args
        self.proc: subprocess.Popen | None = None
        self.dir = tempfile.mkdtemp(prefix="rk8s-redis-")

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        # redis-server from PATH (.ci/run installs it), else the embedded Valkey server that
        # `scripts/dev setup` installs: the suite runs on a machine that has only Python.
        exe, _ = redis_server_binary()
        self.proc = spawn_until_ready(
            [exe, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", self.dir, *self.extra_args], self._answers_ping, "redis-server")
        return self

    def _answers_ping(self) -> bool:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), 0.2) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith((b"+PONG", b"-NOAUTH"))  # a server that requires AUTH is up too
        return False

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)  # a paused server cannot act on SIGTERM
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def command(self, *parts: str, timeout: float = 10.0) -> bytes:
        """One command over a plain socket (RESP), its first reply line."""
        wire = f"*{len(parts)}\r\n" + "".join(f"${len(p)}\r\n{p}\r\n" for p in parts)
        with socket.create_connection(("127.0.0.1", self.port), timeout) as s:
            s.sendall(wire.encode())
            return s.recv(4096).split(b"\r\n", 1)[0]

    def shutdown(self, *, keep_data: bool) -> None:
        """Stops the server. ``keep_data``: SHUTDOWN SAVE, so everything up to the last write is in
        its RDB file and the next `start` loads it (a persistent Redis's graceful shutdown);
        otherwise the file is removed and the next `start` is empty."""
        rdb = os.path.join(self.dir, "dump.rdb")
        if keep_data and self.proc is not None and self.proc.poll() is None:
            self.resume()
            with contextlib.suppress(OSError):
                self.command("SHUTDOWN", "SAVE")  # no reply: the server exits once the file is written
            self.proc.wait(10)
            if not os.path.exists(rdb):
                raise RuntimeError("SHUTDOWN SAVE wrote no RDB file")
        self.stop()
        if not keep_data:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(rdb)

    def restart(self, *, keep_data: bool = False, downtime_s: float = 0.0) -> None:
        """Stops, stays down for ``downtime_s``, starts again on the same port, with or without its data."""
        self.shutdown(keep_data=keep_data)
        if downtime_s:
            time.sleep(downtime_s)  # the outage itself
        self.start()

    def pause(self) -> None:
        """SIGSTOP: connections stay open, nothing is answered, data is kept."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


@contextlib.contextmanager
def running_redis(*extra_args: str) -> Iterator[RedisServer]:
    server = RedisServer(None, *extra_args).start()
    try:
        yield server
    finally:
        server.close()


def spawn_until_ready(argv: list[str], ready, what: str, timeout: float = 10.0) -> subprocess.Popen:
    """Starts a private server and returns once ``ready()`` (polled, with a deadline) says it serves."""
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        if ready():
            return proc
        time.sleep(0.02)
    proc.kill()
    proc.wait()
    raise RuntimeError(f"{what} did not answer within {timeout:.0f} s")
