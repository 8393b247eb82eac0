"""One place that knows the secrets, so logs, history, emails and errors can hide them.

Secrets are kept out of messages at their source (they go to tools through the environment,
never on a command line or into a text that is logged); this is the last net. It masks only a
secret that cannot be mistaken for ordinary text: one shorter than MIN_LENGTH or a common word
would mangle text (`backend_postgres_data`) and, by the gap it leaves, reveal itself. Such a
secret is reported as weak instead (`weak`, shown by `check` and at start-up).
"""

from __future__ import annotations

import threading
import urllib.parse

_lock = threading.Lock()
_secrets: set[str] = set()
MASK = "***"
MIN_LENGTH = 8
TOKEN_LENGTH = 12  # parts of a secret URL this long are taken for tokens and masked on their own
COMMON = frozenset({
    "postgres", "password", "passw0rd", "p@ssw0rd", "secret", "changeme", "changeit",
    "admin", "administrator", "toybox", "backup", "backups", "example", "default", "qwerty",
    "letmein", "welcome", "12345678", "123456789", "1234567890", "database", "postgresql",
})


def weak(value: str | None) -> bool:
    """Whether a secret is too short or too common to be masked safely (or to be a secret)."""
    return bool(value) and (len(value or "") < MIN_LENGTH or (value or "").lower() in COMMON)


def register(*values: str | None) -> None:
    """Remember secret values; every later `redact` call masks them (weak ones excepted)."""
    with _lock:
        for value in values:
            if value and not weak(value):
                _secrets.add(value)


def register_url(*urls: str | None) -> None:
    """Remember secret URLs (chat webhooks, ping URLs): each whole, its password, and its long
    path and query parts (tokens), so a tool that quotes a piece of one leaks nothing either."""
    for url in urls:
        if not url:
            continue
        parts = urllib.parse.urlsplit(url)
        pieces = [*parts.path.split("/"),
                  *(value for _key, value in urllib.parse.parse_qsl(parts.query))]
        register(url, parts.password, *(piece for piece in pieces if len(piece) >= TOKEN_LENGTH))


def redact(text: str) -> str:
    """Return `text` with every registered secret replaced by `***`."""
    if not text:
        return text
    with _lock:
        secrets = sorted(_secrets, key=len, reverse=True)
    for secret in secrets:
        if secret in text:
            text = text.replace(secret, MASK)
    return text
