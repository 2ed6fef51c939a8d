"""Mutual TLS between engines and agent hosts, built from PEM files.

Anyone who can call CreateAgent runs code in the host's pod, so a host that serves TLS
also *requires* a client certificate signed by its client CA: the certificate is the
engine's credential. Both sides are built from file paths (Kubernetes Secrets mounted as
files, e.g. by cert-manager):

* ``server_credentials(cert, key, client_ca)``: what the host serves with. Built with
  ``grpc.dynamic_ssl_server_credentials``: gRPC asks our fetcher for the certificate
  configuration at every new handshake, and the fetcher re-reads the three files when
  one of them changed (mtime, size or inode; an atomic Secret update swaps a symlink,
  which changes the inode). A rotated certificate is therefore served from the next
  connection on, without a restart; established connections keep theirs. A rotation
  caught half-written (key and certificate do not match yet) keeps the previous
  configuration and is retried at the next handshake.
* ``channel_credentials(cert, key, ca)``: what an engine dials with, read once. A
  channel's credentials are fixed when it is created, so a long-lived engine uses
  ``ReloadingChannelCredentials``: it looks at the three files' stamps at most once a
  second and, when they changed, loads new credentials under a new generation number;
  the channel pool (client.py) then opens new channels with them and closes the old ones
  once their calls in flight are done. An engine thus survives a rotation by
  cert-manager or the kubelet (which swaps a Secret's files by a symlink: new inodes)
  even when the host's CA changes with it.
* ``ChannelPool(server_name=...)`` (client.py) checks host certificates against one
  name instead of the dialled address (hosts are dialled by pod IP).

Missing or unreadable files are ConfigErrors naming the file, raised at start-up.
"""

from __future__ import annotations

import logging
import os
import ssl
import time
from collections.abc import Callable
from pathlib import Path

import grpc

from ..base.errors import ConfigError

log = logging.getLogger(__name__)


def _read(path: str, what: str) -> bytes:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"{what} {path!r} cannot be read: {exc.strerror or exc}") from None
    if b"-----BEGIN" not in data:
        raise ConfigError(f"{what} {path!r} is not PEM")
    return data


def _check_pair(cert_file: str, key_file: str) -> None:
    """Raises ConfigError unless the key belongs to the certificate (what a handshake would find out later)."""
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(cert_file, key_file)
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(f"TLS certificate {cert_file!r} and key {key_file!r} do not form a pair: {exc}") from None


def _stamp(paths: tuple[str, ...]) -> tuple:
    out = []
    for p in paths:
        try:
            st = os.stat(p)
            out.append((st.st_mtime_ns, st.st_size, st.st_ino))
        except OSError:
            out.append(None)
    return tuple(out)


class ReloadingServerCertificates:
    """The fetcher behind ``server_credentials``: the current configuration, re-read when files change."""

    def __init__(self, cert_file: str, key_file: str, client_ca_file: str) -> None:
        self.paths = (cert_file, key_file, client_ca_file)
        self.reloads = 0  # configurations loaded after the first (for logs and tests)
        self._stamp = _stamp(self.paths)
        self.initial = self._load()

    def _load(self) -> grpc.ServerCertificateConfiguration:
        cert_file, key_file, ca_file = self.paths
        cert = _read(cert_file, "TLS certificate")
        key = _read(key_file, "TLS key")
        ca = _read(ca_file, "TLS client CA")
        _check_pair(cert_file, key_file)
        return grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=ca)

    def __call__(self) -> grpc.ServerCertificateConfiguration | None:
        """Called by gRPC at each handshake: None keeps the configuration it has."""
        stamp = _stamp(self.paths)
        if stamp == self._stamp:
            return None
        try:
            config = self._load()
        except ConfigError as exc:
            # Mid-rotation (a file written, its partner not yet): keep serving the old pair.
            log.warning("TLS files changed but cannot be used yet, keeping the current ones: %s", exc)
            return None
        self._stamp = stamp
        self.reloads += 1
        log.info("TLS certificate reloaded from %s", self.paths[0])
        return config


def server_credentials(
    cert_file: str, key_file: str, client_ca_file: str, *, reload: bool = True
) -> grpc.ServerCredentials:
    """Server credentials that require a client certificate signed by ``client_ca_file``."""
    fetcher = ReloadingServerCertificates(cert_file, key_file, client_ca_file)
    if not reload:
        return grpc.dynamic_ssl_server_credentials(fetcher.initial, lambda: None, require_client_authentication=True)
    return grpc.dynamic_ssl_server_credentials(fetcher.initial, fetcher, require_client_authentication=True)


def channel_credentials(cert_file: str, key_file: str, ca_file: str) -> grpc.ChannelCredentials:
    """Client credentials: present ``cert_file``, trust hosts whose certificate chains to ``ca_file``."""
    cert = _read(cert_file, "TLS certificate")
    key = _read(key_file, "TLS key")
    ca = _read(ca_file, "TLS CA")
    _check_pair(cert_file, key_file)
    return grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)



class ReloadingChannelCredentials:
    """Client credentials that follow their files: ``current()`` re-reads them after a change.

    The stat of three files is cheap, but it is done at most every ``check_every_s`` all the
    same: ``current()`` is called before every call. A change caught half-way (the key does
    not match the certificate yet) keeps the credentials in use and is retried at the next
    check. Missing or broken files at construction are ConfigErrors, as for hosts.
    """

    def __init__(self, cert_file: str, key_file: str, ca_file: str, *, check_every_s: float = 1.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.paths = (cert_file, key_file, ca_file)
        self.generation = 0  # bumped at every reload; channels remember the one they were made with
        self._check_every_s = check_every_s
        self._clock = clock
        self._stamp = _stamp(self.paths)
        self._credentials = channel_credentials(*self.paths)
        self._checked = clock()

    def current(self) -> tuple[int, grpc.ChannelCredentials]:
        """(generation, credentials) to dial with now."""
        now = self._clock()
        if now - self._checked >= self._check_every_s:
            self._checked = now
            stamp = _stamp(self.paths)
            if stamp != self._stamp:
                try:
                    self._credentials = channel_credentials(*self.paths)
                except ConfigError as exc:
                    log.warning("TLS client files changed but cannot be used yet, keeping the current ones: %s", exc)
                else:
                    self._stamp = stamp
                    self.generation += 1
                    log.info("TLS client certificate reloaded from %s", self.paths[0])
        return self.generation, self._credentials
