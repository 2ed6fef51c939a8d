"""Logging set-up for entry points: readable text for terminals, JSON lines for clusters."""

from __future__ import annotations

import json
import logging
import time

from ..base.logfields import AgentFieldsFilter


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg, and guild_id/agent_id/host/pid when known."""

    _FIELDS = ("guild_id", "agent_id", "host", "pid")

    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for field in self._FIELDS:
            if hasattr(record, field):
                out[field] = getattr(record, field)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out)


def configure_logging(level: str = "INFO", fmt: str = "text") -> None:
    handler = logging.StreamHandler()
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    # Which agent (and host) a line is about, from the host's context (base/logfields.py).
    handler.addFilter(AgentFieldsFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
