"""The control protocol between a host and one agent process, and the Linux bits both sides share.

An agent process talks back to its host on a *control pipe*, separate from its
stdout/stderr so that nothing an agent prints can be mistaken for a status report. The
child writes exactly one JSON line and then closes the pipe:

    {"event": "ready", "pid": 1234, ...}                 the agent is built and subscribed
    {"event": "error", "kind": "invalid_spec", "message": "..."}   then exit code 2
    {"event": "error", "kind": "launch", "message": "..."}         then exit code 3

End of file without a line means the child died before it could say anything. The
request itself travels the other way on the child's stdin, as one ``LaunchRequest`` JSON
document terminated by end of file. Nothing is pickled anywhere: both directions are
JSON, so a host and an agent process never need to share Python object layouts.

``set_parent_death_signal`` is how a process makes sure it never outlives the process
that started it (prctl PR_SET_PDEATHSIG), used by agent processes and the fork server.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import sys
from typing import Any

# Environment variables a cold-started child reads (a forked child gets the same values as arguments).
CONTROL_FD_ENV = "RUSTIC_K8S_CONTROL_FD"
PARENT_PID_ENV = "RUSTIC_K8S_PARENT_PID"
LEASE_FD_ENV = "RUSTIC_K8S_LEASE_FD"  # the read end of the lease pipe (see fence.py)

# The fork server (forkserver.py): its socket's fd number, extra modules to preload, and the
# shape of its messages. Kept here so the host side never imports the server's module.
FORKSERVER_MODULE = "rustic_ai.k8s.process.forkserver"
FORKSERVER_FD_ENV = "RUSTIC_K8S_FORKSERVER_FD"
PRELOAD_ENV = "RUSTIC_AGENT_HOST_PRELOAD"
FORKSERVER_MAX_MESSAGE = 1 << 16
FDS_PER_FORK = 4  # the child's stdin read end, output write end, control write end, lease read end

EVENT_READY = "ready"
EVENT_ERROR = "error"
KIND_INVALID_SPEC = "invalid_spec"
KIND_FORBIDDEN = "forbidden_module"  # the request named a module outside the allow-list; exit code 2
KIND_LAUNCH = "launch"

EXIT_OK = 0
EXIT_INVALID_SPEC = 2
EXIT_LAUNCH_FAILED = 3
EXIT_ORPHANED = 4  # the parent was already gone when the child started
EXIT_FENCED = 5  # the host could no longer prove its lease: the agent stopped itself (fence.py)

MAX_MESSAGE_CHARS = 4000  # keeps a control line far below the host's StreamReader line limit

_PR_SET_PDEATHSIG = 1


def encode_event(event: dict[str, Any]) -> bytes:
    return (json.dumps(event, separators=(",", ":"), default=str) + "\n").encode()


def encode_deadline(stop_at: float, kill_at: float) -> bytes:
    """One lease-pipe line: CLOCK_MONOTONIC instants (seconds) to stop cleanly by, and to be dead by."""
    return f"{stop_at:.6f} {kill_at:.6f}\n".encode()


def decode_deadline(line: bytes) -> tuple[float, float]:
    """Raises ValueError for anything but two numbers."""
    stop_at, kill_at = (float(v) for v in line.split())
    return stop_at, kill_at


def decode_event(line: bytes) -> dict[str, Any]:
    """Raises ValueError for anything that is not one JSON object with an "event" field."""
    value = json.loads(line)
    if not isinstance(value, dict) or not isinstance(value.get("event"), str):
        raise ValueError(f"not a control event: {line[:200]!r}")
    return value


def write_event(fd: int, event: dict[str, Any]) -> None:
    """Blocking write of one event; only ever called in an agent process, never in the host's loop."""
    data = encode_event(event)
    while data:
        written = os.write(fd, data)
        data = data[written:]


def error_event(kind: str, message: str) -> dict[str, Any]:
    if len(message) > MAX_MESSAGE_CHARS:
        message = message[: MAX_MESSAGE_CHARS - 3] + "..."
    return {"event": EVENT_ERROR, "kind": kind, "message": message}


def read_all(fd: int) -> bytes:
    """Reads a file descriptor to end of file (the child's stdin carries the request)."""
    chunks = []
    while chunk := os.read(fd, 1 << 16):
        chunks.append(chunk)
    return b"".join(chunks)


def set_parent_death_signal(expected_parent: int | None, sig: int = signal.SIGKILL) -> bool:
    """Asks the kernel to send ``sig`` to this process when its parent dies.

    Returns False when the parent is already gone (the request would never fire), so the
    caller exits instead of running as an orphan. The signal is tied to the parent
    *thread* that forked us; hosts fork from their event-loop thread, which lives as long
    as the host does. Off Linux this is a no-op that returns True.
    """
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"prctl(PR_SET_PDEATHSIG) failed: {os.strerror(err)}")
    # Checked after the prctl: a parent that dies later triggers the signal, one that
    # died before shows up here as a changed parent pid (we were re-parented).
    # Without an expected pid there is nothing to compare: the host may itself be PID 1.
    return not expected_parent or os.getppid() == expected_parent
