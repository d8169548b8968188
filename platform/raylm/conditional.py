"""Conditional writes on a `Location`: create a file only where none exists, replace one only if it is still the
copy that was read. What lets concurrent writers share a registry on any storage raylm supports, without renaming
directories (object stores have no rename):

- a local or POSIX-shared filesystem (NFS): `O_CREAT | O_EXCL`, and a lock file held around compare-and-replace;
- S3 and S3-compatible stores: `PutObject` with `If-None-Match: *` (create) or `If-Match: <ETag>` (replace), through
  boto3 (`pip install 'raylm[s3]'`), since pyarrow's filesystems have no conditional writes; the endpoint, region and
  credentials come from the location's URI options (`?endpoint_override=...`), else boto3's own chain (AWS_* etc.);
- any other filesystem (`gs://`, `hdfs://`): plain writes, with a warning that concurrent writers are not guarded.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
from pathlib import Path
from typing import Protocol
from urllib.parse import parse_qsl

from raylm.storage import Location

logger = logging.getLogger("raylm")


class ConditionalWrites(Protocol):
    def create(self, location: Location, data: bytes) -> bool:
        """Write `data` unless the file exists; whether it was written."""

    def read(self, location: Location) -> tuple[bytes | None, str | None]:
        """The file's bytes and a tag naming this copy of it, or (None, None) where there is none."""

    def replace(self, location: Location, data: bytes, tag: str | None) -> bool:
        """Write `data` only if the file is still the copy `tag` names (None: only if there is none)."""


def conditional_writes(location: Location) -> ConditionalWrites:
    if location.is_local:
        return LocalWrites()
    if location.fs.type_name == "s3":
        return S3Writes(location)
    return UnguardedWrites(location)


class LocalWrites:
    """POSIX: an exclusive create, and `flock` on a lock file beside the file around compare-and-replace."""

    def create(self, location: Location, data: bytes) -> bool:
        path = Path(location.path)
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        return True

    def read(self, location: Location) -> tuple[bytes | None, str | None]:
        path = Path(location.path)
        if not path.is_file():
            return None, None
        data = path.read_bytes()
        return data, hashlib.sha256(data).hexdigest()

    def replace(self, location: Location, data: bytes, tag: str | None) -> bool:
        path = Path(location.path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path.with_name(f".{path.name}.lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                if self.read(location)[1] != tag:
                    return False
                location.write_bytes(data)  # atomic: a reader sees the old file or the new one
                return True
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)


class S3Writes:
    """S3's conditional `PutObject` (If-None-Match / If-Match), which S3, MinIO, R2 and moto honour."""

    PRECONDITION_FAILED = ("PreconditionFailed", "ConditionalRequestConflict", "412", "409")

    def __init__(self, location: Location):
        self.client = s3_client(location)

    @staticmethod
    def _key(location: Location) -> tuple[str, str]:
        bucket, _, key = location.path.partition("/")
        return bucket, key

    def create(self, location: Location, data: bytes) -> bool:
        return self._put(location, data, IfNoneMatch="*")

    def read(self, location: Location) -> tuple[bytes | None, str | None]:
        bucket, key = self._key(location)
        try:
            found = self.client.get_object(Bucket=bucket, Key=key)
        except self.client.exceptions.NoSuchKey:
            return None, None
        return found["Body"].read(), found["ETag"]

    def replace(self, location: Location, data: bytes, tag: str | None) -> bool:
        return self._put(location, data, **({"IfMatch": tag} if tag is not None else {"IfNoneMatch": "*"}))

    def _put(self, location: Location, data: bytes, **condition: str) -> bool:
        from botocore.exceptions import ClientError

        bucket, key = self._key(location)
        try:
            self.client.put_object(Bucket=bucket, Key=key, Body=data, **condition)
        except ClientError as err:
            error = err.response.get("Error", {})
            status = str(err.response.get("ResponseMetadata", {}).get("HTTPStatusCode", ""))
            if error.get("Code") in self.PRECONDITION_FAILED or status in self.PRECONDITION_FAILED:
                return False
            raise
        return True


def s3_client(location: Location):
    """A boto3 S3 client for the store `location` is on, configured from its URI options as pyarrow reads them."""
    try:
        import boto3
    except ImportError:
        raise RuntimeError(
            f"{location}: registering on S3 needs boto3 for its conditional writes: pip install 'raylm[s3]'"
        ) from None
    options = dict(parse_qsl(location.query))
    endpoint = options.get("endpoint_override")
    if endpoint and "://" not in endpoint:
        endpoint = f"{options.get('scheme', 'https')}://{endpoint}"
    region = options.get("region") or getattr(location.fs, "region", None) or None
    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name=region,
        aws_access_key_id=options.get("access_key"),
        aws_secret_access_key=options.get("secret_key"),
        aws_session_token=options.get("session_token"),
    )


class UnguardedWrites:
    """Filesystems without a conditional write raylm knows: plain writes, said once."""

    def __init__(self, location: Location):
        logger.warning(
            "%s: raylm has no conditional writes for %s, so concurrent registrations and promotions there are not "
            "guarded (use a local or NFS path, or s3://)",
            location,
            location.fs.type_name,
        )

    def create(self, location: Location, data: bytes) -> bool:
        if location.exists():
            return False
        location.write_bytes(data)
        return True

    def read(self, location: Location) -> tuple[bytes | None, str | None]:
        if not location.is_file():
            return None, None
        data = location.read_bytes()
        return data, hashlib.sha256(data).hexdigest()

    def replace(self, location: Location, data: bytes, tag: str | None) -> bool:
        if self.read(location)[1] != tag:
            return False
        location.write_bytes(data)
        return True
