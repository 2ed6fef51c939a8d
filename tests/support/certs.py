"""Certificate authorities and certificates for TLS tests, written as PEM files (trustme)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import trustme


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
