"""An S3-compatible bucket as an off-site target (AWS, MinIO, B2, R2, Wasabi, Garage, SeaweedFS).

The only module that imports boto3/botocore. Every failure leaves as an OffsiteError in plain
words; the secret key is in no message (and `redact` masks it if a library echoes it).

Uploads stream through s3transfer (multipart, fixed part size, a bounded number of parts in
memory) while a reader wrapper hashes what passes: the sha256 of everything and the MD5 of each
part. The server's ETag is then compared with the one those MD5s predict (S3's rule: MD5 of the
body for a single PUT, MD5 of the parts' MD5s plus `-N` for a multipart upload); a provider that
computes ETags otherwise gets its copy read back and compared by sha256 instead.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from datetime import datetime, timedelta
from typing import Any, BinaryIO

import boto3
from boto3.exceptions import Boto3Error
from boto3.s3.transfer import TransferConfig
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

from .. import redact
from ..settings import Settings
from .base import OffsiteError, Stored
from .paths import check_key

PART_SIZE = 16 * 1024 * 1024  # multipart threshold and part size
MAX_PARTS = 10_000  # S3's limit: an object of up to 156 GiB
MAX_SIZE = PART_SIZE * MAX_PARTS
TRANSFER = TransferConfig(multipart_threshold=PART_SIZE, multipart_chunksize=PART_SIZE,
                          max_concurrency=8, use_threads=True, preferred_transfer_client="classic")
# parts read ahead of the uploads (s3transfer's own attribute, not a keyword of boto3's config):
# memory is about (this + max_concurrency) parts, whatever the artifact's size
TRANSFER.max_in_memory_upload_chunks = 4
READ_CHUNK = 1024 * 1024


class _HashingReader:
    """A read-only, non-seekable view of `source` that hashes every byte read once: sha256 of
    all, MD5 of each PART_SIZE-aligned part. Reads are filled to the size asked (a pipe returns
    short reads; s3transfer needs full parts)."""

    def __init__(self, source: BinaryIO) -> None:
        self._source = source
        self.sha256 = hashlib.sha256()
        self.size = 0
        self.part_md5s: list[bytes] = []
        self._part = hashlib.md5(usedforsecurity=False)
        self._part_fill = 0

    def read(self, size: int | None = -1) -> bytes:
        if size is None or size < 0:
            data = self._source.read()
        else:
            pieces = []
            wanted = size
            while wanted > 0 and (piece := self._source.read(wanted)):
                pieces.append(piece)
                wanted -= len(piece)
            data = b"".join(pieces)
        self._consume(data)
        return data

    def _consume(self, data: bytes) -> None:
        self.sha256.update(data)
        self.size += len(data)
        if self.size > MAX_SIZE:
            raise OffsiteError(f"the artifact is larger than {MAX_SIZE // 2**30} GiB, the most "
                               f"an off-site upload of {MAX_PARTS} parts of {PART_SIZE // 2**20} MiB holds")
        view = memoryview(data)
        while view:
            take = min(len(view), PART_SIZE - self._part_fill)
            self._part.update(view[:take])
            self._part_fill += take
            view = view[take:]
            if self._part_fill == PART_SIZE:
                self.part_md5s.append(self._part.digest())
                self._part = hashlib.md5(usedforsecurity=False)
                self._part_fill = 0

    def expected_etag(self) -> str:
        """The ETag S3 gives what was read, uploaded as s3transfer uploads it: a single PUT below
        the multipart threshold, else parts of PART_SIZE."""
        md5s = list(self.part_md5s)
        if self._part_fill or not md5s:
            md5s.append(self._part.digest())
        if self.size < PART_SIZE:
            return md5s[0].hex()
        return hashlib.md5(b"".join(md5s), usedforsecurity=False).hexdigest() + f"-{len(md5s)}"


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
        config = Config(connect_timeout=10, read_timeout=60,
                        retries={"mode": "standard", "max_attempts": 3},
                        s3={"addressing_style": "path"} if self.endpoint else None)
        self._client = boto3.session.Session().client(
            "s3", endpoint_url=self.endpoint, region_name=settings.s3_region,
            aws_access_key_id=settings.aws_access_key_id, aws_secret_access_key=secret,
            config=config)
        self._lock_enabled: bool | None = None

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
        reader = _HashingReader(source)
        extra = ({"ObjectLockMode": "COMPLIANCE", "ObjectLockRetainUntilDate": retain_until}
                 if retain_until else None)
        with self._translated(f"uploading {key} to {self.url}"):
            # first: some servers (SeaweedFS) create a missing bucket on a PUT, without the
            # Object Lock or lifecycle the operator meant it to have (a list, not a HEAD: its
            # errors have a body that says which, e.g. SignatureDoesNotMatch, not just "403")
            self._client.list_objects_v2(Bucket=self.bucket, Prefix=self.prefix, MaxKeys=1)
            self._client.upload_fileobj(reader, self.bucket, full, ExtraArgs=extra, Config=TRANSFER)
            head = self._client.head_object(Bucket=self.bucket, Key=full)
        sha256 = reader.sha256.hexdigest()
        etag = str(head.get("ETag", "")).strip('"')
        if head["ContentLength"] != reader.size:
            raise OffsiteError(f"{self.url}/{key} holds {head['ContentLength']} bytes after the "
                               f"upload of {reader.size}: the copy is not complete")
        verified_by = "etag"
        if etag != reader.expected_etag():
            verified_by = "read-back"
            stored = self._sha256(full, key)
            if stored != sha256:
                raise OffsiteError(f"{self.url}/{key} reads back with sha256 {stored}, not the "
                                   f"{sha256} uploaded: the copy is damaged")
        return Stored(key=key, size=reader.size, sha256=sha256, verified_by=verified_by,
                      etag=etag or None, retain_until=retain_until)

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
_PERMISSIONS = "s3:ListBucket, s3:PutObject, s3:GetObject, s3:DeleteObject"


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
