"""A module whose import is the event under test: importing it writes a marker file.

The file is named by RK8S_TEST_IMPORT_MARKER (inherited by hosts and agent processes);
tests assert it does not exist after a request naming this module was refused, which
shows the module's top-level code never ran anywhere.
"""

import os
from pathlib import Path

from rustic_ai.core.guild.agent import Agent
from rustic_ai.core.messaging import SimpleClient

_marker = os.environ.get("RK8S_TEST_IMPORT_MARKER")
if _marker:
    with Path(_marker).open("a") as f:
        f.write(f"support.marker_module imported by pid {os.getpid()}\n")


class MarkerAgent(Agent):
    pass


class MarkerClient(SimpleClient):
    pass


class MarkerResolver:
    pass
