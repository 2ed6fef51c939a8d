"""Resource use of one agent process, read from /proc (Linux).

Reading procfs does not touch a disk: the kernel formats a few numbers into a buffer, so
these calls are as quick as a system call and fine on the event loop. A process that
exited meanwhile reads as None.

RSS is what the memory limit and the metrics use. It counts every resident page the
process maps, including those a warm-started agent still shares copy-on-write with its
fork server (the pre-imported interpreter, tens of MiB), so a limit must leave room for
them; what an agent allocates itself adds to that.
"""

from __future__ import annotations

import os

PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def rss_bytes(pid: int) -> int | None:
    """Resident set size of ``pid`` in bytes (/proc/PID/statm, second field)."""
    try:
        with open(f"/proc/{pid}/statm", "rb") as f:
            return int(f.read().split()[1]) * PAGE_SIZE
    except (OSError, IndexError, ValueError):
        return None


def cpu_seconds(pid: int) -> float | None:
    """User plus system CPU time ``pid`` has used, in seconds (/proc/PID/stat utime + stime)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
        # The command name (field 2) is in parentheses and may hold spaces: split after it.
        fields = data[data.rindex(b")") + 2:].split()
        return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
    except (OSError, IndexError, ValueError):
        return None
