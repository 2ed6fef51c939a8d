"""Which agent a log line is about: guild_id, agent_id, host and pid on every record.

The host binds an agent's fields in a context variable while it works on that agent
(``agent_log_fields``). asyncio copies the context into every task created meanwhile, so
the process manager's tasks for that agent (output pump, exit watcher, restart timer)
log with the same fields without being told; the dict is shared, so a pid learnt after
the launch shows up in their later lines too. ``AgentFieldsFilter``, installed on the
entry point's log handler, copies the fields onto each record, where the JSON formatter
(``cli/logs.py``) writes them as keys. Lines about no agent carry only ``host``.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
from collections.abc import Iterator
from typing import Any

FIELDS = ("guild_id", "agent_id", "host", "pid")

_agent: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar("rk8s_agent_log_fields", default=None)
_process_fields: dict[str, Any] = {}


def set_host_field(host: str) -> None:
    """The host's address, on every line this process logs (one host per process)."""
    _process_fields["host"] = host


@contextlib.contextmanager
def agent_log_fields(guild_id: str, agent_id: str, pid: int | None = None) -> Iterator[dict[str, Any]]:
    """Binds an agent's fields for the code (and the tasks it starts) inside the block.

    Yields the bound dict: set ``["pid"]`` once the process exists (or call ``note_pid``).
    Inside a block already bound to the same agent (the gRPC handler's, then the host's)
    the outer dict is reused, so a pid learnt deep down shows in the outer lines too.
    """
    current = _agent.get()
    if current is not None and (current.get("guild_id"), current.get("agent_id")) == (guild_id, agent_id):
        if pid:
            current["pid"] = pid
        yield current
        return
    fields: dict[str, Any] = {"guild_id": guild_id, "agent_id": agent_id}
    if pid:
        fields["pid"] = pid
    token = _agent.set(fields)
    try:
        yield fields
    finally:
        _agent.reset(token)


def note_pid(pid: int) -> None:
    """The bound agent's process now exists: its pid goes on every later line about it."""
    current = _agent.get()
    if current is not None:
        current["pid"] = pid


def current_fields() -> dict[str, Any]:
    out = dict(_process_fields)
    out.update(_agent.get() or {})
    return out


class AgentFieldsFilter(logging.Filter):
    """Adds the bound fields to records that do not carry them already (``extra=`` wins)."""

    def filter(self, record: logging.LogRecord) -> bool:
        for key, value in current_fields().items():
            if not hasattr(record, key):
                setattr(record, key, value)
        return True
