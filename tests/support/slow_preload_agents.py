"""An agent module whose import takes 1.5 s (support.slow_import_agents takes 6 s): too slow for a fork server to preload.

The fork server forks every agent of its host; importing a module like this one in the
server would hold every launch up meanwhile (forkserver.py, SLOW_IMPORT_S).
"""

import time

from rustic_ai.core.guild.agent import Agent

IMPORT_S = 1.5

time.sleep(IMPORT_S)


class SlowImportAgent(Agent):
    pass
