"""Keeping secrets out of logs and error messages.

A Redis URL may carry a password (``redis://user:secret@redis:6379/0``, or redis-py's
``?password=secret`` query form). Anything that prints a URL, or an exception raised
while using one, passes it through here first, so the password never reaches a log
line, a ConfigError or a gRPC status message.

An agent's messaging config may hold passwords too, and rusticai-core logs the whole
config at INFO when an agent builds its messaging: ``messaging_secrets`` finds them (and
the values of ``${env:...}`` references, base/envrefs.py) and a ``Redactor`` masks them in
every line of agent output a host keeps (process/output.py).
"""

from __future__ import annotations

import json
import urllib.parse
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from .envrefs import reference, referenced_values

MASK = "***"


def redact_url(url: str) -> str:
    """The URL with any password (user-info or ``password=`` query) replaced by ``***``."""
    try:
        parts = urllib.parse.urlsplit(url)
        query = urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
    except ValueError:
        return MASK  # unparseable: it may be nothing but secret
    netloc = parts.netloc
    userinfo, at, hostport = netloc.rpartition("@")
    if at and ":" in userinfo:
        netloc = f"{userinfo.split(':', 1)[0]}:{MASK}@{hostport}"
    if any(k == "password" for k, _ in query):
        query = [(k, MASK if k == "password" else v) for k, v in query]
        parts = parts._replace(query=urllib.parse.urlencode(query, safe="*"))
    if netloc == parts.netloc and parts.query == urllib.parse.urlsplit(url).query:
        return url
    # Assembled by hand: urlunsplit drops the "//" of an empty netloc (unix:///path).
    out = f"{parts.scheme}://{netloc}{parts.path}"
    return out + (f"?{parts.query}" if parts.query else "") + (f"#{parts.fragment}" if parts.fragment else "")


def url_password(url: str) -> str | None:
    """The password a Redis URL carries, as redis-py reads it; None if it has none."""
    try:
        parts = urllib.parse.urlsplit(url)
        query = dict(urllib.parse.parse_qsl(parts.query))
    except ValueError:
        return None
    if query.get("password"):
        return query["password"]
    return urllib.parse.unquote(parts.password) if parts.password else None


def redact_text(text: str, *secrets: str | None) -> str:
    """``text`` with every non-empty secret in it replaced by ``***``."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, MASK)
            quoted = urllib.parse.quote(secret, safe="")
            if quoted != secret:
                text = text.replace(quoted, MASK)
    return text


# Keys whose string values are secrets wherever they appear in a messaging config
# (rusticai-redis: password; rusticai-nats: password, token; and the usual others).
_SECRET_KEYS = ("password", "passwd", "token", "secret", "api_key", "apikey", "credentials", "private_key")
_MIN_SECRET = 4  # shorter values are not masked: "***" for every "a" would wreck the output, not hide much


def _secret_key(key: Any) -> bool:
    return isinstance(key, str) and any(part in key.lower() for part in _SECRET_KEYS)


def _literal_secrets(value: Any, secret: bool = False) -> Iterator[str]:
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _literal_secrets(item, _secret_key(key))
    elif isinstance(value, list):
        for item in value:
            yield from _literal_secrets(item, secret)
    elif isinstance(value, str):
        if secret:
            yield value
        elif "://" in value and (password := url_password(value)):
            yield password


def messaging_secrets(messaging_config: Any, guild_spec: Any, environ: Mapping[str, str]) -> list[str]:
    """What must not appear in an agent's output: the messaging config's passwords and tokens
    (literal, in URLs, or the values of the ``${env:...}`` references it makes, base/envrefs.py),
    in the request's messaging config and in the guild spec's copy of it."""
    configs = [messaging_config]
    if isinstance(guild_spec, dict) and isinstance(guild_spec.get("properties"), dict):
        configs.append(guild_spec["properties"].get("messaging"))
    found: set[str] = set()
    for config in configs:
        backend = config.get("backend_config") if isinstance(config, dict) else None
        found.update(_literal_secrets(backend))
        found.update(referenced_values(config, environ))
    return sorted((s for s in found if len(s) >= _MIN_SECRET and reference(s) is None), key=len, reverse=True)


class Redactor:
    """Masks a fixed set of secrets in lines of text, in the forms a program prints them in."""

    def __init__(self, secrets: Iterable[str]) -> None:
        forms: set[str] = set()
        for secret in secrets:
            if secret:
                forms |= {secret, urllib.parse.quote(secret, safe=""), repr(secret)[1:-1], json.dumps(secret)[1:-1]}
        self._forms = sorted(forms, key=len, reverse=True)  # longest first: no form is left half-masked

    def __bool__(self) -> bool:
        return bool(self._forms)

    def __call__(self, line: str, cut: bool = False) -> str:
        """``line`` masked; ``cut``: the line was truncated, so a secret's beginning at its end is masked too."""
        for form in self._forms:
            if form in line:
                line = line.replace(form, MASK)
        if cut:
            for form in self._forms:
                for n in range(len(form) - 1, _MIN_SECRET - 1, -1):
                    if line.endswith(form[:n]):
                        return line[:-n] + MASK
        return line
