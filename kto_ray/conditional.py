"""Conditional writes of one small file, with which the lease (kto_ray/rundir/lease.py) settles races
where the storage has them; elsewhere (GCS and other pyarrow file systems: GCS's `ifGenerationMatch`
needs a client this project does not have) it settles by write, wait and re-read.

S3: PUT with `If-None-Match: *` (create) or `If-Match: <ETag>` (replace), DELETE with `If-Match`; 412
means someone else wrote first. pyarrow.fs cannot send these headers, so this goes through boto3, to the
same endpoint and region as pyarrow's S3 (kto_ray.storage) and the usual credential chain.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import os
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow.fs as pafs

from kto_ray.storage import Location, resolve, s3_endpoint, s3_region, write_text_atomically

# S3's answers to a condition that does not hold: 412, or 409 while another conditional write of the
# same key is in flight (AWS), or no such key for If-Match on a deleted object.
_CHANGED = {"PreconditionFailed", "ConditionalRequestConflict", "NoSuchKey", "404"}
_UNSUPPORTED = {"NotImplemented", "501"}
_NO_LINKS = {errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS}
# The local guard around a replace or delete: held for a read and a replace, so a beat waits at most
# this long for a taker, and one older than the stale age was left by a writer that died inside it.
_GUARD_WAIT_S, _GUARD_STALE_S = 1.0, 10.0


class ConditionsIgnored(OSError):
    """The storage accepted a conditional write whose condition did not hold, or refused the header."""


@dataclass(frozen=True)
class Versioned:
    text: str
    version: str  # opaque: a content digest locally, the ETag on S3


def conditional_file(location: Location) -> LocalFile | S3File | None:
    """The conditional writes `location`'s storage has, or None (then only plain writes). Each file has
    read() -> Versioned, None when absent; create(text) -> its version, None when one exists;
    replace(text, version) and refresh (a heartbeat's replace) -> the new version, None when the file
    is no longer at `version`; delete(version) -> False when it changed or is gone."""
    if location.is_local:
        return LocalFile(Path(location.path))
    if isinstance(location.fs, pafs.S3FileSystem):
        client = _s3_client(s3_endpoint(), s3_region())
        if client is not None:
            bucket, _, key = location.path.partition("/")
            return S3File(client, bucket, key)
    return None


def _digest(data: bytes) -> str:
    """A local file's version: the digest of its content (every lease written differs)."""
    return hashlib.sha256(data).hexdigest()


class LocalFile:
    """Created by `os.link` of a whole temporary file; replaced (a takeover, a beat) and deleted under
    a guard file that one writer holds at a time, the replace by `os.replace`: a live lease is never
    absent or partly written for a reader."""

    def __init__(self, path: Path):
        self.path = path

    def read(self) -> Versioned | None:
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return None
        return Versioned(data.decode("utf-8"), _digest(data))

    def create(self, text: str) -> str | None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        data = text.encode("utf-8")
        staged = self.path.parent / f".{self.path.name}.tmp-{uuid.uuid4().hex[:8]}"
        try:
            staged.write_bytes(data)
            os.link(staged, self.path)
        except FileExistsError:
            return None
        except OSError as err:
            if err.errno not in _NO_LINKS:
                raise
            return self._create_exclusive(data)
        finally:
            staged.unlink(missing_ok=True)
        return _digest(data)

    def _create_exclusive(self, data: bytes) -> str | None:
        """For file systems without hard links: O_EXCL creates atomically, but a reader may see the
        file before its content (it then looks unreadable, and a taker's claim finds it changed)."""
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return None
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        return _digest(data)

    def replace(self, text: str, version: str, wait_s: float = 0.0) -> str | None:
        """A takeover: one taker at a time holds the guard, so the name is swapped by one `os.replace`
        (never absent, where a newcomer's create could slip in) and only while it is at `version`."""
        with self._guard(wait_s) as held:
            if not held or getattr(self.read(), "version", None) != version:
                return None
            write_text_atomically(resolve(self.path), text)
            return _digest(text.encode("utf-8"))

    def refresh(self, text: str, version: str) -> str | None:
        # The holder's beat waits out a taker's swap (microseconds): a taker that finds the version
        # changed leaves the holder in place, one that does not has taken a stale lease.
        return self.replace(text, version, wait_s=_GUARD_WAIT_S)

    def delete(self, version: str) -> bool:
        with self._guard(wait_s=_GUARD_WAIT_S) as held:
            if not held or getattr(self.read(), "version", None) != version:
                return False
            self.path.unlink(missing_ok=True)
            return True

    @contextlib.contextmanager
    def _guard(self, wait_s: float) -> Iterator[bool]:
        """Whether this writer holds `.<name>.guard` (created with O_EXCL) for the block; a guard older
        than _GUARD_STALE_S was left by a writer that died inside it, and is removed."""
        guard = self.path.parent / f".{self.path.name}.guard"
        deadline = time.monotonic() + wait_s
        while True:
            try:
                os.close(os.open(guard, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
                break
            except FileExistsError:
                with contextlib.suppress(FileNotFoundError):
                    if time.time() - guard.stat().st_mtime > _GUARD_STALE_S:
                        guard.unlink()
                        continue
                if time.monotonic() >= deadline:
                    yield False
                    return
                time.sleep(0.01)
        try:
            yield True
        finally:
            guard.unlink(missing_ok=True)


@functools.lru_cache(maxsize=8)
def _s3_client(endpoint: str | None, region: str | None):
    try:
        import boto3
        from botocore.config import Config
    except ImportError:  # installed without boto3 (pip --no-deps): plain writes only
        return None
    config = Config(connect_timeout=10, read_timeout=30, retries={"mode": "standard", "max_attempts": 3})
    return boto3.client("s3", endpoint_url=endpoint, region_name=region, config=config)


# (endpoint, bucket) pairs whose server was seen to enforce both conditions, in this process.
_ENFORCED: set[tuple[str | None, str]] = set()


class S3File:
    def __init__(self, client, bucket: str, key: str):
        self.client, self.bucket, self.key = client, bucket, key

    def read(self) -> Versioned | None:
        try:
            reply = self._call(self.client.get_object, Bucket=self.bucket, Key=self.key)
        except _Changed:
            return None
        return Versioned(reply["Body"].read().decode("utf-8"), reply["ETag"])

    def create(self, text: str) -> str | None:
        return self._put(text, IfNoneMatch="*")

    def replace(self, text: str, version: str) -> str | None:
        return self._put(text, IfMatch=version)

    refresh = replace

    def delete(self, version: str) -> bool:
        try:
            self._call(self.client.delete_object, Bucket=self.bucket, Key=self.key, IfMatch=version)
        except _Changed:
            return False
        return True

    def _put(self, text: str, **condition: str) -> str | None:
        body = text.encode("utf-8")
        try:
            reply = self._call(
                self.client.put_object, Bucket=self.bucket, Key=self.key, Body=body, **condition
            )
        except _Changed:
            return None
        self._probe(body)
        return reply["ETag"]

    def _probe(self, body: bytes) -> None:
        """Once per bucket: the file exists now, so a create and a replace of another version must both
        fail. (Where they do not, they rewrote our own content: harmless.)"""
        where = (self.client.meta.endpoint_url, self.bucket)
        if where in _ENFORCED:
            return
        for condition in ({"IfNoneMatch": "*"}, {"IfMatch": '"kto-ray-probe"'}):
            try:
                self._call(self.client.put_object, Bucket=self.bucket, Key=self.key, Body=body, **condition)
            except _Changed:
                continue
            raise ConditionsIgnored(f"the S3 endpoint ignores {next(iter(condition))} on PUT")
        _ENFORCED.add(where)

    def _call(self, operation, **params):
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return operation(**params)
        except ClientError as err:
            code = str(err.response.get("Error", {}).get("Code", ""))
            status = str(err.response.get("ResponseMetadata", {}).get("HTTPStatusCode", ""))
            if code in _CHANGED or status in ("404", "412"):
                raise _Changed from None
            if code in _UNSUPPORTED or status == "501":
                raise ConditionsIgnored(f"the S3 endpoint refuses conditional requests ({code})") from None
            raise OSError(f"s3://{self.bucket}/{self.key}: {code or status}: {err}") from None
        except BotoCoreError as err:  # no connection, timeouts: what pyarrow.fs raises as OSError
            raise OSError(f"s3://{self.bucket}/{self.key}: {err}") from None


class _Changed(Exception):
    """The condition did not hold (or, on read, there is no such file)."""
