"""An agent that writes what it sees of its GPUs to a file of its own, for the placement tests.

``<RUSTIC_TEST_ENV_DIR>/<guild>__<agent>.json`` gets the process's pid and its
CUDA_VISIBLE_DEVICES / NVIDIA_VISIBLE_DEVICES (null when unset) as the agent process has them
while its agent is built, so a test reads them from outside, not from the host's word.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from urllib.parse import quote

from rustic_ai.core.guild.agent import Agent

ENV_DIR_ENV = "RUSTIC_TEST_ENV_DIR"


def env_path(directory: str | Path, guild_id: str, agent_id: str) -> Path:
    return Path(directory) / f"{quote(guild_id, safe='')}__{quote(agent_id, safe='')}.json"


class EnvReporter(Agent):
    def __init__(self):  # rusticai-core calls an argument-less __init__ a class defines (see ledger_agents)
        directory = os.environ.get(ENV_DIR_ENV)
        if directory:
            seen = {"pid": os.getpid(), **{k: os.environ.get(k) for k in ("CUDA_VISIBLE_DEVICES",
                                                                            "NVIDIA_VISIBLE_DEVICES")}}
            path = env_path(directory, self.guild_id, self.id)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(seen))
            tmp.replace(path)  # whole or not at all
