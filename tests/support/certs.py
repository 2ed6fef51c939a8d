"""Certificate authorities and certificates for TLS tests, written as PEM files (trustme).

trustme issues DNS and IP names only; ``issue_with_uris`` signs a client certificate with
URI names (SPIFFE ids, as service meshes and cert-manager's CSI driver issue) itself.
"""

from __future__ import annotations

import dataclasses
import datetime
from pathlib import Path

import trustme
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclasses.dataclass(frozen=True)
class CertFiles:
    cert: Path
    key: Path
    ca: Path  # the CA that signed it (what the other side trusts)


class TestCA:
    """One CA; issues server and client certificates into ``directory``."""

    __test__ = False  # not a test class, despite the name

    def __init__(self, directory: Path, name: str = "ca") -> None:
        self.ca = trustme.CA(organization_name=f"rusticai-k8s tests {name}")
        self.dir = directory / name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.ca_file = self.dir / "ca.pem"
        self.ca.cert_pem.write_to_path(str(self.ca_file))

    def issue(self, name: str, *identities: str) -> CertFiles:
        """A leaf certificate for ``identities`` (DNS names or IPs), usable by servers and clients."""
        leaf = self.ca.issue_cert(*(identities or ("127.0.0.1", "localhost")), common_name=name)
        cert, key = self.dir / f"{name}.pem", self.dir / f"{name}.key"
        leaf.cert_chain_pems[0].write_to_path(str(cert))
        for extra in leaf.cert_chain_pems[1:]:
            extra.write_to_path(str(cert), append=True)
        leaf.private_key_pem.write_to_path(str(key))
        return CertFiles(cert, key, self.ca_file)

    def issue_with_uris(self, name: str, *uris: str) -> CertFiles:
        """A client certificate with subject CN ``name`` and URI subject alternative names ``uris``."""
        ca_key = serialization.load_pem_private_key(self.ca.private_key_pem.bytes(), None)
        ca_cert = x509.load_pem_x509_certificate(self.ca.cert_pem.bytes())
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(ca_cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        )
        if uris:
            builder = builder.add_extension(
                x509.SubjectAlternativeName([x509.UniformResourceIdentifier(u) for u in uris]), critical=False)
        cert = builder.sign(ca_key, hashes.SHA256())
        cert_file, key_file = self.dir / f"{name}.pem", self.dir / f"{name}.key"
        cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
        return CertFiles(cert_file, key_file, self.ca_file)


class SecretVolume:
    """A directory laid out as the kubelet mounts a Secret: ``tls.crt`` → ``..data/tls.crt``.

    ``..data`` is a symlink to a timestamped directory; an update writes a new directory and
    renames a new symlink over ``..data`` (atomic), so every file changes at once and gets a
    new inode: what cert-manager's renewals look like to a pod.
    """

    NAMES = ("tls.crt", "tls.key", "ca.crt")

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.version = 0

    @property
    def cert(self) -> Path:
        return self.dir / "tls.crt"

    @property
    def key(self) -> Path:
        return self.dir / "tls.key"

    @property
    def ca(self) -> Path:
        return self.dir / "ca.crt"

    def write(self, files: CertFiles, ca_file: Path | None = None) -> SecretVolume:
        """Projects ``files`` (with ``ca_file`` as ca.crt, default the CA that signed them)."""
        self.version += 1
        target = self.dir / f"..v{self.version}"
        target.mkdir()
        for name, source in zip(self.NAMES, (files.cert, files.key, ca_file or files.ca), strict=True):
            (target / name).write_bytes(source.read_bytes())
        tmp = self.dir / "..data_tmp"
        tmp.symlink_to(target.name)
        tmp.replace(self.dir / "..data")
        for name in self.NAMES:
            link = self.dir / name
            if not link.is_symlink():
                link.symlink_to(f"..data/{name}")
        return self
