"""Container health check: asks the agent host's grpc.health.v1 service whether it serves.

Used by the Dockerfile's HEALTHCHECK and compose.yaml (Kubernetes probes the same
service natively with `grpc:` probes). Exit 0 when the overall status ("" service) is
SERVING, 1 otherwise: NOT_SERVING while the host drains, or nothing listening.

Address: argv[1] if given, else 127.0.0.1 with the port of RUSTIC_AGENT_HOST_HEALTH_LISTEN
(the plain-text health port a host with mutual TLS serves), else of RUSTIC_AGENT_HOST_LISTEN
(default 50051). Timeout: RUSTIC_HEALTHCHECK_TIMEOUT_S (default 3).
"""

from __future__ import annotations

import os
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def target() -> str:
    if len(sys.argv) > 1:
        return sys.argv[1]
    listen = os.environ.get("RUSTIC_AGENT_HOST_HEALTH_LISTEN") or os.environ.get("RUSTIC_AGENT_HOST_LISTEN",
                                                                                 "0.0.0.0:50051")
    return f"127.0.0.1:{listen.rpartition(':')[2] or '50051'}"


def main() -> int:
    address = target()
    timeout = float(os.environ.get("RUSTIC_HEALTHCHECK_TIMEOUT_S", "3"))
    try:
        with grpc.insecure_channel(address) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""),
                                                              timeout=timeout)
    except grpc.RpcError as exc:
        print(f"unhealthy: {address}: {exc.code().name}", file=sys.stderr)  # type: ignore[attr-defined]
        return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    print(f"{address}: {status}")
    return 0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1


if __name__ == "__main__":
    sys.exit(main())
