"""The reference store at an s3:// URI, against a real S3-compatible server (moto's, on 127.0.0.1):
written, reused and refused like a local one, nothing of it on local disk; a transient outage during
the write is survived, a lasting one fails in one line naming the URI and keeps the previous store."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow.compute as pc
import pytest
import yaml

from kto_ray.errors import UserError
from kto_ray.reference.precompute import precompute
from kto_ray.storage import files_under, resolve
from kto_ray.store.format import MANIFEST, open_store
from tests.conftest import REPO, make_config

pytestmark = pytest.mark.slow

URI = "s3://kto/stores/small"


def _objects(uri: str) -> list[str]:
    location = resolve(uri)
    return [path[len(location.path) + 1 :] for path in files_under(location, "")]


@pytest.fixture(scope="module")
def s3_store(s3, ray_with_s3, tiny_model, small_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("s3")
    cfg = make_config(tiny_model, small_data, root, store={"path": URI})
    result = precompute(cfg)
    assert not result.reused
    return cfg, result.store, root


def test_store_on_s3_is_written_reused_and_refused(s3_store, built_store, capsys):
    cfg, store, root = s3_store
    # The same rows and reference log-probs as the same config's local store.
    local = built_store[1]
    for split in ("train", "eval"):
        ours, theirs = store.read_split(split), local.read_split(split)
        assert ours["id"].equals(theirs["id"]) and ours["completion_ids"].equals(theirs["completion_ids"])
        assert pc.max(pc.abs(pc.subtract(ours["ref_logps"], theirs["ref_logps"]))).as_py() < 1e-5
    # On the server: the manifest and the Parquet files under the one prefix it names.
    objects = _objects(URI)
    assert MANIFEST in objects
    assert {o.split("/")[0] for o in objects if o != MANIFEST} == {store.manifest.data_dir}
    # Nothing of the store on local disk (the old bug made a folder named "s3:").
    assert not list(root.rglob("*.parquet")) and not (REPO / "s3:").exists() and not Path("s3:").exists()

    capsys.readouterr()
    assert precompute(cfg).reused
    assert "matches the config" in capsys.readouterr().out
    changed = cfg.model_copy(deep=True)
    changed.data.seed += 1
    with pytest.raises(UserError, match=rf"reference store {URI} exists with a different pairing"):
        precompute(changed)
    with pytest.raises(UserError, match=rf"reference store {URI} was built for a different pairing"):
        from kto_ray.models.loading import load_tokenizer
        from kto_ray.store.check import checked_store

        checked_store(changed, load_tokenizer(changed.model))


def _changed_config_file(cfg, root: Path) -> Path:
    changed = cfg.model_copy(deep=True)
    changed.data.seed += 1
    path = root / "changed.yaml"
    path.write_text(yaml.safe_dump(changed.model_dump(mode="json")))
    return path


def _precompute_cli(config: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "kto_ray", "precompute", "--overwrite", "--config", str(config)],
        env=dict(os.environ, RAY_ADDRESS="local"),  # its own Ray, which inherits the endpoint
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_server_stopped_mid_write_fails_in_one_line_and_keeps_the_previous_store(s3, s3_store):
    """Cut the server once the new store's first Parquet file is up, and keep it down: the command
    exits non-zero with one line naming the URI; with the server back, the previous store opens with
    its own fingerprint, and the rerun completes and removes the failed run's prefix."""
    cfg, store, root = s3_store
    config = _changed_config_file(cfg, root)
    proc = _precompute_cli(config)
    cut_at: list[float] = []

    def cut_once_writing() -> None:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None:
            prefixes = {o.split("/")[0] for o in _objects(URI) if "/" in o}
            if len(prefixes) > 1:  # a Parquet file under the new prefix: the write is on
                s3.relay.cut()
                cut_at.append(time.monotonic())
                return
            time.sleep(0.05)

    watcher = threading.Thread(target=cut_once_writing)
    watcher.start()
    try:
        out, err = proc.communicate(timeout=900)
    finally:
        watcher.join()
        s3.relay.restore()
    assert cut_at, "the write ended before the server could be stopped"
    assert proc.returncode != 0
    errors = [line for line in err.splitlines() if line.startswith("kto-ray: error:")]
    assert len(errors) == 1 and URI in errors[0], err[-3000:]
    assert "Traceback" not in err and "kto-ray-test-secret" not in out + err

    kept = open_store(URI, store.manifest.fingerprint)
    assert kept.manifest == store.manifest and kept.read_split("train").equals(store.read_split("train"))
    changed = yaml.safe_load(config.read_text())
    result = precompute(cfg.model_validate(changed), overwrite=True)
    assert not result.reused
    assert result.store.manifest.fingerprint["pairing"] != store.manifest.fingerprint["pairing"]
    # Only the new store's prefix is left: the failed run's and the replaced one are removed.
    assert {o.split("/")[0] for o in _objects(URI) if o != MANIFEST} == {result.store.manifest.data_dir}


def test_an_append_on_s3_commits_a_second_segment(s3, ray_with_s3, tiny_model, small_data, tmp_path):
    """On object storage: the append's Parquet and row digests go under a new
    prefix, the manifest (format 2, two segments) is one PUT, and readers see both segments."""
    from kto_ray.store.reader import RowReader, SplitIndex
    from kto_ray.store.segments import ROW_DIGESTS

    uri = "s3://kto/stores/appended"
    lines = small_data.read_text().splitlines(keepends=True)
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text("".join(lines[:216]))
    b.write_text("".join(lines[216:]))
    cfg = make_config(tiny_model, a, tmp_path, store={"path": uri})
    first = precompute(cfg).store
    cfg.data.paths = [str(a), str(b)]
    result = precompute(cfg)
    assert not result.reused
    manifest = result.store.manifest
    assert manifest.format_version == 3 and manifest.segments[0] == first.manifest.segments[0]
    objects = _objects(uri)
    dirs = manifest.data_dirs()
    assert {o.split("/")[0] for o in objects if o != MANIFEST} == set(dirs) and len(dirs) == 2
    assert all(f"{d}/{ROW_DIGESTS}" in objects for d in dirs)
    rows = [result.store.read_split(split) for split in ("train", "eval")]
    assert sorted(i for t in rows for i in t["id"].to_pylist()) == list(range(240))
    index = SplitIndex.build(result.store, "train")
    assert RowReader(index).take(list(range(index.rows))).equals(rows[0])
    assert not list(tmp_path.rglob("*.parquet"))  # nothing of the store on local disk
