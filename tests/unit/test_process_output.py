"""OutputBuffer: the bounded record of an agent's last output lines, and the control protocol's codec."""

from __future__ import annotations

import asyncio

import pytest

from rustic_ai.k8s.process.control import decode_event, encode_event, error_event
from rustic_ai.k8s.process.output import TRUNCATED_MARK, OutputBuffer


def test_keeps_only_the_last_lines():
    buf = OutputBuffer(3)
    buf.feed(b"".join(f"line {i}\n".encode() for i in range(10)))
    assert buf.tail() == ["line 7", "line 8", "line 9"]
    assert buf.tail(2) == ["line 8", "line 9"]
    assert buf.tail(0) == [] and buf.tail(-1) == []
    assert len(buf) == 3 and buf.total_lines == 10


def test_lines_split_across_chunks_are_joined():
    buf = OutputBuffer(10)
    for piece in (b"hel", b"lo wo", b"rld\nsecond", b" line\r\n", b"tail without newline"):
        buf.feed(piece)
    assert buf.tail() == ["hello world", "second line"]
    buf.finish()
    assert buf.tail() == ["hello world", "second line", "tail without newline"]


def test_long_lines_are_truncated_even_when_they_arrive_in_pieces():
    buf = OutputBuffer(10, max_line_bytes=16)
    buf.feed(b"a" * 40 + b"\n")
    for _ in range(5):
        buf.feed(b"b" * 10)  # one 50-byte line, fed in pieces
    buf.feed(b"\nshort\n")
    buf.append("c" * 40)
    assert buf.tail() == [
        "a" * 16 + TRUNCATED_MARK,
        "b" * 16 + TRUNCATED_MARK,
        "short",
        "c" * 16 + TRUNCATED_MARK,
    ]


def test_invalid_utf8_is_replaced_not_fatal():
    buf = OutputBuffer(5)
    buf.feed(b"caf\xc3\xa9 \xff\xfe ok\n")
    assert buf.tail() == ["café \ufffd\ufffd ok"]


def test_zero_lines_keeps_nothing():
    buf = OutputBuffer(0)
    buf.feed(b"a\nb\n")
    assert buf.tail() == [] and buf.total_lines == 2


def test_rejects_nonsense_limits():
    with pytest.raises(ValueError):
        OutputBuffer(-1)
    with pytest.raises(ValueError):
        OutputBuffer(5, max_line_bytes=0)


async def test_pump_drains_a_stream_reader_to_the_end():
    reader = asyncio.StreamReader()
    buf = OutputBuffer(100, max_line_bytes=1024)
    pump = asyncio.create_task(buf.pump(reader))
    # Far more than a pipe buffer, with one line far longer than the reader's 64 KiB limit.
    reader.feed_data(b"".join(f"{i}\n".encode() for i in range(5000)))
    reader.feed_data(b"z" * 200_000 + b"\nlast")
    reader.feed_eof()
    await asyncio.wait_for(pump, 5)
    tail = buf.tail()
    assert len(tail) == 100
    assert tail[-2] == "z" * 1024 + TRUNCATED_MARK
    assert tail[-1] == "last"
    assert buf.total_lines == 5002


def test_control_events_round_trip_and_garbage_is_rejected():
    line = encode_event({"event": "ready", "pid": 42})
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert decode_event(line) == {"event": "ready", "pid": 42}
    long = error_event("launch", "x" * 10_000)
    assert long["kind"] == "launch" and len(long["message"]) <= 4000
    for garbage in (b"not json\n", b"[1, 2]\n", b'{"pid": 1}\n'):
        with pytest.raises(ValueError):
            decode_event(garbage)
