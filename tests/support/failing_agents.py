"""Agents that misbehave on purpose, imported by agent processes during tests."""

from rustic_ai.core.guild.agent import Agent


class FailsOnInit(Agent):
    def __init__(self):
        raise RuntimeError("boom from __init__")
