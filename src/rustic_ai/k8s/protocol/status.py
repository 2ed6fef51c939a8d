"""The one mapping between our error classes and gRPC status codes, used on both sides.

A host raises our errors and the server adapter turns them into status codes; the
client turns status codes back into the same classes. Order matters: subclasses first.
"""

from __future__ import annotations

import grpc

from ..base import errors as e

ERROR_TO_CODE: list[tuple[type[Exception], grpc.StatusCode]] = [
    (e.InvalidSpecError, grpc.StatusCode.INVALID_ARGUMENT),
    (e.ForbiddenModuleError, grpc.StatusCode.PERMISSION_DENIED),
    (e.NotAuthorizedError, grpc.StatusCode.PERMISSION_DENIED),  # told apart by ERROR_CLASS_KEY
    (e.AgentNotFoundError, grpc.StatusCode.NOT_FOUND),
    (e.AgentAlreadyExistsError, grpc.StatusCode.ALREADY_EXISTS),
    (e.InsufficientResourcesError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (e.HostFullError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (e.HostUnavailableError, grpc.StatusCode.UNAVAILABLE),
    (e.RegistryUnavailableError, grpc.StatusCode.UNAVAILABLE),
    (e.LaunchTimeoutError, grpc.StatusCode.DEADLINE_EXCEEDED),
    (e.AgentLaunchError, grpc.StatusCode.FAILED_PRECONDITION),
    # Not RESOURCE_EXHAUSTED: engines take that for "full, try another host", and every
    # host would refuse. The exact class travels in ERROR_CLASS_KEY (see below).
    (e.GuildLimitError, grpc.StatusCode.FAILED_PRECONDITION),
]

CODE_TO_ERROR: dict[grpc.StatusCode, type[e.RusticK8sError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: e.InvalidSpecError,
    grpc.StatusCode.PERMISSION_DENIED: e.ForbiddenModuleError,
    grpc.StatusCode.NOT_FOUND: e.AgentNotFoundError,
    grpc.StatusCode.ALREADY_EXISTS: e.AgentAlreadyExistsError,
    # gRPC itself answers RESOURCE_EXHAUSTED for a request over the message size limit;
    # the client tells the two apart by the message (see client.py).
    grpc.StatusCode.RESOURCE_EXHAUSTED: e.HostFullError,
    grpc.StatusCode.UNAVAILABLE: e.HostUnavailableError,
    grpc.StatusCode.DEADLINE_EXCEEDED: e.LaunchTimeoutError,
    grpc.StatusCode.FAILED_PRECONDITION: e.AgentLaunchError,
    grpc.StatusCode.CANCELLED: e.HostUnavailableError,
}


# Trailing metadata naming the exact error class, so a client can raise it when one status
# code stands for several classes (FAILED_PRECONDITION: launch failed, or guild limit).
ERROR_CLASS_KEY = "rk8s-error-class"
ERRORS_BY_NAME: dict[str, type[e.RusticK8sError]] = {
    cls.__name__: cls for cls, _ in ERROR_TO_CODE if issubclass(cls, e.RusticK8sError)
}


def error_class_for(code: grpc.StatusCode, metadata: object) -> type[e.RusticK8sError] | None:
    """The class a host named in its trailing metadata, if it agrees with ``code``; else by code."""
    for key, value in metadata or ():  # type: ignore[attr-defined]
        if key == ERROR_CLASS_KEY:
            cls = ERRORS_BY_NAME.get(value if isinstance(value, str) else "")
            if cls is not None and code_for(cls("")) == code:
                return cls
    return CODE_TO_ERROR.get(code)


def code_for(exc: Exception) -> grpc.StatusCode:
    for cls, code in ERROR_TO_CODE:
        if isinstance(exc, cls):
            return code
    return grpc.StatusCode.INTERNAL
