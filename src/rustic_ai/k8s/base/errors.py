"""One root error, split by what a caller should do next.

``PermanentError``: the same request will fail again (bad spec, unknown agent).
``TemporaryError``: the request may succeed later or on another host (host full,
draining, Redis briefly gone). The protocol adapter maps each class to one gRPC status
code and back, so a caller on either side of the wire sees the same types.
"""


class RusticK8sError(Exception):
    """Root of every error raised by rusticai-k8s."""


class PermanentError(RusticK8sError):
    """Retrying the same request will not help."""


class TemporaryError(RusticK8sError):
    """The request may succeed later, or on another host."""


class InvalidSpecError(PermanentError):
    """Malformed JSON, a spec that fails validation, or an agent class that cannot be used."""


class ForbiddenModuleError(PermanentError):
    """A request named a module outside the host's import allow-list."""


class NotAuthorizedError(PermanentError):
    """The caller's certificate identity may not do this here (the host's authorization policy, base/authz.py)."""


class AgentNotFoundError(PermanentError):
    """No such (guild_id, agent_id)."""


class AgentAlreadyExistsError(PermanentError):
    """The same (guild_id, agent_id) is already running."""


class AgentLaunchError(PermanentError):
    """The agent process started but failed before it reported ready (its error is attached)."""


class GuildLimitError(PermanentError):
    """The guild already has as many live agents as the host allows (RUSTIC_AGENT_HOST_MAX_AGENTS_PER_GUILD).

    Permanent, not "host full": the limit is fleet-wide, so another host would refuse too;
    it passes once some of the guild's agents are stopped.
    """


class HostFullError(TemporaryError):
    """The host is at capacity: place the agent elsewhere."""


class HostUnavailableError(TemporaryError):
    """The host is draining, shutting down or unreachable: place the agent elsewhere."""


class LaunchTimeoutError(TemporaryError):
    """The agent did not report ready before the launch deadline."""


class NoHostAvailableError(TemporaryError):
    """No live host with room accepted the agent."""


class InsufficientResourcesError(HostFullError, NoHostAvailableError):
    """The agent's resources (or its label selector) fit this host, or every host, no more.

    The message names what is short, e.g. "needs 1 GPU; largest free 0.5". A host answers it
    with RESOURCE_EXHAUSTED (the engine tries the next host); an engine raises it when no
    host fits, after waiting for capacity if asked to (RUSTIC_K8S_CAPACITY_WAIT_S).
    """


class RegistryUnavailableError(TemporaryError):
    """Redis could not be reached; the operation did not happen."""


class ConfigError(PermanentError):
    """A setting (flag or environment variable) is missing or invalid; the message names it."""
