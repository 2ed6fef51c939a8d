"""An agent module whose import takes 6 s: what a heavy ML library's import does to whoever imports it.

A host that imports agent modules itself (to validate a spec, or to preload it) has its
event loop blocked for that long: no lease renewal, no gRPC answers. Its agent keeps a ledger like
support.ledger_agents.LedgerAgent, so the checker sees when (and how often) it finally runs.
"""

import time

from rustic_ai.core.guild import agent
from rustic_ai.core.guild.agent import Agent, ProcessContext
from rustic_ai.core.messaging.core import JsonDict

from .ledger_agents import Ledger

IMPORT_SECONDS = 6.0

time.sleep(IMPORT_SECONDS)


class SlowImportLedgerAgent(Agent):
    """A LedgerAgent in all but its module (see support.ledger_agents on why not a subclass)."""

    def __init__(self):
        self._ledger = Ledger(self.guild_id, self.id)

    @agent.processor(JsonDict, lambda me, message: message.topics == "default_topic")
    def on_default_topic(self, ctx: ProcessContext) -> None:
        self._ledger.handle(ctx)
