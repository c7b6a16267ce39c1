"""Local folders and object-storage URIs (s3://, gs://) behind one interface: pyarrow.fs, the layer Ray
Data and Ray Train already use.

An S3-compatible endpoint (MinIO, Ceph, a test server) is set the standard way: AWS_ENDPOINT_URL_S3 or
AWS_ENDPOINT_URL in the environment (the AWS config files' `endpoint_url` works where the AWS SDK reads
them). Credentials come from the usual chain (environment, config files, instance roles) and never
from a path: `display()` is what logs and errors show of a location.
"""

from __future__ import annotations

import os
import re
import uuid
from dataclasses import dataclass
from pathlib import Path

import pyarrow.fs as pafs

from kto_ray.errors import UserError

CACHE_ENV = "KTO_RAY_CACHE"  # this machine's cache: file digests, model folders fetched from URIs
_SCHEME = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://")
_USERINFO = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*://)[^/@]*@")


def is_uri(path: str) -> bool:
    return bool(_SCHEME.match(path))


def display(location: str) -> str:
    """A location as logs and errors may show it: no user, key or secret embedded in a URI."""
    return _USERINFO.sub(r"\1", str(location))


def cache_dir() -> Path:
    """$KTO_RAY_CACHE, else $XDG_CACHE_HOME/kto-ray, else ~/.cache/kto-ray (the XDG default)."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    # The XDG spec says a relative $XDG_CACHE_HOME is invalid and must be ignored.
    base = Path(xdg) if xdg and Path(xdg).is_absolute() else Path.home() / ".cache"
    return base / "kto-ray"


@dataclass(frozen=True)
class Location:
    """A file system and a path inside it (no scheme), plus the text the user gave."""

    fs: pafs.FileSystem
    path: str
    given: str

    @property
    def is_local(self) -> bool:
        return isinstance(self.fs, pafs.LocalFileSystem)

    def join(self, *parts: str) -> Location:
        return Location(self.fs, "/".join([self.path.rstrip("/"), *parts]), self.given)

    def __str__(self) -> str:
        return display(self.given)


def resolve(location: str | Path) -> Location:
    """The file system of a local path or a URI; unknown schemes are refused naming the location."""
    given = str(location)
    if not is_uri(given):
        return Location(pafs.LocalFileSystem(), str(Path(given).expanduser().absolute()), given)
    scheme = _SCHEME.match(given).group(1).lower()
    if scheme == "file":
        return resolve(given[len("file://") :])
    try:
        if scheme == "s3":
            return Location(_s3(), given[len("s3://") :].rstrip("/"), given)
        fs, path = pafs.FileSystem.from_uri(given)
    except (pafs.ArrowInvalid, OSError, ValueError) as err:
        raise UserError(f"cannot use storage location {display(given)}: {str(err).splitlines()[0]}") from None
    return Location(fs, path.rstrip("/"), given)


def endpoint_env() -> dict[str, str]:
    """Where object storage is, never who may use it: what the driver passes to its workers, whose
    environment on a joined cluster is the node's, not the driver's. Credentials stay with each node's
    own chain (instance role, its environment)."""
    names = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION")
    return {name: os.environ[name] for name in names if os.environ.get(name)}


def s3_endpoint() -> str | None:
    """The S3-compatible endpoint set in the environment (None: AWS's own), for every S3 client here."""
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")


def s3_region() -> str | None:
    return os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")


def _s3() -> pafs.S3FileSystem:
    # The endpoint is put into the file system object (not left to the SDK's environment lookup) so
    # that a pickled copy, as Ray Data ships to its write tasks, talks to the same server. Region and
    # endpoint None, and scheme https, are pyarrow's defaults.
    endpoint = s3_endpoint()
    scheme = "http" if endpoint and not endpoint.startswith("https") else "https"
    return pafs.S3FileSystem(region=s3_region(), endpoint_override=endpoint, scheme=scheme)


def first_line(err: Exception) -> str:
    """An I/O error as one line fit for a user: its first line, with no credentials in it."""
    return display(str(err).splitlines()[0] if str(err) else type(err).__name__)


def info(location: Location) -> pafs.FileInfo:
    return location.fs.get_file_info(location.path)


def read_text(location: Location) -> str | None:
    """The file's text, or None when there is no such file."""
    if info(location).type != pafs.FileType.File:
        return None
    with location.fs.open_input_stream(location.path) as stream:
        return stream.read().decode("utf-8")


def write_text_atomically(location: Location, text: str) -> None:
    """Replace a file so readers see the old or the new content, never a part: on local disk a
    temporary file renamed over it; on object storage one PUT (objects appear whole)."""
    data = text.encode("utf-8")
    if location.is_local:
        parent = Path(location.path).parent
        parent.mkdir(parents=True, exist_ok=True)
        tmp = parent / f".{Path(location.path).name}.tmp-{uuid.uuid4().hex[:8]}"
        try:
            tmp.write_bytes(data)
            os.replace(tmp, location.path)
        finally:
            tmp.unlink(missing_ok=True)
        return
    with location.fs.open_output_stream(location.path) as stream:
        stream.write(data)


def children(location: Location) -> list[pafs.FileInfo]:
    """Entries directly inside a folder or prefix (none when it does not exist)."""
    if info(location).type != pafs.FileType.Directory:
        return []
    return location.fs.get_file_info(pafs.FileSelector(location.path, recursive=False))


def files_under(location: Location, suffix: str) -> list[str]:
    """Paths (inside the file system) of the files below a folder or prefix ending in `suffix`, sorted."""
    selector = pafs.FileSelector(location.path, recursive=True, allow_not_found=True)
    found = location.fs.get_file_info(selector)
    return sorted(f.path for f in found if f.type == pafs.FileType.File and f.path.endswith(suffix))


def remove_tree(location: Location) -> None:
    """Delete a folder or prefix and everything under it; nothing when it is not there."""
    if info(location).type == pafs.FileType.Directory:
        location.fs.delete_dir(location.path)
