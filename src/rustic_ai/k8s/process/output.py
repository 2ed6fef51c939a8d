"""A bounded record of what an agent process printed: the last N lines of stdout+stderr.

A host keeps this for every agent so that a crash report or ``GetAgentInfo`` can show the
agent's last words without a log pipeline. Memory is bounded twice: by the number of
lines (a ``deque`` with ``maxlen``) and by the length of one line (longer lines are cut,
and a line that never ends is cut at the same size while the rest is skipped until its
newline). The pump reads whatever is available in chunks rather than with ``readline``,
so a child's pipe is always drained and never fills up, whatever the child writes.

Secrets are masked as lines are stored (``redact``, a base/redact.py ``Redactor`` of the
agent's messaging passwords): rusticai-core logs the whole messaging config at INFO, and
these lines reach ``GetAgentInfo``, ``rustic-k8s agent``, crash reports and the registry.
A line is masked whole, after it was put together from the pipe's chunks, so a secret
split across two reads is still found.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Callable

DEFAULT_MAX_LINE_BYTES = 8 * 1024
TRUNCATED_MARK = " [...truncated]"
_CHUNK = 64 * 1024


class OutputBuffer:
    def __init__(self, max_lines: int, max_line_bytes: int = DEFAULT_MAX_LINE_BYTES,
                 redact: Callable[[str, bool], str] | None = None) -> None:
        """``redact(line, cut)`` masks secrets in a line before it is kept (``cut``: the line was truncated)."""
        if max_lines < 0 or max_line_bytes < 1:
            raise ValueError("max_lines must be >= 0 and max_line_bytes >= 1")
        self.max_lines = max_lines
        self.max_line_bytes = max_line_bytes
        self._redact = redact
        self._lines: collections.deque[str] = collections.deque(maxlen=max_lines)
        self._partial = bytearray()
        self._skipping = False  # inside an over-long line whose head is already kept
        self.total_lines = 0  # lines seen, including those the ring has forgotten

    def append(self, line: str) -> None:
        """Adds one complete line (without its newline), cutting it if it is too long."""
        raw = line.encode(errors="replace")
        cut = len(raw) > self.max_line_bytes
        if cut:
            line = raw[: self.max_line_bytes].decode(errors="replace")
        self._add(line, cut)

    def feed(self, data: bytes) -> None:
        """Adds raw output; complete lines are stored, a trailing partial line waits for more."""
        start = 0
        while (newline := data.find(b"\n", start)) >= 0:
            self._take(data[start:newline])
            self._end_line()
            start = newline + 1
        self._take(data[start:])

    def finish(self) -> None:
        """End of output: a last line without a newline is kept too."""
        if self._partial or self._skipping:
            self._end_line()

    async def pump(self, reader: asyncio.StreamReader) -> None:
        """Copies ``reader`` into the buffer until end of file."""
        try:
            while chunk := await reader.read(_CHUNK):
                self.feed(chunk)
        finally:
            self.finish()

    def tail(self, n: int | None = None) -> list[str]:
        """The last ``n`` lines (all kept lines when ``n`` is None), oldest first."""
        if n is None:
            return list(self._lines)
        if n <= 0:
            return []
        return list(self._lines)[-n:]

    def __len__(self) -> int:
        return len(self._lines)

    # -- internals -------------------------------------------------------------------------

    def _take(self, piece: bytes) -> None:
        if self._skipping or not piece:
            return
        room = self.max_line_bytes - len(self._partial)
        if len(piece) > room:
            self._partial += piece[:room]
            self._skipping = True
        else:
            self._partial += piece

    def _end_line(self) -> None:
        text = bytes(self._partial).decode(errors="replace").rstrip("\r")
        cut = self._skipping
        self._partial.clear()
        self._skipping = False
        self._add(text, cut)

    def _add(self, line: str, cut: bool = False) -> None:
        if self._redact is not None:
            line = self._redact(line, cut)
        self.total_lines += 1
        self._lines.append(line + TRUNCATED_MARK if cut else line)
