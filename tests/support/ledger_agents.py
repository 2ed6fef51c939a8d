"""Agents that keep a ledger of their own, outside the registry, for the exactly-once checker.

A `LedgerAgent` appends one line per event to ``<ledger dir>/<guild>__<agent>.ledger``:

    start <pid> <proc starttime> <monotonic time>     once, when the process builds the agent
    handled <seq> <pid> <monotonic time>              for every numbered message it handles

The directory comes from ``RUSTIC_TEST_LEDGER_DIR`` in the host's environment, which agent
processes inherit. Each line is one ``os.write`` on an ``O_APPEND`` descriptor: the kernel
appends it whole, so the lines of two copies writing at once never interleave, and a
SIGKILL can lose at most the line being written, never corrupt an earlier one.
``time.monotonic()`` is CLOCK_MONOTONIC, one clock for every process on the machine, so the
checker can compare these times with its own.

The agent also answers ``Hello Responder!`` like rusticai-testing's ResponderProbeAgent,
so `support.fleet.answers` works with it.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from urllib.parse import quote

from rustic_ai.core.guild import agent
from rustic_ai.core.guild.agent import Agent, ProcessContext
from rustic_ai.core.messaging.core import JsonDict

LEDGER_DIR_ENV = "RUSTIC_TEST_LEDGER_DIR"
LOG_DIR_ENV = "RUSTIC_K8S_TEST_LOG_DIR"  # see support/hosts.py: keep each agent process's log there too
SEQ_FIELD = "ledger_seq"

log = logging.getLogger(__name__)


def ledger_path(directory: str | Path, guild_id: str, agent_id: str) -> Path:
    return Path(directory) / f"{quote(guild_id, safe='')}__{quote(agent_id, safe='')}.ledger"


def proc_starttime(pid: int | str = "self") -> int:
    """Field 22 of /proc/PID/stat: when the process started, in clock ticks since boot.

    With the pid it names one process for good (pids are reused, this pair is not).
    The command name (field 2) may contain spaces and parentheses, so split after its last ')'.
    """
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat.rsplit(")", 1)[1].split()[19])


class Ledger:
    """One agent process's ledger file; agents build it in their own ``__init__``."""

    def __init__(self, guild_id: str, agent_id: str) -> None:
        directory = os.environ.get(LEDGER_DIR_ENV)
        if not directory:
            raise RuntimeError(f"{LEDGER_DIR_ENV} is not set for this host; a ledger agent has nowhere to write")
        self._fd = os.open(ledger_path(directory, guild_id, agent_id), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self._pid = os.getpid()
        self._write(f"start {self._pid} {proc_starttime()} {time.monotonic():.6f}")
        _keep_log(agent_id)

    def _write(self, line: str) -> None:
        os.write(self._fd, (line + "\n").encode())

    def handle(self, ctx: ProcessContext) -> None:
        payload = ctx.payload
        seq = payload.get(SEQ_FIELD)
        if isinstance(seq, int):
            # The message id last: the checker reads the first three fields; the id is for a person
            # matching a ledger against saved positions (eo:pos:*).
            self._write(f"handled {seq} {self._pid} {time.monotonic():.6f} {ctx.message.id}")
        elif payload.get("content") == "Hello Responder!":
            ctx.send_dict({"content": f"Acknowledged: {ctx.message.id}"})


class _Monotonic(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.mono = time.monotonic()  # the checker's and the soak's clock
        return True


def _keep_log(agent_id: str) -> None:
    """With RUSTIC_K8S_TEST_LOG_DIR set, this process's log lines also go to a file of its own
    (the host keeps only the last lines of an agent's output, in memory)."""
    directory = os.environ.get(LOG_DIR_ENV)
    if not directory:
        return
    handler = logging.FileHandler(Path(directory) / f"agent-{quote(agent_id, safe='')}-{os.getpid()}.log")
    handler.addFilter(_Monotonic())
    handler.setFormatter(logging.Formatter("%(asctime)s mono=%(mono).3f %(levelname)s %(threadName)s %(name)s: "
                                           "%(message)s"))
    logging.getLogger().addHandler(handler)


# A subclass that inherits this __init__ was built without running it (rusticai-core's agent
# machinery calls the argument-less __init__ a class defines itself), so it never opened its
# ledger: other ledger agents define these few lines themselves instead of subclassing.
class LedgerAgent(Agent):
    def __init__(self):
        self._ledger = Ledger(self.guild_id, self.id)

    @agent.processor(JsonDict, lambda me, message: message.topics == "default_topic")
    def on_default_topic(self, ctx: ProcessContext) -> None:
        self._ledger.handle(ctx)


HANDLE_SECONDS = 0.2


class SlowHandlerLedgerAgent(Agent):
    """A LedgerAgent that spends HANDLE_SECONDS on each message after recording it, as an agent
    calling a model or writing elsewhere does: a stop nearly always finds a message in hand, and
    one cut off there is handled again by the agent's next copy."""

    def __init__(self):
        self._ledger = Ledger(self.guild_id, self.id)

    @agent.processor(JsonDict, lambda me, message: message.topics == "default_topic")
    def on_default_topic(self, ctx: ProcessContext) -> None:
        self._ledger.handle(ctx)
        if isinstance(ctx.payload.get(SEQ_FIELD), int):
            time.sleep(HANDLE_SECONDS)  # the rest of the handler's work
