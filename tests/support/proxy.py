"""A TCP proxy on loopback that a test can cut: a network partition for one client.

`cut()` closes every relayed connection and makes new ones hang (accepted, never
relayed) — what a host sees when packets to Redis are dropped. `stall()` is a silent
drop: relayed connections stay open but nothing crosses them any more (the client only
notices by its own timeouts), and new ones hang. `refuse()` resets every connection and
refuses new ones at once (a REJECT rule, or Redis's port closed). `heal()` restores it,
resetting whatever was held so clients reconnect afresh. `lose_next_reply()` lets the next
command reach Redis but drops the connection instead of relaying its reply: the command
ran, the client never learns what it returned.
Runs on its own event loop thread so synchronous and asynchronous tests can use it.
"""

from __future__ import annotations

import asyncio
import threading

from .redis_server import free_port


class CuttableProxy:
    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = free_port()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="test-proxy", daemon=True)
        self._mode = "open"  # open | cut | stall | refuse
        self._lose_reply = 0
        self.replies_lost = 0
        self._writers: set[asyncio.StreamWriter] = set()
        self._server: asyncio.Server | None = None

    def start(self) -> CuttableProxy:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(5)
        return self

    async def _start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._mode == "refuse":
            writer.transport.abort()
            return
        if self._mode != "open":
            self._writers.add(writer)  # blackhole: hold the connection, relay nothing
            return
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.close()
            return
        self._writers |= {writer, up_writer}

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter, replies: bool = False) -> None:
            try:
                while self._mode != "cut" and (data := await src.read(65536)):
                    while self._mode == "stall":  # dropped on the floor: hold the bytes, send nothing
                        await asyncio.sleep(0.05)
                    if self._mode != "open":
                        break
                    if replies and self._lose_reply:
                        # The command was executed upstream; its reply dies with both sockets.
                        self._lose_reply -= 1
                        self.replies_lost += 1
                        writer.transport.abort()
                        up_writer.transport.abort()
                        return
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer, replies=True))

    def cut(self) -> None:
        self._set("cut", abort=True)

    def stall(self) -> None:
        self._set("stall", abort=False)

    def refuse(self) -> None:
        self._set("refuse", abort=True)

    def lose_next_reply(self, times: int = 1) -> None:
        """The next ``times`` replies from Redis are not relayed: each one's connection is dropped."""

        async def arm() -> None:
            self._lose_reply = times

        # Armed on the proxy's loop before returning, so the caller's next command is the one.
        asyncio.run_coroutine_threadsafe(arm(), self._loop).result(5)

    def _set(self, mode: str, *, abort: bool) -> None:
        def do() -> None:
            self._mode = mode
            if abort:
                for w in list(self._writers):
                    w.transport.abort()
                self._writers.clear()

        self._loop.call_soon_threadsafe(do)

    def heal(self) -> None:
        def do() -> None:
            for w in list(self._writers):
                w.transport.abort()
            self._writers.clear()
            self._mode = "open"

        self._loop.call_soon_threadsafe(do)

    def close(self) -> None:
        async def stop() -> None:
            if self._server is not None:
                self._server.close()
            for w in list(self._writers):
                w.transport.abort()

        asyncio.run_coroutine_threadsafe(stop(), self._loop).result(5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()
