"""An S3-compatible bucket as an off-site target (AWS, MinIO, B2, R2, Wasabi, Garage, SeaweedFS).

The only module that imports boto3/botocore. Every failure leaves as an OffsiteError in plain
words; the secret key is in no message (and `redact` masks it if a library echoes it).

Uploads are multipart uploads of our own (s3transfer's part size is fixed, and it does not
say its upload id before it starts): parts are read one after the other from the stream, which
need not be seekable nor of known size, and grow with the object (`part_size`): S3_PART_SIZE_MB
for the first 900, then twice that for the next 900, and so on up to 5 GiB, so that an object of
over 5 TiB (S3's most) fits in S3's 10,000 parts. Memory is bounded whatever the object's size:
at most CONCURRENCY parts uploading and one being read, each holding at most SPOOL bytes in
memory (4 + 1 parts x 16 MiB = 80 MiB); the rest of a bigger part waits in a temporary file
(TMPDIR), deleted once sent. Each part carries its Content-MD5, which every S3 store checks; the
newer CRC checksums some stores refuse are sent only where an operation requires one.

While the parts pass, the sha256 of everything and the MD5 of each part are computed. The
server's ETag is then compared with the one those MD5s predict (S3's rule: MD5 of the body for
a single PUT, MD5 of the parts' MD5s plus `-N` for a multipart upload); a provider that computes
ETags otherwise gets its copy read back and compared by sha256 instead.

A multipart upload is recorded in STATE_DIR before it starts (`uploads.Ledger`) and forgotten
once completed or aborted; one cut short (the store down, the process killed) is aborted by the
next upload to the store and at start-up (`clean_up`), so that no parts are left behind.
"""

from __future__ import annotations

import base64
import hashlib
import secrets
import tempfile
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from contextlib import AbstractContextManager, contextmanager, suppress
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import IO, Any, BinaryIO

import boto3
from boto3.exceptions import Boto3Error
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectionClosedError,
    ConnectTimeoutError,
    EndpointConnectionError,
    NoCredentialsError,
    ReadTimeoutError,
)

from ...core import logs, redact
from ...core.settings import Settings
from .base import OffsiteError, Stored
from .paths import check_key
from .uploads import Ledger, Upload

log = logs.get("toybox_backupd.offsite")

MIB = 1024 * 1024
PART_SIZE = 16 * MIB  # the first part's size by default (S3_PART_SIZE_MB)
MAX_PART = 5 * 1024 * MIB  # S3's largest part
MAX_PARTS = 10_000  # S3's most parts
GROW_EVERY = 900  # parts of one size before the size doubles (reaches 5 TiB from 5 MiB parts)
CONCURRENCY = 4  # parts uploading at once (one more is being read)
SPOOL = 16 * MIB  # of a part held in memory; the rest waits in a temporary file
READ_CHUNK = MIB


def part_size(first: int, number: int) -> int:
    """The size of part `number` (from 1) of an upload whose first part is `first` bytes."""
    return min(first << ((number - 1) // GROW_EVERY), MAX_PART)


@dataclass
class _Part:
    number: int
    body: IO[bytes]  # positioned at its start
    size: int
    md5: bytes


class _Parts:
    """Cuts a non-seekable `source` into parts of `part_size`, hashing every byte once: sha256
    of all, MD5 of each part. Reads are repeated until a part is full (a pipe returns short
    reads)."""

    def __init__(self, source: BinaryIO, first: int) -> None:
        self._source, self.first = source, first
        self.sha256 = hashlib.sha256()
        self.size = 0
        self.md5s: list[bytes] = []

    def next(self) -> _Part | None:
        """The next part; None at the end of the source (the first part may be empty)."""
        number = len(self.md5s) + 1
        if number > MAX_PARTS:
            if self._source.read(1):
                raise OffsiteError(f"the artifact is larger than {self.size // 2**30} GiB, the most "
                                   f"S3 holds in {MAX_PARTS} parts")
            return None
        wanted = part_size(self.first, number)
        body: IO[bytes] = tempfile.SpooledTemporaryFile(max_size=SPOOL)  # noqa: SIM115
        md5, filled = hashlib.md5(usedforsecurity=False), 0
        while filled < wanted and (piece := self._source.read(min(READ_CHUNK, wanted - filled))):
            body.write(piece)
            md5.update(piece)
            self.sha256.update(piece)
            filled += len(piece)
        if filled == 0 and number > 1:
            body.close()
            return None
        self.size += filled
        self.md5s.append(md5.digest())
        body.seek(0)
        return _Part(number, body, filled, md5.digest())

    def expected_etag(self) -> str:
        """The ETag S3 gives what was read: MD5 of the body for a single PUT (an object smaller
        than one part), else MD5 of the parts' MD5s plus `-N`."""
        if self.size < self.first:
            return self.md5s[0].hex()
        return hashlib.md5(b"".join(self.md5s), usedforsecurity=False).hexdigest() + f"-{len(self.md5s)}"


class _Body:
    """An object's body whose read errors are OffsiteErrors too."""

    def __init__(self, target: S3Target, body: Any, key: str) -> None:
        self._target, self._body, self._key = target, body, key

    def read(self, size: int | None = -1) -> bytes:
        with self._target._translated(f"reading {self._key}"):
            return self._body.read(None if size is None or size < 0 else size)

    def readable(self) -> bool:
        return True

    def close(self) -> None:
        self._body.close()


class S3Target:
    """`s3://bucket/prefix`, at S3_ENDPOINT_URL (path-style addressing) or AWS."""

    def __init__(self, settings: Settings) -> None:
        self.url = settings.offsite_url
        bucket, _, prefix = self.url.removeprefix("s3://").partition("/")
        self.bucket, self.prefix = bucket, prefix.strip("/")
        self.endpoint = settings.s3_endpoint_url
        self.where = self.endpoint or f"AWS S3 ({settings.s3_region or 'default region'})"
        secret = settings.aws_secret_access_key_value
        redact.register(secret)
        # checksums only where an operation requires one: many stores refuse the CRC32 that
        # botocore >= 1.36 adds to every upload by default. Bodies carry a Content-MD5 (signed,
        # checked by the store) instead of a sha256 of the payload in the signature, which
        # botocore would compute over plain http only (https goes unsigned already)
        config = Config(connect_timeout=10, read_timeout=60,
                        retries={"mode": "standard", "max_attempts": 3},
                        s3={"payload_signing_enabled": False,
                            **({"addressing_style": "path"} if self.endpoint else {})},
                        request_checksum_calculation="when_required",
                        response_checksum_validation="when_required")
        self._client = boto3.session.Session().client(
            "s3", endpoint_url=self.endpoint, region_name=settings.s3_region,
            aws_access_key_id=settings.aws_access_key_id, aws_secret_access_key=secret,
            config=config)
        self._lock_enabled: bool | None = None
        self.part_size = settings.s3_part_size_mb * MIB
        self._ledger = Ledger(settings.state_dir)

    # keys ----------------------------------------------------------------------------------
    def _full(self, key: str, *, root_ok: bool = False) -> str:
        check_key(key, self.url, root_ok=root_ok)
        return f"{self.prefix}/{key}" if self.prefix else key

    def _relative(self, full: str) -> str:
        return full[len(self.prefix) + 1:] if self.prefix else full

    @contextmanager
    def _translated(self, doing: str) -> Iterator[None]:
        try:
            yield
        except OffsiteError:
            raise
        except (BotoCoreError, ClientError, Boto3Error) as exc:
            raise self._error(exc, doing) from None

    def _error(self, exc: BaseException, doing: str) -> OffsiteError:
        if _code(exc) in ("404", "InternalError") and self._bucket_missing():  # HEAD has no body
            message = f"{doing}: bucket {self.bucket} does not exist at {self.where}"
        else:
            message = _explain(exc, doing, self.bucket, self.where)
        return OffsiteError(redact.redact(message))

    def _bucket_missing(self) -> bool:
        try:
            self._client.head_bucket(Bucket=self.bucket)
        except ClientError as exc:
            return _code(exc) in ("404", "NoSuchBucket")
        except BotoCoreError:
            return False
        return False

    # the Target protocol -------------------------------------------------------------------
    def put(self, key: str, source: BinaryIO, *, retain_until: datetime | None = None) -> Stored:
        full = self._full(key)
        extra = ({"ObjectLockMode": "COMPLIANCE", "ObjectLockRetainUntilDate": retain_until}
                 if retain_until else {})
        self.clean_up()
        parts = _Parts(source, self.part_size)
        with self._translated(f"uploading {key} to {self.url}"):
            # first: some servers (SeaweedFS) create a missing bucket on a PUT, without the
            # Object Lock or lifecycle the operator meant it to have (a list, not a HEAD: its
            # errors have a body that says which, e.g. SignatureDoesNotMatch, not just "403")
            self._client.list_objects_v2(Bucket=self.bucket, Prefix=self.prefix, MaxKeys=1)
            first = parts.next()
            assert first is not None
            if first.size < self.part_size:
                with first.body:
                    self._client.put_object(Bucket=self.bucket, Key=full, Body=first.body,
                                            ContentLength=first.size, ContentMD5=_b64(first.md5),
                                            **extra)
            else:
                self._multipart(full, parts, first, extra)
            head = self._client.head_object(Bucket=self.bucket, Key=full)
        return self._verified(key, full, parts, head, retain_until)

    def _verified(self, key: str, full: str, parts: _Parts, head: dict[str, Any],
                  retain_until: datetime | None) -> Stored:
        sha256 = parts.sha256.hexdigest()
        etag = str(head.get("ETag", "")).strip('"')
        if head["ContentLength"] != parts.size:
            raise OffsiteError(f"{self.url}/{key} holds {head['ContentLength']} bytes after the "
                               f"upload of {parts.size}: the copy is not complete")
        verified_by = "etag"
        if etag != parts.expected_etag():
            verified_by = "read-back"
            stored = self._sha256(full, key)
            if stored != sha256:
                raise OffsiteError(f"{self.url}/{key} reads back with sha256 {stored}, not the "
                                   f"{sha256} uploaded: the copy is damaged")
        return Stored(key=key, size=parts.size, sha256=sha256, verified_by=verified_by,
                      etag=etag or None, retain_until=retain_until)

    def _multipart(self, full: str, parts: _Parts, first: _Part, extra: dict[str, Any]) -> None:
        """Upload `first` and the rest of `parts` as one multipart upload, recorded in STATE_DIR
        from before it starts until it is completed, or aborted when it fails (left recorded
        for the next attempt if even that fails)."""
        with self._ledger.begin(self.endpoint, self.bucket, full) as upload:
            upload_id = self._client.create_multipart_upload(
                Bucket=self.bucket, Key=full, **extra)["UploadId"]
            upload.record(upload_id)
            try:
                sent = self._send_parts(full, upload_id, parts, first)
                self._client.complete_multipart_upload(
                    Bucket=self.bucket, Key=full, UploadId=upload_id,
                    MultipartUpload={"Parts": sent})
            except BaseException:
                with suppress(BotoCoreError, ClientError, OSError):  # the failure is what counts
                    self._abort(upload.bucket, full, upload_id)
                    upload.forget()
                raise
            upload.forget()

    def _send_parts(self, full: str, upload_id: str, parts: _Parts, part: _Part | None) -> list[
            dict[str, Any]]:
        """Send the parts, CONCURRENCY at a time, reading the next while they go."""
        sent: list[dict[str, Any]] = []
        pending: set[Future[dict[str, Any]]] = set()
        pool = ThreadPoolExecutor(CONCURRENCY, thread_name_prefix="s3-part")
        try:
            while part is not None:
                pending.add(pool.submit(self._send_part, full, upload_id, part))
                if len(pending) >= CONCURRENCY:
                    finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                    sent += [future.result() for future in finished]
                part = parts.next()
            sent += [future.result() for future in wait(pending).done]
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
        return sorted(sent, key=lambda item: item["PartNumber"])

    def _send_part(self, full: str, upload_id: str, part: _Part) -> dict[str, Any]:
        with part.body:
            reply = self._client.upload_part(
                Bucket=self.bucket, Key=full, UploadId=upload_id, PartNumber=part.number,
                Body=part.body, ContentLength=part.size, ContentMD5=_b64(part.md5))
        return {"PartNumber": part.number, "ETag": reply["ETag"]}

    def clean_up(self) -> list[str]:
        """Abort the multipart uploads to this store that were cut short (recorded in
        STATE_DIR, their process gone or their attempt failed); the keys cleaned. Raises
        OffsiteError when the store cannot be reached or refuses."""
        cleaned = []
        with self._ledger.leftovers() as uploads:
            for upload in uploads:
                if upload.endpoint != self.endpoint:
                    continue  # another store's (S3_ENDPOINT_URL changed): left for it
                with self._translated(f"aborting the unfinished upload of {upload.key} to "
                                      f"bucket {upload.bucket} (left by an interrupted copy)"):
                    for upload_id in self._ids_of(upload):
                        self._abort(upload.bucket, upload.key, upload_id)
                upload.forget()
                cleaned.append(upload.key)
                log.warning("unfinished upload left by an interrupted copy aborted",
                            bucket=upload.bucket, key=upload.key)
        return cleaned

    def _ids_of(self, upload: Upload) -> list[str]:
        """The upload's id; if the process died before it could write it down, the uploads of
        that key (ours: the record names it) that no record names."""
        if upload.upload_id:
            return [upload.upload_id]
        known = self._ledger.recorded_ids()
        found = []
        pages = self._client.get_paginator("list_multipart_uploads").paginate(
            Bucket=upload.bucket, Prefix=upload.key)
        for page in pages:
            found += [item["UploadId"] for item in page.get("Uploads", [])
                      if item["Key"] == upload.key and item["UploadId"] not in known]
        return found

    def _abort(self, bucket: str, full: str, upload_id: str) -> None:
        try:
            self._client.abort_multipart_upload(Bucket=bucket, Key=full, UploadId=upload_id)
        except ClientError as exc:
            if _code(exc) not in ("NoSuchUpload", "404"):  # already gone
                raise

    def _sha256(self, full: str, key: str) -> str:
        digest = hashlib.sha256()
        with self._translated(f"reading {key} back from {self.url}"):
            body = self._client.get_object(Bucket=self.bucket, Key=full)["Body"]
            for chunk in body.iter_chunks(READ_CHUNK):
                digest.update(chunk)
        return digest.hexdigest()

    def open(self, key: str) -> AbstractContextManager[BinaryIO]:
        return self._open(key)

    @contextmanager
    def _open(self, key: str) -> Iterator[Any]:
        full = self._full(key)
        with self._translated(f"reading {key} from {self.url}"):
            body = self._client.get_object(Bucket=self.bucket, Key=full)["Body"]
        try:
            yield _Body(self, body, key)
        finally:
            body.close()

    def check(self, stored: Stored) -> str | None:
        full = self._full(stored.key)
        try:
            head = self._client.head_object(Bucket=self.bucket, Key=full)
        except (BotoCoreError, ClientError) as exc:
            if _code(exc) in ("404", "NoSuchKey"):
                return f"{stored.key} is missing from {self.url}"
            raise self._error(exc, f"checking {stored.key} in {self.url}") from None
        if head["ContentLength"] != stored.size:
            return f"{stored.key} is {head['ContentLength']} bytes in {self.url}, not {stored.size}"
        if stored.etag:
            etag = str(head.get("ETag", "")).strip('"')
            return None if etag == stored.etag else (
                f"{stored.key} has ETag {etag} in {self.url}, not {stored.etag}: it was replaced")
        found = self._sha256(full, stored.key)
        return None if found == stored.sha256 else (
            f"{stored.key} has sha256 {found} in {self.url}, not {stored.sha256}: it is damaged")

    def delete(self, key: str) -> bool:
        full = self._full(key)
        doing = f"deleting {key} from {self.url}"
        with self._translated(doing):
            listed = self._client.list_objects_v2(Bucket=self.bucket, Prefix=full, MaxKeys=1)
        if not any(item["Key"] == full for item in listed.get("Contents", [])):
            return False
        if not self._locking():
            with self._translated(doing):
                self._client.delete_object(Bucket=self.bucket, Key=full)
            return True
        for version in self._versions(full, doing):
            self._delete_version(full, version, doing)
        return True

    def _versions(self, full: str, doing: str) -> list[str]:
        """Every version and delete marker of `full` (a locked bucket is versioned: deleting
        only the key would leave the data behind a delete marker)."""
        found = []
        with self._translated(doing):
            pages = self._client.get_paginator("list_object_versions").paginate(
                Bucket=self.bucket, Prefix=full)
            for page in pages:
                for item in page.get("Versions", []) + page.get("DeleteMarkers", []):
                    if item["Key"] == full:
                        found.append(item["VersionId"])
        return found

    def _delete_version(self, full: str, version: str, doing: str) -> None:
        try:
            self._client.delete_object(Bucket=self.bucket, Key=full, VersionId=version)
        except (BotoCoreError, ClientError) as exc:
            until = self._retained_until(full, version) if _code(exc) == "AccessDenied" else None
            if until is None:
                raise self._error(exc, doing) from None
            raise OffsiteError(f"{doing}: it is retained by the bucket's Object Lock until "
                               f"{until:%Y-%m-%d %H:%M} UTC and cannot be deleted before") from None

    def _retained_until(self, full: str, version: str) -> datetime | None:
        try:
            retention = self._client.get_object_retention(
                Bucket=self.bucket, Key=full, VersionId=version)["Retention"]
        except (ClientError, BotoCoreError):
            return None
        until: datetime = retention["RetainUntilDate"]
        return until if until > datetime.now(until.tzinfo) else None

    def keys(self, prefix: str = "") -> Iterator[str]:
        root = self._full(prefix, root_ok=True) if prefix else (f"{self.prefix}/" if self.prefix else "")
        with self._translated(f"listing {self.url}"):
            for page in self._client.get_paginator("list_objects_v2").paginate(
                    Bucket=self.bucket, Prefix=root):
                for item in page.get("Contents", []):
                    yield self._relative(item["Key"])

    def probe(self) -> None:
        key = f".toybox-probe-{secrets.token_hex(8)}"
        full = self._full(key)
        with self._translated(f"listing {self.url}"):
            self._client.list_objects_v2(Bucket=self.bucket, Prefix=self.prefix, MaxKeys=1)
        with self._translated(f"writing a probe object to {self.url}"):
            self._client.put_object(Bucket=self.bucket, Key=full, Body=b"toybox-backupd probe\n")
        with self._translated(f"deleting the probe object from {self.url}"):
            self._client.delete_object(Bucket=self.bucket, Key=full)
        with self._translated(f"starting and aborting a multipart upload at {self.url}"), \
                self._ledger.begin(self.endpoint, self.bucket, full) as upload:
            upload.record(self._client.create_multipart_upload(Bucket=self.bucket, Key=full)["UploadId"])
            self._abort(self.bucket, full, str(upload.upload_id))
            upload.forget()

    def lock_until(self, days: int, now: datetime) -> datetime | None:
        return now + timedelta(days=days + 1) if self._locking() else None

    def _locking(self) -> bool:
        """Whether the bucket has Object Lock enabled (asked once per target)."""
        if self._lock_enabled is None:
            try:
                config = self._client.get_object_lock_configuration(Bucket=self.bucket)
            except ClientError:
                self._lock_enabled = False
                return False
            except BotoCoreError:
                return False  # unreachable: ask again next time
            enabled = config.get("ObjectLockConfiguration", {}).get("ObjectLockEnabled")
            self._lock_enabled = enabled == "Enabled"
        return self._lock_enabled


# errors in plain words ---------------------------------------------------------------------
_UNREACHABLE = (EndpointConnectionError, ConnectTimeoutError, ReadTimeoutError,
                ConnectionClosedError)
_PERMISSIONS = ("s3:ListBucket, s3:PutObject, s3:GetObject, s3:DeleteObject, "
                "s3:AbortMultipartUpload, s3:ListBucketMultipartUploads")


def _b64(digest: bytes) -> str:
    return base64.b64encode(digest).decode()


def _code(exc: BaseException) -> str | None:
    """The S3 error code of a ClientError (also one wrapped by boto3's transfer errors)."""
    while exc is not None:
        if isinstance(exc, ClientError):
            return str(exc.response.get("Error", {}).get("Code", "")) or None
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
    return None


def _root(exc: BaseException) -> BaseException:
    """The botocore error under boto3's S3UploadFailedError and the like."""
    seen = exc
    while not isinstance(seen, BotoCoreError | ClientError) and (seen.__cause__ or seen.__context__):
        seen = seen.__cause__ or seen.__context__  # type: ignore[assignment]
    return seen if isinstance(seen, BotoCoreError | ClientError) else exc


def _explain(exc: BaseException, doing: str, bucket: str, where: str) -> str:
    root = _root(exc)
    if isinstance(root, _UNREACHABLE):
        return f"{doing}: cannot reach the S3 endpoint {where}: {root}"
    if isinstance(root, NoCredentialsError):
        return (f"{doing}: no S3 credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
                "(or give the host a role)")
    code = _code(root)
    plain = {
        "NoSuchBucket": f"bucket {bucket} does not exist at {where}",
        "AccessDenied": f"access denied to bucket {bucket} at {where}: the key's policy must allow "
                        f"{_PERMISSIONS}",
        "403": f"access denied to bucket {bucket} at {where}: the key's policy must allow "
               f"{_PERMISSIONS}",
        "InvalidAccessKeyId": f"the server {where} does not know the access key id (AWS_ACCESS_KEY_ID)",
        "SignatureDoesNotMatch": "the secret key does not match the access key id "
                                 "(AWS_SECRET_ACCESS_KEY)",
        "RequestTimeTooSkewed": "this host's clock differs from the server's by more than "
                                "15 minutes; fix the clock (date)",
        "NoSuchKey": "no such object",
        "404": "not found (no such bucket or object)",
    }.get(code or "")
    if plain:
        return f"{doing}: {plain}"
    if isinstance(root, ClientError):
        error = root.response.get("Error", {})
        return f"{doing}: the S3 server said {code}: {error.get('Message') or root}"
    return f"{doing}: {root}"
