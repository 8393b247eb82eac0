"""One place that knows the secrets, so logs, history, emails and errors can hide them."""

from __future__ import annotations

import threading

_lock = threading.Lock()
_secrets: set[str] = set()
MASK = "***"


def register(*values: str | None) -> None:
    """Remember secret values; every later `redact` call masks them."""
    with _lock:
        for value in values:
            if value and len(value) >= 3:
                _secrets.add(value)


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
