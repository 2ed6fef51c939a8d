"""The exactly-once checker's idea of a live copy (support.exactly_once.copy_alive), on real processes.

A process stopped with a fatal signal pending (a frozen agent whose kernel timer fired) is
still listed in /proc but can never run again: SIGCONT ends it first. Counting it as a live
copy would report two copies where one cannot execute; not counting a process that can
resume would hide a real duplicate. Both are checked against processes the test controls.

The child stops itself and the test sends the SIGALRM: the kernel queues it exactly as the
fence's ITIMER_REAL would (a process-directed SIGALRM that no stopped thread can take), with no
race between a timer and the test's SIGSTOP. Agent processes have several threads and /proc
shows the main thread's mask, so the threaded cases pin down which way the checker errs.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from support.exactly_once import Copy, copy_alive
from support.ledger_agents import proc_starttime

CHILD = """
import os, signal, sys, threading, time
mode = sys.argv[1]
if mode == "catch":
    signal.signal(signal.SIGALRM, lambda *_: None)
if mode in ("main-blocks", "thread-blocks"):
    ready = threading.Event()
    def other():
        if mode == "thread-blocks":
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
        ready.set()
        while True:
            time.sleep(0.01)
    threading.Thread(target=other, daemon=True).start()
    ready.wait()
    if mode == "main-blocks":
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
print("ready", flush=True)
os.kill(os.getpid(), signal.SIGSTOP)
while True:
    time.sleep(0.01)
"""

# mode -> (counted as a copy while stopped with SIGALRM pending, what SIGCONT does)
CASES = {
    "default": (False, "dies"),  # the fence's case: SIGALRM's default action
    "catch": (True, "runs"),  # its handler runs and it goes on
    "thread-blocks": (False, "dies"),  # the main thread takes it
    # Another thread takes it and the process dies, but /proc shows the main thread's mask
    # only: the checker counts it as a copy (the safe side: a duplicate reported, none hidden).
    "main-blocks": (True, "dies"),
}


def _until(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)  # polling /proc, not a synchronisation


def _status(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split(":")[1], 16)
    return 0


def _state(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


@pytest.mark.parametrize("mode", list(CASES))
def test_a_stopped_process_is_a_copy_unless_a_fatal_signal_waits_for_it(mode):
    counted, then = CASES[mode]
    proc = subprocess.Popen([sys.executable, "-c", CHILD, mode], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        _until(lambda: _state(proc.pid) == "T")
        copy = Copy(proc.pid, proc_starttime(proc.pid), time.monotonic())
        assert copy_alive(copy)  # stopped, nothing pending: SIGCONT resumes it
        os.kill(proc.pid, signal.SIGALRM)
        _until(lambda: _status(proc.pid, "ShdPnd") & (1 << (signal.SIGALRM - 1)))
        assert _state(proc.pid) == "T"
        assert copy_alive(copy) is counted
        os.kill(proc.pid, signal.SIGCONT)
        if then == "dies":
            assert proc.wait(10) == -signal.SIGALRM  # the kernel ended it before it ran on
            assert not copy_alive(copy)
        else:
            _until(lambda: _state(proc.pid) != "T")
            assert copy_alive(copy) and proc.poll() is None
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()


BIG = """
import os, signal, sys, threading, time
memory = bytearray(300 * 1024 * 1024)
for i in range(0, len(memory), 4096):
    memory[i] = 1  # touched, so the exit has it to free
for _ in range(int(sys.argv[1])):  # agent processes have several threads (feed, worker, sweeper, fence)
    threading.Thread(target=lambda: [time.sleep(0.01) for _ in iter(int, 1)], daemon=True).start()
print("ready", flush=True)
os.kill(os.getpid(), signal.SIGSTOP)
while True:
    time.sleep(0.01)
"""


@pytest.mark.parametrize("threads", [0, 6])
def test_a_process_being_torn_down_is_not_a_copy(threads):
    """A frozen copy whose timer fired dies at SIGCONT, but the kernel takes a while to free a
    large process (state R, not yet Z): every sample in that time must already see it gone —
    also while the thread that took the signal exits and the others have only been sent
    their SIGKILL."""
    proc = subprocess.Popen([sys.executable, "-c", BIG, str(threads)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        _until(lambda: _state(proc.pid) == "T")
        copy = Copy(proc.pid, proc_starttime(proc.pid), time.monotonic())
        os.kill(proc.pid, signal.SIGALRM)  # queued as the fence's timer queues it: nobody can take it yet
        _until(lambda: _status(proc.pid, "ShdPnd") & (1 << (signal.SIGALRM - 1)))
        os.kill(proc.pid, signal.SIGCONT)
        states = []
        while proc.poll() is None:
            with contextlib.suppress(OSError, IndexError):
                states.append(_state(proc.pid))
            assert not copy_alive(copy), f"seen alive while dying (states so far {states})"
        assert proc.returncode == -signal.SIGALRM
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()
