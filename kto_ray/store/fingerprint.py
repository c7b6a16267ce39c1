"""Fingerprints of the reference store's inputs, cheap to recompute on every run.

Hashing the weight files of a 32B model reads ~65 GB (a minute or more) and would run before every
precompute, train and evaluate. Each file's sha256 is therefore cached in the user's cache folder (the
model folder may be read-only or shared), keyed by (resolved path, size, mtime_ns): the identity `make`
and `rsync` trust. The cache is one small JSON file replaced atomically; an unreadable one only costs a
rehash.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

from kto_ray.errors import UserError
from kto_ray.storage import cache_dir, resolve, write_text_atomically

log = logging.getLogger(__name__)

DIGEST_CACHE = "file-digests.json"
_CACHE_VERSION = 1
# Entries beyond this are dropped oldest first: the file stays small (~200 bytes an entry) to rewrite.
_MAX_ENTRIES = 20_000
_CHUNK = 1 << 24


class FileStat(BaseModel):
    """The identity of a file's content as the file system reports it, without reading it."""

    model_config = ConfigDict(frozen=True)

    path: str  # resolved (absolute, symlinks followed)
    size: int
    mtime_ns: int

    @classmethod
    def of(cls, path: str | Path) -> FileStat:
        target = Path(path).resolve()
        st = target.stat()
        return cls(path=str(target), size=st.st_size, mtime_ns=st.st_mtime_ns)


def sha256_text(*parts: Any) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(json.dumps(part, sort_keys=True, default=str).encode())
        digest.update(b"\0")
    return digest.hexdigest()


def _hash_file(path: Path) -> str:
    """sha256 of a file's bytes: the only place fingerprinting reads weight bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _load_cache(path: Path) -> dict[str, dict[str, Any]]:
    """The cache's entries; anything unreadable or malformed counts as empty (it is only a cache)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict) or data.get("version") != _CACHE_VERSION:
        return {}
    entries = data.get("entries")
    if not isinstance(entries, dict):
        return {}
    return {key: value for key, value in entries.items() if isinstance(value, dict)}


def _cached(entries: dict[str, dict[str, Any]], stat: FileStat) -> str | None:
    entry = entries.get(stat.path)
    if entry is None or entry.get("size") != stat.size or entry.get("mtime_ns") != stat.mtime_ns:
        return None
    digest = entry.get("sha256")
    return digest if isinstance(digest, str) and len(digest) == 64 else None


def _save_cache(path: Path, new: dict[str, dict[str, Any]]) -> None:
    """Merge `new` into the cache file and replace it atomically; failures only cost a later rehash."""
    try:
        # Re-read just before writing so entries another run added meanwhile are kept (best effort:
        # the last writer wins a race, which loses at most that run's entries, never the file).
        entries = _load_cache(path)
        for key in new:
            entries.pop(key, None)  # re-insert last: the newest entries survive the size cap
        entries.update(new)
        entries = dict(list(entries.items())[-_MAX_ENTRIES:])
        payload = json.dumps({"version": _CACHE_VERSION, "entries": entries})
        write_text_atomically(resolve(path), payload)
    except OSError as err:
        log.warning("could not write the digest cache %s (%s); digests will be recomputed", path, err)


def file_digests(files: list[Path]) -> list[str]:
    """sha256 of each file, from its hub blob name, the digest cache, or (only then) its bytes."""
    cache_file = cache_dir() / DIGEST_CACHE
    entries: dict[str, dict[str, Any]] | None = None  # loaded on the first file that needs it
    new: dict[str, dict[str, Any]] = {}
    out = []
    for file in files:
        target = file.resolve()
        if target.parent.name == "blobs" and len(target.name) == 64:
            out.append(target.name)  # hub caches name each LFS blob by its sha256: no need to read it
            continue
        before = FileStat.of(target)
        if entries is None:
            entries = _load_cache(cache_file)
        digest = _cached(entries, before)
        if digest is None:
            digest = _hash_file(target)
            # A file changed while it was read has no single digest for its stat: don't cache it.
            if FileStat.of(target) == before:
                new[before.path] = {"size": before.size, "mtime_ns": before.mtime_ns, "sha256": digest}
        out.append(digest)
    if new:
        _save_cache(cache_file, new)
    return out


def weights_fingerprint(model_dir: str | Path, allow_pickle: bool = False) -> str:
    """Hash of the weight files (not a state_dict walk) of a local model folder: the same whether a
    file's digest came from its bytes or the cache."""
    model_dir = Path(model_dir)
    patterns = ["*.safetensors"] + (["*.bin", "*.pt"] if allow_pickle else [])
    files = sorted({f for pattern in patterns for f in model_dir.glob(pattern)})
    if not files:
        raise UserError(f"no weight files ({', '.join(patterns)}) in {model_dir}")
    return sha256_text(*[(f.name, digest) for f, digest in zip(files, file_digests(files))])


def tokenizer_fingerprint(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    vocab = backend.to_str() if backend is not None else sorted(tokenizer.get_vocab().items())
    return sha256_text(
        vocab, tokenizer.all_special_tokens, getattr(tokenizer, "chat_template", None), tokenizer.padding_side
    )
