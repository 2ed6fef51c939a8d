"""Secure by default: what `kubectl kustomize` renders from docker/k8s and its overlays.

mTLS required (TLS files from the Secrets, plain text refused, probes on the plain
health port), the authorization policy mounted, NetworkPolicies that select the pods
the Deployment and StatefulSet actually create, Redis behind a password from a Secret;
and `rustic-k8s certs`, which makes those Secrets, checked from its files. Offline: no
cluster (the integration test tests/integration/test_secure_deploy.py starts a real host
and Redis from these manifests).
"""

from __future__ import annotations

import json
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import pytest
import redis as redis_py
import yaml
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from rustic_ai.k8s import HostSettings
from rustic_ai.k8s.cli import certs
from rustic_ai.k8s.cli.main import main as cli_main
from support.manifests import K8S, OVERLAYS, ROOT, Mounts, container, env_of, find, kustomize, pod_spec

K8S_VERSION = "1.37.0"
HOST = ("Deployment", "rustic-agent-host")
REDIS = ("StatefulSet", "redis")
ENGINE_POD_LABELS = {"app.kubernetes.io/component": "engine"}  # what docs/deploy.md tells engines to carry


def run_certs(*args: str) -> subprocess.CompletedProcess:
    """The real command line, `python -m rustic_ai.k8s.cli.main certs ...`."""
    return subprocess.run([sys.executable, "-m", "rustic_ai.k8s.cli.main", "certs", *args],
                          capture_output=True, text=True, timeout=60, check=False)


def certs_main(capsys, *args: str) -> tuple[int, str]:
    """The same CLI in this process (no interpreter start per call): exit code and stderr."""
    code = cli_main(["certs", *args])
    return code, capsys.readouterr().err


@pytest.fixture(scope="module")
def base() -> list[dict]:
    return kustomize(K8S)


@pytest.fixture(scope="module")
def issued(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("certs") / "secrets"
    run = run_certs("--out", str(out))
    assert run.returncode == 0, run.stderr
    return out


def load_cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def selects(selector: dict, labels: dict) -> bool:
    assert set(selector) <= {"matchLabels"}, f"selector forms this test does not evaluate: {selector}"
    return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())


def pod_labels(docs: list[dict], kind: str, name: str) -> dict:
    return find(docs, kind, name)["spec"]["template"]["metadata"]["labels"]


def secret_refs(docs: list[dict]) -> set[str]:
    """Every Secret a rendered pod needs: secret volumes and secretKeyRefs."""
    names = set()
    for doc in docs:
        if doc["kind"] not in ("Deployment", "StatefulSet"):
            continue
        spec = doc["spec"]["template"]["spec"]
        names |= {v["secret"]["secretName"] for v in spec.get("volumes", []) if "secret" in v}
        for c in spec["containers"]:
            names |= {e["valueFrom"]["secretKeyRef"]["name"] for e in c.get("env", [])
                      if "secretKeyRef" in e.get("valueFrom", {})}
    return names


def validate_builtin(docs: list[dict]) -> None:
    """kubernetes-validate, strict, for every kind the Kubernetes schemas know (not cert-manager's CRDs)."""
    for doc in docs:
        if doc["apiVersion"].startswith("cert-manager.io/"):
            continue
        try:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{doc['kind']}/{doc['metadata']['name']}: {str(exc).splitlines()[0]}")


# -- mutual TLS on the hosts ---------------------------------------------------------------


def test_hosts_require_mutual_tls_with_files_from_the_host_secret(base, issued, tmp_path):
    c, pod = container(base, *HOST), pod_spec(base, *HOST)
    env = env_of(c)
    assert env["RUSTIC_AGENT_HOST_ALLOW_PLAINTEXT"]["value"] == "false"
    # Each TLS setting names a file the kubelet mounts from rustic-agent-host-tls.
    mounts = Mounts(tmp_path).add_secrets(issued / "secrets.yaml").add_config_maps(base)
    resolved = mounts.env(pod, c)
    for var, key in [("RUSTIC_AGENT_HOST_TLS_CERT_FILE", "tls.crt"), ("RUSTIC_AGENT_HOST_TLS_KEY_FILE", "tls.key"),
                     ("RUSTIC_AGENT_HOST_TLS_CLIENT_CA_FILE", "ca.crt")]:
        assert resolved[var] == str(tmp_path / certs.HOST_SECRET / key), var
    settings = HostSettings.from_env(resolved)
    assert settings.tls and not settings.allow_plaintext
    # Without the files, the same environment is refused at start-up: no silent plain text.
    bare = {k: v for k, v in resolved.items() if not k.startswith("RUSTIC_AGENT_HOST_TLS_")}
    with pytest.raises(Exception, match="plain text is not allowed"):
        HostSettings.from_env(bare)


def test_probes_use_the_plain_health_port_and_only_engines_port_is_tls(base):
    c = container(base, *HOST)
    env = env_of(c)
    health_port = int(env["RUSTIC_AGENT_HOST_HEALTH_LISTEN"]["value"].rpartition(":")[2])
    serving_port = int(env["RUSTIC_AGENT_HOST_LISTEN"]["value"].rpartition(":")[2])
    assert health_port != serving_port
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["grpc"] == {"port": health_port}, probe
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports["health"] == health_port and ports["grpc"] == serving_port


def test_agents_in_host_pods_dial_other_hosts_with_the_host_identity(base, issued):
    """Engines built by agents (a guild manager's) read RUSTIC_K8S_TLS_*: the host's own pair."""
    env = {k: e.get("value") for k, e in env_of(container(base, *HOST)).items()}
    assert env["RUSTIC_K8S_TLS_CERT_FILE"] == env["RUSTIC_AGENT_HOST_TLS_CERT_FILE"]
    assert env["RUSTIC_K8S_TLS_KEY_FILE"] == env["RUSTIC_AGENT_HOST_TLS_KEY_FILE"]
    assert env["RUSTIC_K8S_TLS_CA_FILE"] == env["RUSTIC_AGENT_HOST_TLS_CLIENT_CA_FILE"]
    # The name they check is in the host certificate `rustic-k8s certs` issues, which is also a client one.
    host = load_cert(issued / certs.HOST_SECRET / "tls.crt")
    sans = host.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName)
    assert env["RUSTIC_K8S_TLS_SERVER_NAME"] in sans
    usages = set(host.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)
    assert usages == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}


# -- authorization policy ------------------------------------------------------------------


def test_the_default_policy_is_mounted_and_lets_the_engine_and_host_identities_launch(base, issued, tmp_path):
    c, pod = container(base, *HOST), pod_spec(base, *HOST)
    mounts = Mounts(tmp_path).add_secrets(issued / "secrets.yaml").add_config_maps(base)
    policy_file = Path(mounts.env(pod, c)["RUSTIC_AGENT_HOST_AUTHZ_POLICY_FILE"])
    assert policy_file == tmp_path / "rustic-agent-host-authz" / "policy.json"
    policy = json.loads(policy_file.read_text())
    for rule in policy["rules"]:
        assert set(rule) == {"identities", "allow", "guilds", "modules"}
        assert set(rule["allow"]) <= {"read", "launch", "stop"}
    cns = {load_cert(issued / s / "tls.crt").subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
           for s in (certs.HOST_SECRET, f"{certs.DEFAULT_ENGINE}-tls")}
    for cn in cns:
        [rule] = [r for r in policy["rules"] if cn in r["identities"]]
        assert set(rule["allow"]) == {"read", "launch", "stop"} and rule["guilds"] == ["*"]
        # Launches are held to the same prefixes as the host's module allow-list.
        allowed = env_of(c)["RUSTIC_AGENT_HOST_ALLOWED_MODULES"]["value"].split(",")
        assert rule["modules"] == allowed


# -- NetworkPolicy ---------------------------------------------------------------------------


def ingress_peers(policy: dict, port_name: str) -> list[dict]:
    return [peer for rule in policy["spec"]["ingress"] if any(p["port"] == port_name for p in rule["ports"])
            for peer in rule["from"]]


def admits(peers: list[dict], labels: dict, *, same_namespace: bool = True, namespace_labels: dict | None = None):
    for peer in peers:
        if "namespaceSelector" in peer:
            if selects(peer["namespaceSelector"], namespace_labels or {}) and selects(
                    peer.get("podSelector", {}), labels):
                return True
        elif same_namespace and selects(peer["podSelector"], labels):
            return True
    return False


def test_the_host_policy_selects_the_host_pods_and_admits_only_engines_and_hosts_to_grpc(base):
    policy = find(base, "NetworkPolicy", "rustic-agent-host")
    host_labels = pod_labels(base, *HOST)
    assert selects(policy["spec"]["podSelector"], host_labels)
    assert not selects(policy["spec"]["podSelector"], pod_labels(base, *REDIS))
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    # Named ports: the ones the host container declares, so the numbers cannot drift apart.
    ports = {p["name"]: p["containerPort"] for p in container(base, *HOST)["ports"]}
    named = {p["port"] for rule in policy["spec"]["ingress"] for p in rule["ports"]}
    assert named == {"grpc", "metrics"} and named <= set(ports)
    grpc_peers = ingress_peers(policy, "grpc")
    assert admits(grpc_peers, ENGINE_POD_LABELS) and admits(grpc_peers, host_labels)
    assert not admits(grpc_peers, {"app": "something-else"})
    assert not admits(grpc_peers, ENGINE_POD_LABELS, same_namespace=False)  # another namespace's "engine"
    assert not admits(grpc_peers, pod_labels(base, *REDIS))


def test_metrics_are_reachable_only_from_the_monitoring_namespace(base):
    policy = find(base, "NetworkPolicy", "rustic-agent-host")
    peers = ingress_peers(policy, "metrics")
    monitoring = {"kubernetes.io/metadata.name": "monitoring"}
    assert admits(peers, {"app": "prometheus"}, same_namespace=False, namespace_labels=monitoring)
    assert not admits(peers, ENGINE_POD_LABELS)  # not even engines in the namespace
    assert not admits(peers, {"app": "prometheus"}, same_namespace=False,
                      namespace_labels={"kubernetes.io/metadata.name": "default"})
    # Prometheus' scrape annotation names the port the policy opens.
    annotations = find(base, *HOST)["spec"]["template"]["metadata"]["annotations"]
    ports = {p["name"]: p["containerPort"] for p in container(base, *HOST)["ports"]}
    assert int(annotations["prometheus.io/port"]) == ports["metrics"]


def test_the_redis_policy_selects_redis_and_admits_only_hosts_and_engines(base):
    policy = find(base, "NetworkPolicy", "redis")
    assert selects(policy["spec"]["podSelector"], pod_labels(base, *REDIS))
    assert not selects(policy["spec"]["podSelector"], pod_labels(base, *HOST))
    [port] = {p["containerPort"]: p["name"] for p in container(base, *REDIS)["ports"]}.values()
    peers = ingress_peers(policy, port)
    assert admits(peers, pod_labels(base, *HOST)) and admits(peers, ENGINE_POD_LABELS)
    assert not admits(peers, {"app": "something-else"}) and not admits(peers, pod_labels(base, *REDIS))


# -- Redis AUTH ----------------------------------------------------------------------------


def test_redis_loads_its_users_from_the_secret_and_clients_read_the_same_secret(base, issued, tmp_path):
    c, pod = container(base, *REDIS), pod_spec(base, *REDIS)
    args = c["args"]
    assert "--requirepass" not in args and "--protected-mode" not in args  # no password on a command line
    mounts = Mounts(tmp_path).add_secrets(issued / "secrets.yaml")
    acl_file = Path(mounts.args(pod, c)[args.index("--aclfile") + 1])
    assert acl_file == tmp_path / certs.REDIS_SECRET / "users.acl"
    password = (tmp_path / certs.REDIS_SECRET / "password").read_text()
    assert acl_file.read_text() == certs.redis_acl(password) and password not in acl_file.read_text()
    # The probes authenticate (REDISCLI_AUTH) and need a PONG, not just redis-cli's exit code 0.
    assert mounts.env(pod, c)["REDISCLI_AUTH"] == password
    for probe in ("readinessProbe", "livenessProbe"):
        assert c[probe]["exec"]["command"] == ["sh", "-c", "redis-cli ping | grep -q PONG"]
    # Hosts send the password from the same Secret key; the URL carries none.
    host_env = env_of(container(base, *HOST))
    assert host_env["RUSTIC_K8S_REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"] == {
        "name": certs.REDIS_SECRET, "key": "password"}
    assert host_env["RUSTIC_K8S_REDIS_URL"]["value"] == "redis://redis:6379/0"


def test_the_registry_scripts_need_no_command_the_acl_refuses(redis_server):
    """users.acl turns @dangerous off; the registry's Lua scripts must not need any of it
    (a script calling KEYS or SORT would fail against the shipped Redis, and only there)."""
    client = redis_py.Redis(port=redis_server.port, decode_responses=True)
    try:
        dangerous = {c.split("|")[0].upper() for c in client.acl_cat("dangerous")}
    finally:
        client.close()
    assert {"FLUSHALL", "KEYS", "CONFIG", "SHUTDOWN"} <= dangerous  # the control: the category is what we think
    called = set()
    for path in (ROOT / "src" / "rustic_ai" / "k8s").rglob("*.py"):
        called |= {m.upper() for m in re.findall(r"redis\.p?call\(\s*['\"](\w+)", path.read_text())}
    assert {"HSET", "PEXPIRE"} <= called  # the scripts were found
    assert not called & dangerous, called & dangerous


# -- the certificates and Secrets --------------------------------------------------------------


def test_certs_writes_the_secrets_every_pod_needs_as_valid_manifests_and_files(base, issued):
    docs = [d for d in yaml.safe_load_all((issued / "secrets.yaml").read_text()) if d]
    validate_builtin(docs)
    names = {d["metadata"]["name"] for d in docs}
    assert secret_refs(base) <= names
    assert names == {certs.HOST_SECRET, f"{certs.DEFAULT_ENGINE}-tls", certs.REDIS_SECRET}
    for d in docs:
        assert d["metadata"]["namespace"] == "rustic-ai"
        assert d["type"] == ("Opaque" if d["metadata"]["name"] == certs.REDIS_SECRET else "kubernetes.io/tls")
    # Private material is readable by its owner only; the CA's key is not in any Secret.
    for path in [issued / "secrets.yaml", issued / "ca" / "ca.key", *issued.glob("*/tls.key"),
                 *(issued / certs.REDIS_SECRET).iterdir()]:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    ca_key = (issued / "ca" / "ca.key").read_bytes()
    assert all(ca_key.strip() not in Path(p).read_bytes() for p in issued.glob("*-tls/*"))


def test_the_engine_certificate_is_a_client_certificate_under_the_fleet_ca(issued):
    ca = load_cert(issued / "ca" / "ca.crt")
    engine = load_cert(issued / f"{certs.DEFAULT_ENGINE}-tls" / "tls.crt")
    engine.verify_directly_issued_by(ca)
    load_cert(issued / certs.HOST_SECRET / "tls.crt").verify_directly_issued_by(ca)
    assert engine.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == certs.DEFAULT_ENGINE
    assert list(engine.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [
        ExtendedKeyUsageOID.CLIENT_AUTH]
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    for secret in (certs.HOST_SECRET, f"{certs.DEFAULT_ENGINE}-tls"):
        assert (issued / secret / "ca.crt").read_bytes() == (issued / "ca" / "ca.crt").read_bytes()


def test_running_certs_again_rotates_the_leaves_under_the_same_ca_and_keeps_the_password(tmp_path, capsys):
    out = tmp_path / "s"
    assert certs_main(capsys, "--out", str(out), "--engine", "reporting")[0] == 0
    first = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    code, err = certs_main(capsys, "--out", str(out), "--engine", "reporting")
    assert code == 0, err
    assert (out / "ca" / "ca.crt").read_bytes() == first[out / "ca" / "ca.crt"]
    assert (out / certs.REDIS_SECRET / "password").read_bytes() == first[out / certs.REDIS_SECRET / "password"]
    renewed = load_cert(out / "reporting-tls" / "tls.crt")
    before = x509.load_pem_x509_certificate(first[out / "reporting-tls" / "tls.crt"])
    assert renewed.serial_number != before.serial_number
    renewed.verify_directly_issued_by(load_cert(out / "ca" / "ca.crt"))
    assert certs_main(capsys, "--out", str(out), "--engine", "reporting", "--new-redis-password")[0] == 0
    assert (out / certs.REDIS_SECRET / "password").read_bytes() != first[out / certs.REDIS_SECRET / "password"]


@pytest.mark.parametrize("args, message", [
    (["--engine", "Not_A_Name"], "--engine 'Not_A_Name' is not a DNS-1123 label"),
    (["--namespace", "rustic.ai"], "--namespace 'rustic.ai' is not a DNS-1123 label"),
    (["--days", "0"], "--days must be at least 1"),
    (["--host-dns", "hosts..example"], "--host-dns 'hosts..example' is not a DNS name"),
])
def test_certs_refuses_bad_input_with_a_clear_error(tmp_path, capsys, args, message):
    code, err = certs_main(capsys, "--out", str(tmp_path / "s"), *args)
    assert code == 2 and message in err, err
    assert not (tmp_path / "s").exists()


def test_certs_refuses_a_ca_whose_key_does_not_match(tmp_path, capsys, issued):
    a = tmp_path / "a"
    assert certs_main(capsys, "--out", str(a))[0] == 0
    shutil.copy(issued / "ca" / "ca.key", a / "ca" / "ca.key")  # another run's CA key
    before = (a / certs.HOST_SECRET / "tls.crt").read_bytes()
    code, err = certs_main(capsys, "--out", str(a))
    assert code == 2 and "ca.key is not the key of" in err, err
    assert (a / certs.HOST_SECRET / "tls.crt").read_bytes() == before  # nothing was rewritten


PEM_KEY = re.compile(rb"-----BEGIN [A-Z ]*PRIVATE KEY-----\s+[A-Za-z0-9+/=]{40,}")


def test_no_private_key_is_committed_and_the_secrets_directory_is_ignored():
    git = shutil.which("git")
    assert git
    tracked = subprocess.run([git, "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    for name in filter(None, tracked.decode().split("\0")):
        path = ROOT / name
        if path.is_file() and path.stat().st_size < 1_000_000:
            assert not PEM_KEY.search(path.read_bytes()), f"{name} holds a private key"
    ignored = subprocess.run([git, "check-ignore", "-q", "docker/secrets/secrets.yaml"], cwd=ROOT, check=False)
    assert ignored.returncode == 0, "docker/secrets/ (rustic-k8s certs' output) must be gitignored"


# -- overlays ------------------------------------------------------------------------------


def test_base_and_overlays_render_to_valid_resources(base, issued, tmp_path):
    validate_builtin(base)
    # local-certs reads docker/secrets: render it in a copy of docker/ with freshly issued Secrets.
    copy = tmp_path / "docker"
    shutil.copytree(K8S, copy / "k8s")
    shutil.copytree(OVERLAYS, copy / "overlays")
    shutil.copytree(issued, copy / "secrets")
    local = kustomize(copy / "overlays" / "local-certs")
    validate_builtin(local)
    assert {d["metadata"]["name"] for d in local if d["kind"] == "Secret"} >= secret_refs(local)
    assert all(d["metadata"].get("namespace") == "rustic-ai" for d in local if d["kind"] != "Namespace")
    for overlay in ("plaintext", "cert-manager"):
        validate_builtin(kustomize(OVERLAYS / overlay))


def test_cert_manager_issues_the_secrets_the_pods_mount(base):
    docs = kustomize(OVERLAYS / "cert-manager")
    issued = {d["spec"]["secretName"]: d for d in docs if d["kind"] == "Certificate"}
    assert secret_refs(docs) - {certs.REDIS_SECRET} <= set(issued)  # cert-manager makes no passwords
    host, engine = issued[certs.HOST_SECRET], issued[f"{certs.DEFAULT_ENGINE}-tls"]
    env = {k: e.get("value") for k, e in env_of(container(docs, *HOST)).items()}
    assert env["RUSTIC_K8S_TLS_SERVER_NAME"] in host["spec"]["dnsNames"]
    assert {"server auth", "client auth"} <= set(host["spec"]["usages"])
    assert "server auth" not in engine["spec"]["usages"] and "client auth" in engine["spec"]["usages"]
    # Both identities are the ones the shipped policy names, and the CA issuer signs both.
    policy = json.loads(find(docs, "ConfigMap", "rustic-agent-host-authz")["data"]["policy.json"])
    identities = {i for r in policy["rules"] for i in r["identities"]}
    assert {host["spec"]["commonName"], engine["spec"]["commonName"]} <= identities
    issuers = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Issuer"}
    for cert in (host, engine):
        ca_issuer = issuers[cert["spec"]["issuerRef"]["name"]]
        ca_cert = next(d for d in docs if d["kind"] == "Certificate"
                       and d["spec"]["secretName"] == ca_issuer["spec"]["ca"]["secretName"])
        assert ca_cert["spec"]["isCA"] is True
    for d in docs:
        if d["apiVersion"].startswith("cert-manager.io/"):
            assert d["apiVersion"] == "cert-manager.io/v1" and d["metadata"]["namespace"] == "rustic-ai"


def test_plain_text_only_through_its_overlay(base):
    docs = kustomize(OVERLAYS / "plaintext")
    c, pod = container(docs, *HOST), pod_spec(docs, *HOST)
    env = {k: e.get("value") for k, e in env_of(c).items()}
    assert env["RUSTIC_AGENT_HOST_ALLOW_PLAINTEXT"] == "true"
    assert not [k for k in env if "_TLS_" in k or "AUTHZ" in k]
    assert {v["name"] for v in pod["volumes"]} == {"tmp"}
    settings = HostSettings.from_env({k: v for k, v in env.items() if v is not None})
    assert not settings.tls and settings.allow_plaintext
    # Everything else of the base stays: NetworkPolicies and Redis AUTH.
    assert {d["metadata"]["name"] for d in docs if d["kind"] == "NetworkPolicy"} == {"rustic-agent-host", "redis"}
    assert "RUSTIC_K8S_REDIS_PASSWORD" in env_of(c) and "--aclfile" in container(docs, *REDIS)["args"]
    # And the base itself never says plain text.
    assert env_of(container(base, *HOST))["RUSTIC_AGENT_HOST_ALLOW_PLAINTEXT"]["value"] == "false"
