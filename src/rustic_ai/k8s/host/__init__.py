"""The agent host: a grpc.aio server that runs each agent as its own OS process."""

from .host import AgentHost

__all__ = ["AgentHost"]
