"""Keeping secrets out of logs and error messages.

A Redis URL may carry a password (``redis://user:secret@redis:6379/0``, or redis-py's
``?password=secret`` query form). Anything that prints a URL, or an exception raised
while using one, passes it through here first, so the password never reaches a log
line, a ConfigError or a gRPC status message.
"""

from __future__ import annotations

import urllib.parse

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
