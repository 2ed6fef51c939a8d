"""An agent module that starts a thread when imported: never safe to preload in a fork server."""

import threading

from rustic_ai.core.guild.agent import Agent

_stop = threading.Event()
threading.Thread(target=_stop.wait, name="import-time-thread", daemon=True).start()


class ThreadedImportAgent(Agent):
    pass
