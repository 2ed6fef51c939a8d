"""An agent module whose import takes 6 s: what a heavy ML library's import does to whoever imports it.

A host that imports agent modules itself (to validate a spec, or to preload it) has its
event loop blocked for that long: no lease renewal, no gRPC answers. Its subclass of
LedgerAgent lets the checker see when (and how many times) it finally runs.
"""

import time

from .ledger_agents import LedgerAgent

IMPORT_SECONDS = 6.0

time.sleep(IMPORT_SECONDS)


class SlowImportLedgerAgent(LedgerAgent):
    pass
