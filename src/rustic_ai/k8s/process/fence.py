"""The agent's side of fencing: an agent process stops itself when its host cannot prove its lease.

Why here and not in the host: the host is exactly the process that may be stalled (SIGSTOP,
a blocked event loop, a long GC pause, a frozen pod). A fence that needs the host to be
scheduled does not hold during the pause it is for. So the host only ever *extends* a
deadline, after each lease renewal that succeeded, and the agent process enforces it on its
own:

* The host writes ``"<stop_at> <kill_at>\\n"`` on the *lease pipe* (an fd of its own, not the
  control pipe) — two CLOCK_MONOTONIC instants. CLOCK_MONOTONIC is one clock for every
  process of a kernel (and of a pod), so an absolute instant means the same to both sides and
  no transit delay can stretch it: a line read late only shortens what is left.
* A daemon thread (``LeaseFence``) waits on the pipe. If ``stop_at`` passes with no newer
  line, it asks the agent to stop cleanly (the same path as SIGTERM: the message in hand is
  finished and acknowledged, nothing new is taken), and the process exits with EXIT_FENCED.
* ``kill_at`` is armed as a kernel timer (``setitimer(ITIMER_REAL)``, SIGALRM with its
  default action: terminate). The kernel delivers it whatever the process's threads are
  doing, and a process thawed after the instant dies before any of its code runs again.
  The thread also SIGKILLs the process group just after ``kill_at`` in case agent code took
  SIGALRM over. (The timer ends the agent process only: helpers an agent starts should arm
  PR_SET_PDEATHSIG themselves, as multiprocessing workers of a dead parent do not stop.)

End of file on the pipe means the host is gone: no more extensions come, the current
deadline stands (PR_SET_PDEATHSIG normally ends the process sooner). The timing argument —
why ``kill_at`` always falls before another host may adopt the agent — is in
docs/architecture.md, "Fencing".
"""

from __future__ import annotations

import logging
import os
import select
import signal
import threading
import time
from collections.abc import Callable

from .control import decode_deadline

log = logging.getLogger(__name__)

BACKSTOP_AFTER_S = 0.1  # well inside the fence margin (docs/architecture.md, "Fencing")


class LeaseFence(threading.Thread):
    """Enforces the host's lease deadline inside the agent process."""

    def __init__(self, fd: int, on_stop: Callable[[], None]) -> None:
        super().__init__(name="rk8s-lease-fence", daemon=True)
        self._fd: int | None = fd
        self._on_stop = on_stop
        self._buffer = b""
        self.stop_at: float | None = None
        self.kill_at: float | None = None
        self.fired = False  # stop_at passed: the agent was asked to stop

    def arm(self, first_line_timeout_s: float = 30.0) -> None:
        """Reads the first deadline (the host writes it before the request), arms, then starts the thread."""
        signal.signal(signal.SIGALRM, signal.SIG_DFL)  # the backstop: SIGALRM's default action ends us
        began = time.monotonic()
        while self.kill_at is None:
            left = first_line_timeout_s - (time.monotonic() - began)
            if left <= 0 or not self._read(left):
                # No deadline ever came: the host gave up on this launch or is gone.
                log.error("no lease deadline from the host; exiting")
                os._exit(1)
        self.start()

    def _read(self, timeout_s: float | None) -> bool:
        """Waits up to ``timeout_s`` for input; False on time-out or end of file."""
        if self._fd is None:
            if timeout_s is not None:
                time.sleep(max(0.0, timeout_s))
            return False
        readable, _, _ = select.select([self._fd], [], [], timeout_s)
        if not readable:
            return False
        try:
            data = os.read(self._fd, 4096)
        except OSError:
            data = b""
        if not data:
            os.close(self._fd)
            self._fd = None  # the host is gone: the current deadline stands
            return False
        self._buffer += data
        *lines, self._buffer = self._buffer.split(b"\n")
        for line in lines:
            try:
                stop_at, kill_at = decode_deadline(line)
            except ValueError:
                log.error("unreadable lease line %r; ignored", line[:80])
                continue
            # A deadline only ever comes from a renewal that succeeded; take the newest.
            self.stop_at, self.kill_at = stop_at, kill_at
        if self.kill_at is not None and not self.fired:
            signal.setitimer(signal.ITIMER_REAL, max(self.kill_at - time.monotonic(), 0.001))
        return True

    def run(self) -> None:
        while not self.fired:
            assert self.stop_at is not None
            left = self.stop_at - time.monotonic()
            if left <= 0:
                self.fired = True
                log.error("the host has not proved its lease in time: stopping this agent before another host "
                          "may start it")
                self._on_stop()
                break
            self._read(left)
        # Stopping cleanly; the kernel timer is armed for kill_at. Should agent code have
        # replaced SIGALRM's default action, this is the last word — a moment after, so the
        # timer's SIGALRM (exit -14, read by the host as a fence) normally comes first — and
        # it takes the agent's helper processes (its process group) along.
        assert self.kill_at is not None
        time.sleep(max(0.0, self.kill_at + BACKSTOP_AFTER_S - time.monotonic()))
        try:
            os.killpg(0, signal.SIGKILL)
        finally:
            os.kill(os.getpid(), signal.SIGKILL)
