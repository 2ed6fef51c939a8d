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
    (e.AgentNotFoundError, grpc.StatusCode.NOT_FOUND),
    (e.AgentAlreadyExistsError, grpc.StatusCode.ALREADY_EXISTS),
    (e.HostFullError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (e.HostUnavailableError, grpc.StatusCode.UNAVAILABLE),
    (e.RegistryUnavailableError, grpc.StatusCode.UNAVAILABLE),
    (e.LaunchTimeoutError, grpc.StatusCode.DEADLINE_EXCEEDED),
    (e.AgentLaunchError, grpc.StatusCode.FAILED_PRECONDITION),
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


def code_for(exc: Exception) -> grpc.StatusCode:
    for cls, code in ERROR_TO_CODE:
        if isinstance(exc, cls):
            return code
    return grpc.StatusCode.INTERNAL
