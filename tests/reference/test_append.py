"""Appending new feedback to a store: A then append B equals A + B built at once,
old rows checked, a killed append keeps the previous store, training reads every segment."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import yaml

from kto_ray.errors import UserError
from kto_ray.objective import desirable_weight
from kto_ray.reference.precompute import precompute
from kto_ray.store.format import MANIFEST, open_store
from kto_ray.store.reader import RowReader, SplitIndex
from kto_ray.store.segments import ROW_DIGESTS
from kto_ray.training.launch.driver import train
from tests.conftest import kill_process_tree, make_config, read_metrics, wait_for

pytestmark = pytest.mark.slow

OLD_ROWS = 216  # of the small data's 240: the append adds 24 rows, 10%


def _config(tiny_model, root: Path, *files: Path, **sections):
    data = {"paths": [str(f) for f in files], **sections.pop("data", {})}
    return make_config(tiny_model, files[0], root, data=data, **sections)


def _rows(store) -> pa.Table:
    return pa.concat_tables([store.read_split("train"), store.read_split("eval")]).sort_by("id")


@pytest.fixture(scope="module")
def stores(tiny_model, small_data, tmp_path_factory, ray_local):
    """A + B built at once; A built, copied aside (`before`), then B appended."""
    root = tmp_path_factory.mktemp("append")
    lines = small_data.read_text().splitlines(keepends=True)
    a, b = root / "a.jsonl", root / "b.jsonl"
    a.write_text("".join(lines[:OLD_ROWS]))
    b.write_text("".join(lines[OLD_ROWS:]))
    full = precompute(_config(tiny_model, root / "full", a, b)).store
    only_a = _config(tiny_model, root / "grown", a)
    shutil.copytree(precompute(only_a).store.path, root / "before")
    before = open_store(root / "before")  # A's store as it was, kept aside
    grown_cfg = _config(tiny_model, root / "grown", a, b)
    appended = precompute(grown_cfg)
    assert not appended.reused
    return {
        "root": root,
        "a": a,
        "b": b,
        "full": full,
        "before": before,
        "grown": appended.store,
        "grown_cfg": grown_cfg,
        "only_a": only_a,
    }


def test_a_then_b_equals_a_and_b_at_once(stores):
    full, grown, before = stores["full"], stores["grown"], stores["before"]
    left, right = _rows(full), _rows(grown)
    assert left.num_rows == right.num_rows > OLD_ROWS - 5
    for column in ("id", "kl_id", "split", "label", "prompt_ids", "completion_ids", "kl_completion_ids"):
        assert left[column].equals(right[column]), column
    # float32 sums, scored beside other rows (other padding) in the two builds: equal to ~1 ulp.
    for column in ("ref_logps", "ref_kl_logps"):
        np.testing.assert_allclose(right[column].to_numpy(), left[column].to_numpy(), rtol=1e-6, atol=1e-6)
    # New rows took KL completions from old rows too (partners are drawn from the rows before).
    ids, kl_ids = right["id"].to_numpy(), right["kl_id"].to_numpy()
    assert np.any((ids >= OLD_ROWS) & (kl_ids < OLD_ROWS))
    # One fingerprint for the whole store, whichever way it was built; two segments, each its own.
    assert grown.manifest.fingerprint == full.manifest.fingerprint
    assert grown.manifest.counts == full.manifest.counts
    assert [len(full.manifest.segments), len(grown.manifest.segments)] == [1, 2]
    assert [full.manifest.format_version, grown.manifest.format_version] == [3, 3]
    old, new = grown.manifest.segments
    assert (old.first_id, old.end_id, new.first_id, new.end_id) == (0, OLD_ROWS, OLD_ROWS, 240)
    assert old == before.manifest.segments[0] and old.data != new.data
    # The old rows were not rewritten: the first segment's files are the ones A's build wrote.
    kept = [Path(f) for f in grown.files() if old.data_dir in f]
    assert [Path(f).read_bytes() for f in before.files()] == [f.read_bytes() for f in kept] != []
    store_dir = Path(grown.path)
    assert sorted(p.name for p in store_dir.iterdir()) == sorted([old.data_dir, new.data_dir, MANIFEST])
    assert (store_dir / new.data_dir / ROW_DIGESTS).is_file()


def test_the_reader_and_the_class_balance_see_every_segment(stores):
    full, grown, cfg = stores["full"], stores["grown"], stores["grown_cfg"]
    auto = cfg.model_copy(update={"train": cfg.train.model_copy(update={"desirable_weight": "auto"})})
    index = SplitIndex.build(grown, "train")
    table = grown.read_split("train")
    assert index.rows == table.num_rows == sum(grown.manifest.counts["train"].values())
    assert RowReader(index).take(list(range(index.rows))).equals(table)
    lam_grown = desirable_weight(auto, index.labels)
    assert lam_grown == desirable_weight(auto, SplitIndex.build(full, "train").labels)
    counts = grown.manifest.counts["train"]
    assert lam_grown == pytest.approx(counts["undesirable"] / counts["desirable"])
    assert lam_grown != desirable_weight(auto, SplitIndex.build(stores["before"], "train").labels)


def test_a_rerun_reuses_the_appended_store(stores, capsys):
    assert precompute(stores["grown_cfg"]).reused
    assert "matches the config" in capsys.readouterr().out


def test_a_changed_or_removed_old_row_is_refused_naming_it(stores, tiny_model):
    root, a, b = stores["root"], stores["a"], stores["b"]
    lines = a.read_text().splitlines(keepends=True)
    edited = root / "edited" / "a.jsonl"
    edited.parent.mkdir()
    edited.write_text("".join([*lines[:9], lines[9].replace('"label": false', '"label": true'), *lines[10:]]))
    assert edited.read_text() != a.read_text()
    store_root = Path(stores["grown"].path).parent
    ed, old_a, new_b = (re.escape(str(p)) for p in (edited, a, b))
    changed = rf"^{ed}:10: differs from row \d+ of reference store .* \(read from {old_a}:10\): .*--overwrite"
    with pytest.raises(UserError, match=changed):
        precompute(_config(tiny_model, store_root, edited, b))
    shorter = root / "edited" / "short.jsonl"
    shorter.write_text("".join(lines[:-1]))  # the last old row removed
    with pytest.raises(
        UserError, match=rf"^{new_b}:1: differs from row \d+ .*\(read from {old_a}:{OLD_ROWS}\)"
    ):
        precompute(_config(tiny_model, store_root, shorter, b))
    with pytest.raises(UserError, match=rf"^{new_b}:1: row \d+ of reference store .* is gone from the data"):
        precompute(_config(tiny_model, store_root, a))  # B's rows removed again
    # Reference, tokenizer, truncation or dtype still refuse the whole store (here with a new row too).
    with pytest.raises(UserError, match="exists with a different data, truncation; pass --overwrite"):
        precompute(_config(tiny_model, store_root, a, b, edited, data={"max_length": 200}))
    assert open_store(stores["grown"].path, stores["grown"].manifest.fingerprint)  # untouched


def test_killed_append_keeps_the_previous_store_and_a_run_resumes_only_on_its_own(stores, tmp_path):
    """A run trains on A's store; an append is killed mid-write (A's store stays whole), rerun, and
    commits; the run, whose checkpoint's schedule was drawn over A's rows, then refuses to resume in one
    line naming the way out, and a new run on the grown store trains from the start."""
    before, path = stores["before"], tmp_path / "store"
    shutil.copytree(before.path, path)
    run = {"dir": str(tmp_path / "runs"), "name": "started-on-a", "checkpoint_every": 1}
    on_a = stores["only_a"].model_copy(deep=True)
    on_a.store.path, on_a.cluster.workers = str(path), 1
    on_a.run = on_a.run.model_copy(update=run)
    on_a.train = on_a.train.model_copy(update={"max_steps": 1, "micro_batch_size": 4})
    assert train(on_a).steps == 1

    grown = on_a.model_copy(update={"data": stores["grown_cfg"].data})
    config_file = tmp_path / "grown.yaml"
    config_file.write_text(yaml.safe_dump(grown.model_dump(mode="json")))
    proc = subprocess.Popen(
        [sys.executable, "-m", "kto_ray", "precompute", "--config", str(config_file)],
        env=dict(os.environ, RAY_ADDRESS="local"),
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_for(lambda: len(list(path.glob("data-*"))) > 1, lambda: proc.poll() is None)  # appending
    time.sleep(1.0)
    assert proc.poll() is None, "the append ended before it could be killed"
    kill_process_tree(proc.pid)
    proc.wait()
    kept = open_store(path, before.manifest.fingerprint)  # the previous store, whole and still valid
    assert _rows(kept).equals(_rows(before)) and kept.manifest == before.manifest
    result = precompute(grown)  # the rerun appends, and removes the killed run's prefix
    assert not result.reused and result.store.manifest.fingerprint == stores["grown"].manifest.fingerprint
    rerun, expected = _rows(result.store), _rows(stores["grown"])
    assert rerun["id"].equals(expected["id"]) and rerun["split"].equals(expected["split"])
    np.testing.assert_allclose(
        rerun["ref_logps"].to_numpy(), expected["ref_logps"].to_numpy(), rtol=1e-6, atol=1e-6
    )
    names = sorted(p.name for p in path.iterdir())
    assert names == sorted([*result.store.manifest.data_dirs(), MANIFEST]) and len(names) == 3

    # The checkpoint's run state names the changed train split first (the store pin, `store.json`, says
    # the same for a checkpoint without one: tests/training/resume/test_store_pin.py).
    with pytest.raises(UserError, match=r"cannot resume from step_.*: the train split .* another run\.name"):
        train(grown)
    grown.run = grown.run.model_copy(update={"name": "on-the-grown-store"})
    result = train(grown)
    assert [r["step"] for r in read_metrics(result.run_dir.local_path)] == [1]
