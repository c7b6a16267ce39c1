"""Rerunning is O(1) in model size: cached weight digests (the data, checked by file stats: test_check.py)."""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import time
from pathlib import Path

import pytest

from kto_ray.storage import cache_dir
from kto_ray.store import fingerprint
from kto_ray.store.fingerprint import DIGEST_CACHE, file_digests, weights_fingerprint
from tests.store.conftest import set_mtime

GIB = 1 << 30


class HashCounter:
    """Wraps the one function that reads weight bytes, counting the files and bytes it hashed."""

    def __init__(self, monkeypatch):
        self.files: list[Path] = []
        self.bytes = 0
        real = fingerprint._hash_file

        def counting(path: Path) -> str:
            self.files.append(path)
            self.bytes += path.stat().st_size
            return real(path)

        monkeypatch.setattr(fingerprint, "_hash_file", counting)


def _weights(folder: Path, **files: bytes) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        (folder / f"{name}.safetensors").write_bytes(content)
    return folder


# slow: the first (cold) fingerprint really hashes 1 GiB, 2-5 s on 2 shared cores. (It was 5 GiB: the warm
# fingerprint reads no weight byte whatever the size, which 1 GiB proves as well, at a fifth of the cost.)
@pytest.mark.slow
def test_second_fingerprint_of_a_1_gib_folder_reads_no_weight_bytes(tmp_path, cache, monkeypatch):
    model = _weights(tmp_path / "model", small=b"weights")
    with open(model / "big-00001-of-00001.safetensors", "wb") as f:
        f.truncate(GIB)  # sparse: costs no disk, still 1 GiB to read and hash
    counter = HashCounter(monkeypatch)
    first = weights_fingerprint(model)
    assert counter.bytes == GIB + len(b"weights")

    counter.bytes, counter.files = 0, []
    started = time.perf_counter()
    second = weights_fingerprint(model)
    elapsed = time.perf_counter() - started
    assert second == first
    assert counter.files == [] and counter.bytes == 0
    assert elapsed < 1.0, f"warm fingerprint took {elapsed:.2f}s"


def test_cached_fingerprint_equals_the_uncached_hash(tmp_path, cache):
    # The cache changes how a digest is found, never its value: stores built before it still match.
    model = _weights(tmp_path / "model", a=b"alpha" * 1000, b=b"beta")
    expected = fingerprint.sha256_text(
        *[(f.name, hashlib.sha256(f.read_bytes()).hexdigest()) for f in sorted(model.glob("*.safetensors"))]
    )
    assert weights_fingerprint(model) == expected  # cold
    assert weights_fingerprint(model) == expected  # warm


def test_rewriting_or_touching_a_file_is_hashed_again(tmp_path, cache, monkeypatch):
    model = _weights(tmp_path / "model", w=b"A" * 64)
    weights = model / "w.safetensors"
    set_mtime(weights, 1_000_000)
    counter = HashCounter(monkeypatch)
    original = weights_fingerprint(model)

    weights.write_bytes(b"B" * 64)  # same size, new content, new mtime
    set_mtime(weights, 1_000_001)
    assert weights_fingerprint(model) != original
    assert len(counter.files) == 2

    weights.write_bytes(b"A" * 64)
    set_mtime(weights, 1_000_002)  # a touch: new mtime, the original content
    assert weights_fingerprint(model) == original
    assert len(counter.files) == 3

    assert weights_fingerprint(model) == original  # unchanged since: from the cache
    assert len(counter.files) == 3


@pytest.mark.parametrize(
    "garbage",
    [b"{not json", b"\x00\xff\xfe", b"[1, 2]", b'{"version": 1, "entries": []}', b""],
    ids=["truncated", "binary", "list", "wrong-entries", "empty"],
)
def test_a_corrupt_cache_is_recomputed_and_replaced(tmp_path, cache, monkeypatch, garbage):
    model = _weights(tmp_path / "model", w=b"weights")
    expected = weights_fingerprint(model)
    (cache / DIGEST_CACHE).write_bytes(garbage)
    counter = HashCounter(monkeypatch)
    assert weights_fingerprint(model) == expected
    assert len(counter.files) == 1
    data = json.loads((cache / DIGEST_CACHE).read_text())  # valid again
    assert str((model / "w.safetensors").resolve()) in data["entries"]


def test_a_cache_entry_with_a_wrong_digest_shape_is_ignored(tmp_path, cache, monkeypatch):
    model = _weights(tmp_path / "model", w=b"weights")
    expected = weights_fingerprint(model)
    data = json.loads((cache / DIGEST_CACHE).read_text())
    for entry in data["entries"].values():
        entry["sha256"] = 12
    (cache / DIGEST_CACHE).write_text(json.dumps(data))
    counter = HashCounter(monkeypatch)
    assert weights_fingerprint(model) == expected
    assert len(counter.files) == 1


def test_an_unwritable_cache_still_fingerprints(tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("the cache folder cannot be created under a file")
    monkeypatch.setenv("KTO_RAY_CACHE", str(blocker / "cache"))
    model = _weights(tmp_path / "model", w=b"weights")
    assert weights_fingerprint(model) == weights_fingerprint(model)


def test_the_cache_lives_in_the_user_cache_folder_never_the_model_folder(tmp_path, monkeypatch):
    home, xdg = tmp_path / "home", tmp_path / "xdg"
    monkeypatch.delenv("KTO_RAY_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(home))
    assert cache_dir() == home / ".cache" / "kto-ray"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/ignored")  # the XDG spec: relative is invalid
    assert cache_dir() == home / ".cache" / "kto-ray"
    monkeypatch.setenv("XDG_CACHE_HOME", str(xdg))
    assert cache_dir() == xdg / "kto-ray"

    model = _weights(tmp_path / "model", w=b"weights")
    before = sorted(model.rglob("*"))
    weights_fingerprint(model)
    assert sorted(model.rglob("*")) == before
    assert (xdg / "kto-ray" / DIGEST_CACHE).is_file()
    assert not home.exists()

    monkeypatch.setenv("KTO_RAY_CACHE", str(tmp_path / "explicit"))
    assert cache_dir() == tmp_path / "explicit"


def test_hub_blobs_are_named_by_their_sha256_and_never_read(tmp_path, cache, monkeypatch):
    content = b"hub weights"
    sha = hashlib.sha256(content).hexdigest()
    blobs = tmp_path / "models--org--m" / "blobs"
    snapshot = tmp_path / "models--org--m" / "snapshots" / "abc"
    blobs.mkdir(parents=True)
    snapshot.mkdir(parents=True)
    (blobs / sha).write_bytes(content)
    (snapshot / "model.safetensors").symlink_to(blobs / sha)
    counter = HashCounter(monkeypatch)
    assert file_digests([snapshot / "model.safetensors"]) == [sha]
    assert counter.files == []
    assert not (cache / DIGEST_CACHE).exists()  # nothing worth caching


def _fingerprint_in_child(args: tuple[str, str]) -> str:
    os.environ["KTO_RAY_CACHE"] = args[1]
    return weights_fingerprint(args[0])


def test_concurrent_runs_leave_a_valid_cache(tmp_path, cache):
    models = [_weights(tmp_path / f"m{i}", w=f"weights {i}".encode() * 1000) for i in range(6)]
    with multiprocessing.get_context("spawn").Pool(3) as pool:
        digests = pool.map(_fingerprint_in_child, [(str(m), str(cache)) for m in models] * 3)
    assert digests == [weights_fingerprint(m) for m in models] * 3
    data = json.loads((cache / DIGEST_CACHE).read_text())
    assert set(data["entries"]) <= {str((m / "w.safetensors").resolve()) for m in models}
    assert not list(cache.glob(".*.tmp"))  # no temporary left behind
