"""Training and evaluation check a store against the config by the data files' stats: no data byte is
read while they match, the content is compared when they changed."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from kto_ray.errors import UserError
from kto_ray.store.format import MANIFEST, read_manifest
from kto_ray.training.launch.driver import split_rows
from tests.store.conftest import set_mtime


@pytest.fixture
def own_store(built_store, tmp_path, cache):
    """A copy of the built store and of its data file; precompute (reusing it) records the copy's stats."""
    from kto_ray.reference.precompute import precompute

    cfg, store = built_store
    data = tmp_path / "data.jsonl"
    shutil.copyfile(cfg.data.paths[0], data)
    shutil.copytree(store.path, tmp_path / "store")
    tree = cfg.model_dump(mode="json")
    tree["data"]["paths"] = [str(data)]
    tree["store"]["path"] = str(tmp_path / "store")
    own = cfg.model_validate(tree)
    assert precompute(own).reused
    return own, data


class ReadCounter:
    """Counts reads of the data, by the store check or by text preparation."""

    def __init__(self, monkeypatch):
        import kto_ray.data.prepare as prepare
        import kto_ray.store.check as check

        self.calls = 0
        real = prepare.read_examples

        def counting(*args, **kwargs):
            self.calls += 1
            return real(*args, **kwargs)

        for module in (prepare, check):
            monkeypatch.setattr(module, "read_examples", counting)


@pytest.mark.slow
def test_precompute_records_the_data_file_stats(own_store):
    cfg, data = own_store
    manifest = read_manifest(cfg.store.path)
    assert [(f.path, f.size) for f in manifest.data_files] == [(str(data.resolve()), data.stat().st_size)]
    assert manifest.data_files[0].mtime_ns == data.stat().st_mtime_ns


@pytest.mark.slow
def test_train_reads_the_data_only_when_its_stats_change(own_store, built_store, monkeypatch):

    cfg, data = own_store
    reads = ReadCounter(monkeypatch)
    labels = split_rows(cfg, ("train",))["train"].labels
    assert reads.calls == 0
    assert labels.tolist() == built_store[1].read_split("train")["label"].to_pylist()

    set_mtime(data, data.stat().st_mtime + 10)  # touched: same content
    assert split_rows(cfg, ("train",))["train"].labels.tolist() == labels.tolist()
    assert reads.calls == 1

    lines = data.read_text().splitlines()
    data.write_text("\n".join(lines[:200]) + "\n")  # different content
    with pytest.raises(UserError, match="different data"):
        split_rows(cfg, ("train",))
    assert reads.calls == 2


@pytest.mark.slow
def test_a_manifest_without_data_file_stats_is_checked_by_content(own_store, monkeypatch):

    cfg, _ = own_store
    manifest_file = Path(cfg.store.path) / MANIFEST
    old = json.loads(manifest_file.read_text())
    del old["data_files"]  # as written before the field existed
    manifest_file.write_text(json.dumps(old))
    reads = ReadCounter(monkeypatch)
    assert split_rows(cfg, ("train",))["train"].rows > 0
    assert reads.calls == 1


@pytest.mark.slow
def test_evaluate_reads_no_data_when_its_stats_match(own_store, monkeypatch):
    from kto_ray.tools.evaluate import evaluate

    cfg, _ = own_store
    reads = ReadCounter(monkeypatch)
    metrics = evaluate(cfg)
    assert reads.calls == 0 and metrics["rows"] > 0


def test_truncation_policy_is_in_the_fingerprint(tiny_model, small_data, tmp_path, cache, monkeypatch):
    # A store scored under another truncation rule must not match: the policy text is in the hash.
    import kto_ray.store.check as check
    from kto_ray.models.loading import load_tokenizer
    from tests.helpers import make_config

    cfg = make_config(tiny_model, small_data, tmp_path)
    tokenizer = load_tokenizer(cfg.model)
    components, inputs = check.store_fingerprint(cfg, "digest", tokenizer)
    assert "max_prompt_length" in inputs["truncation"]["policy"]
    monkeypatch.setattr(check, "TRUNCATION_POLICY", check.TRUNCATION_POLICY + " (changed)")
    changed, _ = check.store_fingerprint(cfg, "digest", tokenizer)
    assert changed["truncation"] != components["truncation"]
    assert {k: v for k, v in changed.items() if k != "truncation"} == {
        k: v for k, v in components.items() if k != "truncation"
    }
