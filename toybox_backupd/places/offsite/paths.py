"""Keys of an off-site target: relative, `/`-separated, never leaving the target's root."""

from __future__ import annotations

from .base import OffsiteError


def check_key(key: str, url: str, *, root_ok: bool = False) -> str:
    """`key` if it names something inside the target's root, else OffsiteError. `root_ok`
    allows "" (a prefix for listing the whole root)."""
    if not key and root_ok:
        return key
    parts = key.split("/")
    if (not key or key.startswith("/") or "\\" in key or "\0" in key
            or any(part in ("", ".", "..") for part in parts[:-1]) or parts[-1] in (".", "..")):
        raise OffsiteError(f"refusing key {key!r} for {url}: keys are relative paths inside it "
                           "(no leading /, no . or .. parts)")
    return key
