# syntax=docker/dockerfile:1
# The agent host image: `rustic-agent-host` serving gRPC on port 50051.
#
# Stage "build" turns the source tree into wheels (the project's and every dependency's);
# the final stage installs them offline into a clean python:3.13-slim through a build
# mount, so the image carries no compiler, no source tree, no wheel files and no pip
# cache. Build: docker build -t rusticai-k8s:latest .
# EXTRAS adds the project's extras, e.g. --build-arg EXTRAS=api,postgres for the Rustic AI
# API server's image (compose.yaml's "api" profile; docs/rustic-ai.md).

FROM python:3.13-slim AS build
ARG EXTRAS=""
WORKDIR /src
# Only what the wheel is built from (.dockerignore keeps the context to these).
COPY pyproject.toml README.md ./
COPY src ./src
# What the final stage installs: the project with its extras, from these wheels only.
RUN pip wheel --no-cache-dir --wheel-dir /wheels ".${EXTRAS:+[$EXTRAS]}" \
    && echo "rusticai-k8s${EXTRAS:+[$EXTRAS]}" > /wheels/requirements.txt

FROM python:3.13-slim
LABEL org.opencontainers.image.title="rusticai-k8s agent host" \
      org.opencontainers.image.description="Runs Rustic AI agents as OS processes behind a gRPC API" \
      org.opencontainers.image.licenses="Apache-2.0"
# The project and its dependencies from the build stage's wheels (offline); then a
# numeric non-root user, so Kubernetes' runAsNonRoot can verify it.
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    pip install --no-cache-dir --no-index --find-links=/wheels --requirement /wheels/requirements.txt \
    && groupadd --system --gid 10001 rustic \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /tmp --shell /usr/sbin/nologin rustic
COPY docker/healthcheck.py docker/compose_demo.py /opt/rustic/
# Bytecode was compiled at install time; the root filesystem may be read-only at run
# time (Kubernetes readOnlyRootFilesystem), so nothing should try to write it. HOME is
# /tmp, the one writable place (an emptyDir in the Kubernetes manifests).
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp \
    RUSTIC_AGENT_HOST_LISTEN=0.0.0.0:50051 \
    RUSTIC_AGENT_HOST_LOG_FORMAT=json
USER 10001:10001
WORKDIR /tmp
EXPOSE 50051
# grpc.health.v1 over loopback: SERVING, or unhealthy (draining hosts report NOT_SERVING).
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "/opt/rustic/healthcheck.py"]
# SIGTERM (the default stop signal) makes the host drain: it refuses new agents, stops
# its agents (SIGTERM, grace, SIGKILL), deregisters, and exits 0.
ENTRYPOINT ["rustic-agent-host"]
