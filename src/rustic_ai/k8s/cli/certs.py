"""`rustic-k8s certs`: the fleet's secrets, made locally with nothing but this package.

    rustic-k8s certs --out docker/secrets [--namespace rustic-ai] [--engine NAME ...]

Writes into ``--out``, one directory per Kubernetes Secret, laid out the way the kubelet
mounts it (what the manifests point their settings at), plus ``secrets.yaml`` with the
same Secrets as manifests for ``kubectl apply -f`` and a ``kustomization.yaml`` listing
it (docker/overlays/local-certs adds ``docker/secrets`` to the base this way):

* ``ca/ca.crt``, ``ca/ca.key``: one CA for the fleet. It stays on your machine (it is
  not in ``secrets.yaml``); a later run finds it and issues new leaves under it, so
  re-running is a rotation that every running host and engine still trusts.
* ``rustic-agent-host-tls/``: ``tls.crt``, ``tls.key``, ``ca.crt`` (kubernetes.io/tls).
  CN ``rustic-agent-host``, DNS ``rustic-agent-host.<namespace>.svc`` (what engines check
  with RUSTIC_K8S_TLS_SERVER_NAME: hosts are dialled by pod IP), extended key usage
  serverAuth *and* clientAuth: agents in host pods (a guild manager's) dial other
  hosts with the host's identity.
* ``<engine>-tls/`` for each ``--engine`` (default ``rustic-engine``): a clientAuth-only
  certificate with that CN, the identity authorization policies name.
* ``rustic-redis-auth/``: ``password`` (what hosts and engines send) and ``users.acl``
  (what Redis loads: the default user, the password as its SHA-256, dangerous commands
  off). Kept across runs: a new password needs a Redis restart, so ask for one with
  ``--new-redis-password``.

Same Secret names and keys as the cert-manager overlay (docker/overlays/cert-manager).
Private keys and secrets.yaml are written mode 0600. Keys are ECDSA P-256.
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import datetime as dt
import hashlib
import json
import os
import re
import secrets
import sys
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

HOST_SECRET = "rustic-agent-host-tls"
HOST_CN = "rustic-agent-host"
HOST_SERVICE = "rustic-agent-host"
DEFAULT_ENGINE = "rustic-engine"
REDIS_SECRET = "rustic-redis-auth"
# The default user may do what the registry and the messaging backend do (any key: the
# messaging backend's keys are topic names, outside the registry's prefix), nothing in
# @dangerous (FLUSHALL, CONFIG, SHUTDOWN, DEBUG, KEYS, ...).
REDIS_ACL_RULES = "~* &* +@all -@dangerous"


KUSTOMIZATION = """# Written by `rustic-k8s certs`: the Secrets next to it (never commit this directory).
apiVersion: kustomize.config.k8s.io/v1beta1
kind: Kustomization
resources:
  - secrets.yaml
"""


class CertsError(Exception):
    """Input `rustic-k8s certs` cannot use (an existing CA that does not fit); nothing was written."""


@dataclasses.dataclass(frozen=True)
class Leaf:
    secret: str
    cert_pem: bytes
    key_pem: bytes


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "rusticai-k8s"),
                      x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def new_ca(days: int) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = _key()
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name("rusticai-k8s fleet CA")).issuer_name(_name("rusticai-k8s fleet CA"))
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                     crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def issue(ca: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey, cn: str, dns: list[str], *, server: bool,
          days: int) -> tuple[bytes, bytes]:
    """A leaf certificate (PEM chain: leaf then CA) and its key. ``server``: serverAuth as well as clientAuth."""
    key = _key()
    now = dt.datetime.now(dt.UTC)
    usages = [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH] if server \
        else [ExtendedKeyUsageOID.CLIENT_AUTH]
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(cn)).issuer_name(ca.subject)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=False,
                                     crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
    )
    # A SAN always: verifiers ignore the CN once SANs are expected; a client's carries its CN.
    builder = builder.add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in dns or [cn]]),
                                    critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())
    return cert.public_bytes(serialization.Encoding.PEM), _pem_key(key)


def redis_acl(password: str) -> str:
    digest = hashlib.sha256(password.encode()).hexdigest()
    return f"user default on #{digest} {REDIS_ACL_RULES}\n"


def _write(path: Path, data: bytes, *, private: bool) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # Created with its final mode: a key is never readable by others, not even briefly.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(path, 0o600 if private else 0o644)


def _load_ca(ca_dir: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None:
    cert_file, key_file = ca_dir / "ca.crt", ca_dir / "ca.key"
    if not cert_file.exists() and not key_file.exists():
        return None
    try:
        cert = x509.load_pem_x509_certificate(cert_file.read_bytes())
        key = serialization.load_pem_private_key(key_file.read_bytes(), password=None)
    except (OSError, ValueError) as exc:
        raise CertsError(f"the CA in {ca_dir} cannot be used: {exc}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.public_key() != cert.public_key():
        raise CertsError(f"{ca_dir}/ca.key is not the key of {ca_dir}/ca.crt")
    return cert, key


def _secret_manifest(name: str, namespace: str, secret_type: str, data: dict[str, bytes]) -> str:
    # JSON strings are YAML scalars: no quoting rules of our own to get wrong.
    lines = ["apiVersion: v1", "kind: Secret", "metadata:", f"  name: {json.dumps(name)}",
             f"  namespace: {json.dumps(namespace)}", "  labels:", "    app.kubernetes.io/part-of: rusticai-k8s",
             f"type: {secret_type}", "data:"]
    lines += [f"  {key}: {json.dumps(base64.b64encode(value).decode())}" for key, value in data.items()]
    return "\n".join(lines) + "\n"


def write_secrets(out: Path, *, namespace: str, engines: list[str], extra_dns: list[str], days: int,
                  ca_days: int, new_redis_password: bool) -> list[str]:
    """Writes everything described in the module docstring; returns the Secret names."""
    loaded = _load_ca(out / "ca")
    if loaded is None:
        ca, ca_key = new_ca(ca_days)
        _write(out / "ca" / "ca.crt", ca.public_bytes(serialization.Encoding.PEM), private=False)
        _write(out / "ca" / "ca.key", _pem_key(ca_key), private=True)
    else:
        ca, ca_key = loaded
    ca_pem = ca.public_bytes(serialization.Encoding.PEM)
    host_dns = [f"{HOST_SERVICE}.{namespace}.svc", *extra_dns]
    leaves = [Leaf(HOST_SECRET, *issue(ca, ca_key, HOST_CN, host_dns, server=True, days=days))]
    leaves += [Leaf(f"{e}-tls", *issue(ca, ca_key, e, [e], server=False, days=days)) for e in engines]
    manifests = []
    for leaf in leaves:
        files = {"tls.crt": leaf.cert_pem, "tls.key": leaf.key_pem, "ca.crt": ca_pem}
        for key, value in files.items():
            _write(out / leaf.secret / key, value, private=key == "tls.key")
        manifests.append(_secret_manifest(leaf.secret, namespace, "kubernetes.io/tls", files))
    password_file = out / REDIS_SECRET / "password"
    if password_file.exists() and not new_redis_password:
        password = password_file.read_text().strip()
    else:
        password = secrets.token_urlsafe(32)
    redis = {"password": password.encode(), "users.acl": redis_acl(password).encode()}
    for key, value in redis.items():
        _write(out / REDIS_SECRET / key, value, private=True)
    manifests.append(_secret_manifest(REDIS_SECRET, namespace, "Opaque", redis))
    _write(out / "secrets.yaml", "---\n".join(manifests).encode(), private=True)
    _write(out / "kustomization.yaml", KUSTOMIZATION.encode(), private=False)
    return [leaf.secret for leaf in leaves] + [REDIS_SECRET]


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("certs", help="write the fleet's CA, host and engine certificates and Redis password "
                                     "(PEM files and Kubernetes Secret manifests)")
    p.add_argument("--out", required=True, type=Path, help="directory to write (e.g. docker/secrets)")
    p.add_argument("--namespace", default="rustic-ai", help="namespace of the Secrets and of the hosts' Service")
    p.add_argument("--engine", action="append", dest="engines", metavar="NAME",
                   help=f"an engine identity (client certificate CN; Secret NAME-tls); repeatable; "
                        f"default {DEFAULT_ENGINE}")
    p.add_argument("--host-dns", action="append", default=[], metavar="NAME",
                   help="another DNS name for the host certificate (repeatable)")
    p.add_argument("--days", type=int, default=365, help="validity of host and engine certificates (default 365)")
    p.add_argument("--ca-days", type=int, default=3650, help="validity of a new CA (default 3650)")
    p.add_argument("--new-redis-password", action="store_true",
                   help="replace an existing Redis password (Redis and every client must restart)")


_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")


def run(args: argparse.Namespace) -> int:
    engines = args.engines or [DEFAULT_ENGINE]
    problems = [f"--engine {e!r} is not a DNS-1123 label" for e in engines if not _DNS_LABEL.fullmatch(e)]
    if not _DNS_LABEL.fullmatch(args.namespace):
        problems.append(f"--namespace {args.namespace!r} is not a DNS-1123 label")
    problems += [f"--host-dns {n!r} is not a DNS name" for n in args.host_dns
                 if not all(_DNS_LABEL.fullmatch(label) for label in n.split("."))]
    problems += [f"--{flag} must be at least 1"
                 for flag, value in (("days", args.days), ("ca-days", args.ca_days)) if value < 1]
    if problems:
        print("rustic-k8s certs: " + "; ".join(problems), file=sys.stderr)
        return 2
    try:
        names = write_secrets(args.out, namespace=args.namespace, engines=engines, extra_dns=args.host_dns,
                              days=args.days, ca_days=args.ca_days, new_redis_password=args.new_redis_password)
    except CertsError as exc:
        print(f"rustic-k8s certs: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {', '.join(names)} to {args.out} (the CA is in {args.out / 'ca'}: keep it off the cluster)")
    print(f"apply: kubectl apply -f {args.out / 'secrets.yaml'}")
    return 0
