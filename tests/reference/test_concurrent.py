"""Two writers of one store. StoreWriter holds the store's lease (kto_ray.rundir.lease) while it writes: a
second writer is refused in one line; a writer whose lease was taken over commits nothing; the
post-commit cleanup never removes a prefix newer than the writer's own. And two real `kto-ray
precompute` processes started at the same moment on one store, on local disk and on S3 (moto's
server on 127.0.0.1): exactly one commits, the other reuses that store or fails in one line naming the
first, and the store is never mixed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from kto_ray.config import with_absolute_paths
from kto_ray.rundir.lease import LEASE, LeaseHeld
from kto_ray.storage import files_under, resolve, write_text_atomically
from kto_ray.store.format import MANIFEST, SCHEMA, open_store
from kto_ray.store.writer import StoreWriter
from tests.conftest import REPO, make_config
from tests.helpers import plain_manifest
from tests.s3server import s3_server

FAST = {"settle": 0.05, "heartbeat": 0.1}
FINGERPRINT = {"data": "d", "reference_weights": "w", "tokenizer": "t", "truncation": "x", "pairing": "p"}


def _write_rows(writer: StoreWriter, n: int = 4) -> None:
    rows = {f.name: [] for f in SCHEMA}
    for i in range(n):
        row = {"id": i, "prompt_ids": [1], "completion_ids": [2], "kl_completion_ids": [3], "kl_id": i}
        row |= {"label": i % 2 == 0, "ref_logps": -1.0, "ref_kl_logps": -2.0, "split": "train"}
        for name, value in row.items():
            rows[name].append(value)
    target = writer.data.join("part-0.parquet")
    pq.write_table(pa.table(rows, schema=SCHEMA), target.path, filesystem=target.fs)


def _manifest(n: int = 4):
    counts = {"train": {"desirable": (n + 1) // 2, "undesirable": n // 2}, "eval": {}}
    return plain_manifest(FINGERPRINT, counts, tokens=3 * n)


def test_a_second_writer_is_refused_in_one_line_and_writes_nothing(tmp_path):
    store = tmp_path / "store"
    with StoreWriter(store, **FAST) as first:
        _write_rows(first)
        with pytest.raises(LeaseHeld) as refused:
            StoreWriter(store, **FAST).__enter__()
        assert "\n" not in str(refused.value)
        assert str(refused.value).startswith(f"{store} is in use by another precompute (host ")
        assert sorted(p.name for p in store.iterdir()) == sorted([first.data_dir, LEASE])
        first.commit(_manifest())
    # Released on exit: only the manifest and the prefix it names are left.
    assert sorted(p.name for p in store.iterdir()) == sorted([first.data_dir, MANIFEST])
    assert open_store(store).read_split("train").num_rows == 4


def test_a_writer_whose_lease_was_taken_over_commits_nothing(tmp_path):
    store = tmp_path / "store"
    with StoreWriter(store, **FAST) as writer:
        _write_rows(writer)
        now = time.time()
        other = {"token": "theirs", "host": "elsewhere", "pid": 1, "what": "precompute"}
        write_text_atomically(
            writer.location.join(LEASE), json.dumps(other | {"started": now, "heartbeat": now})
        )
        with pytest.raises(LeaseHeld, match=r"in use by another precompute \(host elsewhere, pid 1"):
            writer.commit(_manifest())
    assert not (store / MANIFEST).exists()
    assert sorted(p.name for p in store.iterdir()) == [LEASE]  # its prefix gone, their lease kept


def test_cleanup_removes_only_older_unnamed_prefixes(tmp_path):
    store = tmp_path / "store"
    with StoreWriter(store, **FAST) as first:
        _write_rows(first)
        first.commit(_manifest())
    killed = store / "data-20000101-000000-0000dead"  # a killed run's, long ago
    newer = store / "data-29991231-235959-00000new"  # named after ours: may be a live writer's
    for prefix in (killed, newer):
        prefix.mkdir()
        (prefix / "part-0.parquet").write_bytes(b"partial")
    with StoreWriter(store, **FAST) as second:
        _write_rows(second, 6)
        second.commit(_manifest(6))
    left = sorted(p.name for p in store.iterdir())
    assert left == sorted([second.data_dir, newer.name, MANIFEST])  # the replaced and the killed: gone
    assert open_store(store).read_split("train").num_rows == 6


def test_changed_meanwhile_counts_from_what_the_caller_saw(tmp_path):
    store = tmp_path / "store"
    with StoreWriter(store, **FAST) as first:  # commits after the second caller looked (no store)
        _write_rows(first)
        first.commit(_manifest())
    committed = open_store(store).manifest
    with StoreWriter(store, seen=None, **FAST) as late:
        assert late.changed_meanwhile() == committed
    with StoreWriter(store, **FAST) as plain:  # without `seen`: changes since its own start only
        assert plain.changed_meanwhile() is None
    with StoreWriter(store, seen=committed, **FAST) as same:
        assert same.changed_meanwhile() is None


# --- two real precomputes at the same moment ---------------------------------------------------

URI = "s3://kto-concurrent/stores/small"


@pytest.fixture(scope="module")
def s3():
    with s3_server() as server, pytest.MonkeyPatch.context() as patch:
        for key, value in server.environment().items():
            patch.setenv(key, value)
        server.create_bucket("kto-concurrent")
        yield server


def _fingerprint(cfg) -> dict[str, str]:
    from kto_ray.data.prepare import prepare_text
    from kto_ray.models.loading import load_tokenizer
    from kto_ray.store.check import store_fingerprint

    cfg = with_absolute_paths(cfg)
    tokenizer = load_tokenizer(cfg.model)
    return store_fingerprint(cfg, prepare_text(cfg, tokenizer).data_digest, tokenizer)[0]


def _start(config: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "kto_ray", "precompute", "--config", str(config)],
        env=dict(os.environ, RAY_ADDRESS="local"),  # each its own Ray, which inherits the endpoint
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.mark.slow
@pytest.mark.parametrize("on", ["local", "s3"])
def test_two_precomputes_at_the_same_moment_commit_one_store(on, tiny_model, small_data, tmp_path, request):
    path = URI if on == "s3" else str(tmp_path / "store")
    if on == "s3":
        request.getfixturevalue("s3")
    cfg = make_config(tiny_model, small_data, tmp_path, store={"path": path})
    config = tmp_path / "cfg.yaml"
    config.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))

    procs = [_start(config), _start(config)]
    results = [(p, *p.communicate(timeout=300)) for p in procs]
    committed = [r for r in results if "reference store" in r[1] and " rows (train " in r[1]]
    assert len(committed) == 1, [(p.returncode, out, err[-2000:]) for p, out, err in results]
    winner, (other, out, err) = committed[0][0], next(r for r in results if r[0] is not committed[0][0])
    assert winner.returncode == 0
    if other.returncode == 0:  # came late enough to find the committed store: reused it
        outcome = "reused"
        assert "matches the config" in out or "committed by another precompute meanwhile" in out
    else:  # the winner was still writing: one line naming it
        outcome = "refused"
        errors = [line for line in err.splitlines() if line.startswith("kto-ray: error:")]
        assert len(errors) == 1, err[-3000:]
        assert f"{path} is in use by another precompute (host " in errors[0]
        assert f"pid {winner.pid}, since " in errors[0]
        # Ray's own note about its log level is the only other stderr line (README, "Console").
        assert all(line == errors[0] or "Set ray log level" in line for line in err.splitlines()), err
        assert "Traceback" not in err
    print(f"\n{on}: pid {winner.pid} committed; pid {other.pid} {outcome} (exit {other.returncode})")

    # One whole store: the manifest, the one prefix it names, every Parquet file under it, no lease.
    location = resolve(path)
    store = open_store(path, _fingerprint(cfg))  # the config's: whoever committed, it matches
    names = [p[len(location.path) + 1 :] for p in files_under(location, "")]
    assert MANIFEST in names and LEASE not in names
    assert {n.split("/")[0] for n in names if n != MANIFEST} == {store.manifest.data_dir}
    assert all(n.startswith(store.manifest.data_dir + "/") for n in names if n.endswith(".parquet"))
    for split in ("train", "eval"):
        rows = store.read_split(split, ["id", "label"])
        assert rows.num_rows == store.count(split) > 0
        assert sum(rows["label"].to_pylist()) == store.count(split, label=True)
        assert len(set(rows["id"].to_pylist())) == rows.num_rows  # no row twice
    assert store.count("train") + store.count("eval") == len(small_data.read_text().splitlines())
