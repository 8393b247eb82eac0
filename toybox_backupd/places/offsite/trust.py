"""What is believed of what comes back from off-site: signatures, required encryption, checksums.

Age recipients are public, so anyone who can write to the bucket can make valid ciphertext
and a manifest with matching sha256s. What this installation alone can make is a signature
with its signing key (OFFSITE_SIGNING_KEY_FILE, see signing.py):

- every remote manifest carries `signature` over its canonical JSON and its own key
  (`<path>.manifest.json`), so it is refused anywhere else or changed;
- every WAL segment's and timeline history file's `<name>.sha256` (sha256sum's format) has a
  detached `<name>.sha256.sig` (JSON) over the object's path, the cluster's system identifier
  (where the segment's header names it) and the checksum.

A signature is accepted from the signing key's own verify key and OFFSITE_VERIFY_KEYS (older
keys after a rotation, or all a new host has). A manifest or checksum with no signature (copied
before signing was set up) is refused unless OFFSITE_TRUST_UNSIGNED / `--trust-unsigned` says
otherwise; a manifest this host copied itself and still matches the sha256 recorded then is
believed without one. With OFFSITE_AGE_RECIPIENTS set, an object that is not age-encrypted is
refused whatever its manifest says.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
from typing import Any

from ...core.settings import Settings
from . import signing
from .base import OffsiteError
from .target import Target

MANIFEST_CONTEXT = b"toybox-backupd manifest v1\n"
SUM_CONTEXT = b"toybox-backupd wal checksum v1\n"
SUM_SUFFIX = ".sha256"
SIG_SUFFIX = ".sig"
UNSIGNED_FIELDS = ("signature", "_manifest_size")  # _manifest_size: added by reindex_offsite
SHA256 = re.compile(r"^[0-9a-f]{64}$")
UNSIGNED_HINT = ("copied before OFFSITE_SIGNING_KEY_FILE was set, or planted: if you know the "
                 "copy is yours, give --trust-unsigned (OFFSITE_TRUST_UNSIGNED=true)")


class Untrusted(OffsiteError):
    """An off-site manifest, checksum or object that is not believed; the message says why."""


def signer(settings: Settings) -> signing.SigningKey | None:
    """The signing key OFFSITE_SIGNING_KEY_FILE names (None when it is not set)."""
    path = settings.offsite_signing_key_file
    return signing.load(path) if path is not None else None


def trusted_keys(settings: Settings) -> set[str]:
    """The verify keys whose signatures are accepted: OFFSITE_VERIFY_KEYS and the signing key's."""
    keys = set(settings.offsite_verify_keys)
    own = signer(settings)
    if own is not None:
        keys.add(own.verify_key)
    return keys


def _record(key: signing.SigningKey, message: bytes, **extra: Any) -> dict[str, Any]:
    return {"alg": "ed25519", "key": key.verify_key, "sig": key.sign(message), **extra}


def _signature_problem(settings: Settings, record: Any, message: bytes, what: str) -> str | None:
    """None if `record` is a good signature of `message` by a trusted key (or there is none
    and unsigned copies are trusted), else what is wrong, naming `what`."""
    if record is None:
        return None if settings.offsite_trust_unsigned else f"{what} is not signed ({UNSIGNED_HINT})"
    if not isinstance(record, dict) or record.get("alg") != "ed25519":
        return f"{what} carries a signature of a kind this version does not know"
    keys = trusted_keys(settings)
    if not keys:
        return (f"{what} is signed, but no verify key is set: set OFFSITE_VERIFY_KEYS to the "
                "verify key `toybox-backupd check` printed (kept beside the age identity)")
    if record.get("key") not in keys:
        return (f"{what} is signed by {str(record.get('key'))[:20]}…, which is not one of "
                "OFFSITE_VERIFY_KEYS (nor OFFSITE_SIGNING_KEY_FILE's own)")
    if not signing.verifies(str(record["key"]), message, str(record.get("sig", ""))):
        return f"{what} does not match its signature: it was changed, or moved from elsewhere"
    return None


# manifests ----------------------------------------------------------------------------------
def _manifest_message(data: dict[str, Any], key: str) -> bytes:
    body = {name: value for name, value in data.items() if name not in UNSIGNED_FIELDS}
    plain = json.loads(json.dumps(body, default=str))  # as it reads back (dates as text)
    return MANIFEST_CONTEXT + key.encode() + b"\n" + json.dumps(
        plain, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def sign_manifest(settings: Settings, manifest: dict[str, Any], key: str) -> None:
    """Add the signature of `manifest` at `key` (nothing without a signing key)."""
    own = signer(settings)
    if own is not None:
        manifest["signature"] = _record(own, _manifest_message(manifest, key))


def manifest_problem(settings: Settings, data: dict[str, Any], key: str) -> str | None:
    """None if the manifest read from `key` is signed by a trusted key, else why not."""
    return _signature_problem(settings, data.get("signature"), _manifest_message(data, key),
                              f"the manifest {key}")


def signed_only(settings: Settings, found: list[tuple[str, dict[str, Any]]],
                skipped: list[tuple[str, str]], suffix: str) -> list[tuple[str, dict[str, Any]]]:
    """The (artifact path, manifest) pairs whose manifest (`<path><suffix>`) is trusted; the
    others go to `skipped` with the reason."""
    kept = []
    for relative, data in found:
        problem = manifest_problem(settings, data, relative + suffix)
        if problem:
            skipped.append((relative, problem))
        else:
            kept.append((relative, data))
    return kept


def remote_manifest(settings: Settings, target: Target, key: str,
                    recorded_sha256: str | None) -> dict[str, Any]:
    """The manifest object `key`, believed: it is what this host wrote (`recorded_sha256`) or
    carries a trusted signature. Raises Untrusted otherwise."""
    with target.open(key) as stream:
        body = stream.read()
    try:
        data = json.loads(body.decode("utf-8"))
    except ValueError:
        data = None
    if not isinstance(data, dict):
        raise Untrusted(f"the manifest {key} off-site is not JSON")
    if recorded_sha256 and hashlib.sha256(body).hexdigest() == recorded_sha256:
        return data
    problem = manifest_problem(settings, data, key)
    if problem:
        raise Untrusted(problem)
    return data


def require_encrypted(settings: Settings, key: str, encrypted: bool) -> None:
    """Refuse an object that is not age-encrypted when OFFSITE_AGE_RECIPIENTS is set."""
    if settings.offsite_age_recipients and not encrypted:
        raise Untrusted(f"{key} off-site is not age-encrypted, but OFFSITE_AGE_RECIPIENTS is set: "
                        "every copy of this installation is encrypted, so this one is refused")


# WAL checksums ------------------------------------------------------------------------------
def _sum_message(plain_key: str, system: str | None, sha256: str) -> bytes:
    return SUM_CONTEXT + f"{plain_key}\n{system or ''}\n{sha256}\n".encode()


def put_checksum(settings: Settings, target: Target, plain_key: str, sha256: str,
                 system: str | None = None) -> None:
    """`<plain_key>.sha256` (sha256sum's format) and, with a signing key, its signature
    `<plain_key>.sha256.sig`."""
    name = plain_key.rsplit("/", 1)[-1]
    target.put(plain_key + SUM_SUFFIX, io.BytesIO(f"{sha256}  {name}\n".encode()))
    own = signer(settings)
    if own is not None:
        record = _record(own, _sum_message(plain_key, system, sha256), system=system)
        target.put(plain_key + SUM_SUFFIX + SIG_SUFFIX,
                   io.BytesIO(json.dumps(record, sort_keys=True).encode() + b"\n"))


def _small(target: Target, key: str) -> bytes:
    with target.open(key) as stream:
        return stream.read(8192)


def checked_sum(settings: Settings, target: Target, plain_key: str, present: set[str]) -> str:
    """The sha256 of the plain object `plain_key` as its `.sha256` says and its signature
    vouches for (`present`: the keys there). Raises Untrusted when either is missing or bad."""
    sum_key = plain_key + SUM_SUFFIX
    if sum_key not in present:
        raise Untrusted(f"{plain_key} has no {SUM_SUFFIX} off-site (its copy was interrupted "
                        "before the checksum was written, or it was planted)")
    words = _small(target, sum_key).decode("ascii", "replace").split()
    sha256 = words[0] if words else ""
    if not SHA256.match(sha256):
        raise Untrusted(f"{sum_key} off-site holds no sha256")
    record: Any = None
    if sum_key + SIG_SUFFIX in present:
        try:
            record = json.loads(_small(target, sum_key + SIG_SUFFIX).decode("utf-8"))
        except ValueError:
            record = "unreadable"
    system = record.get("system") if isinstance(record, dict) else None
    problem = _signature_problem(settings, record, _sum_message(plain_key, system, sha256),
                                 f"the checksum of {plain_key}")
    if problem:
        raise Untrusted(problem)
    return sha256
