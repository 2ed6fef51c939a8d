"""The exactly-once checker's idea of a live copy (support.exactly_once.copy_alive), on real processes.

A process stopped with a fatal signal pending (a frozen agent whose kernel timer fired) is
still listed in /proc but can never run again: SIGCONT ends it first. Counting it as a live
copy would report two copies where one cannot execute; not counting a process that can
resume would hide a real duplicate. Both are checked against processes the test controls.
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

ARMED = """
import signal, sys, time
if sys.argv[1] == "catch":
    signal.signal(signal.SIGALRM, lambda *_: None)
signal.setitimer(signal.ITIMER_REAL, 0.3)
print("armed", flush=True)
while True:
    time.sleep(0.01)
"""


def _until(predicate, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)  # polling /proc, not a synchronisation


def _pending(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("ShdPnd:"):
            return int(line.split(":")[1], 16)
    return 0


def _state(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


@pytest.mark.parametrize("handler", ["default", "catch"])
def test_a_stopped_process_is_a_copy_unless_a_fatal_signal_waits_for_it(handler):
    proc = subprocess.Popen([sys.executable, "-c", ARMED, handler], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "armed"
        copy = Copy(proc.pid, proc_starttime(proc.pid), time.monotonic())
        os.kill(proc.pid, signal.SIGSTOP)
        _until(lambda: _state(proc.pid) == "T")
        if not _pending(proc.pid):  # stopped before its timer fired: it resumes at SIGCONT, a live copy
            assert copy_alive(copy)
        _until(lambda: _pending(proc.pid) & (1 << (signal.SIGALRM - 1)))
        # Timer fired while stopped: SIGALRM pending. With its default action the process is done.
        assert copy_alive(copy) is (handler == "catch")
        os.kill(proc.pid, signal.SIGCONT)
        if handler == "default":
            assert proc.wait(5) == -signal.SIGALRM  # the kernel ended it before it ran again
            assert not copy_alive(copy)
        else:  # its handler ran and it goes on
            _until(lambda: _state(proc.pid) != "T")
            assert copy_alive(copy) and proc.poll() is None
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()


BIG = """
import signal, time
memory = bytearray(300 * 1024 * 1024)
for i in range(0, len(memory), 4096):
    memory[i] = 1  # touched, so the exit has it to free
signal.setitimer(signal.ITIMER_REAL, 0.3)
print("armed", flush=True)
while True:
    time.sleep(0.01)
"""


def test_a_process_being_torn_down_is_not_a_copy():
    """A frozen copy whose timer fired dies at SIGCONT, but the kernel takes a while to free a
    large process (state R, not yet Z): every sample in that time must already see it gone."""
    proc = subprocess.Popen([sys.executable, "-c", BIG], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "armed"
        copy = Copy(proc.pid, proc_starttime(proc.pid), time.monotonic())
        os.kill(proc.pid, signal.SIGSTOP)
        _until(lambda: _pending(proc.pid) & (1 << (signal.SIGALRM - 1)))
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
