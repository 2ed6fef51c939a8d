"""Agents as OS processes: the only package that starts, signals and reaps subprocesses.

``AgentProcessManager`` (manager.py) starts agent processes and hands each one's
``AgentProcess`` handle to its single owner (the host's supervisor); a ``Launcher``
(launcher.py: cold, a fresh interpreter per agent; warm.py: forked from a pre-imported
fork server, forkserver.py) starts them; ``child.py`` is what runs inside each agent
process; ``fence.py`` is the agent's side of the host lease (it stops itself when the
deadline passes); ``control.py`` is the wire format between the two sides;
``output.py`` keeps the last lines each agent printed.
"""

from .launcher import LAUNCH_MODES, ColdLauncher, Launcher, SpawnedProcess, make_launcher
from .manager import AgentProcess, AgentProcessManager
from .output import OutputBuffer
from .warm import ForkServerLauncher

__all__ = [
    "LAUNCH_MODES",
    "AgentProcess",
    "AgentProcessManager",
    "ColdLauncher",
    "ForkServerLauncher",
    "Launcher",
    "OutputBuffer",
    "SpawnedProcess",
    "make_launcher",
]
