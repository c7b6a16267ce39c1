"""The reference store: log-probs equal a direct forward, pairing, reuse, fingerprint, atomicity."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from kto_ray.data.prepare import prepare_text
from kto_ray.data.tokenize import tokenize_batch
from kto_ray.errors import UserError
from kto_ray.models.loading import load_tokenizer
from kto_ray.reference.precompute import precompute
from kto_ray.store.fingerprint import FileStat
from kto_ray.store.format import MANIFEST, open_store
from tests.conftest import kill_process_tree, make_config

pytestmark = pytest.mark.slow


def _all_rows(store) -> pa.Table:
    return pa.concat_tables([store.read_split("train"), store.read_split("eval")]).sort_by("id")


def _direct_logp(model, prompt_ids, completion_ids) -> float:
    ids = torch.tensor([list(prompt_ids) + list(completion_ids)])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0].double(), -1)
    n = len(prompt_ids)
    return sum(logp[t - 1, ids[0, t]].item() for t in range(n, ids.shape[1]))


def test_ref_logps_equal_a_direct_transformers_forward(built_store, tiny_model):
    _, store = built_store
    rows = _all_rows(store).take(list(range(0, 240, 20))).to_pylist()
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    for row in rows:
        expected = _direct_logp(model, row["prompt_ids"], row["completion_ids"])
        expected_kl = _direct_logp(model, row["prompt_ids"], row["kl_completion_ids"])
        assert row["ref_logps"] == pytest.approx(expected, abs=1e-4)
        assert row["ref_kl_logps"] == pytest.approx(expected_kl, abs=1e-4)


def test_every_row_once_unique_ids_and_valid_kl_pairs(built_store):
    cfg, store = built_store
    tokenizer = load_tokenizer(cfg.model)
    text = prepare_text(cfg, tokenizer).table.to_pydict()
    table = _all_rows(store).to_pydict()
    assert table["id"] == list(range(len(text["id"])))  # each validated row exactly once
    for i, kl_id in enumerate(table["kl_id"]):
        assert kl_id != i
        assert text["prompt"][kl_id] != text["prompt"][i]
        [expected] = tokenize_batch(
            tokenizer,
            [text["prompt"][i]],
            [text["completion"][kl_id]],
            max_length=cfg.data.max_length,
            max_prompt_length=cfg.data.max_prompt_length,
        )
        assert table["kl_completion_ids"][i] == expected.completion_ids
    counts = store.manifest.counts
    assert sum(counts["train"].values()) + sum(counts["eval"].values()) == len(table["id"])
    assert counts["eval"]["desirable"] + counts["eval"]["undesirable"] == table["split"].count("eval")


def test_pairing_is_deterministic_per_seed(built_store):
    cfg, _ = built_store
    tokenizer = load_tokenizer(cfg.model)
    first = prepare_text(cfg, tokenizer).table["kl_id"].to_pylist()
    again = prepare_text(cfg, tokenizer).table["kl_id"].to_pylist()
    other = prepare_text(cfg.model_copy(update={"data": cfg.data.model_copy(update={"seed": 7})}), tokenizer)
    assert first == again
    assert first != other.table["kl_id"].to_pylist()


def test_manifest_records_the_data_file_stats(built_store, small_data):
    # What training checks before it trusts the store's data fingerprint without re-reading the data.
    _, store = built_store
    assert store.manifest.data_files == [FileStat.of(small_data)]


def test_second_run_reuses_without_model_work(built_store, capsys):
    cfg, store = built_store
    before = (Path(store.path) / MANIFEST).read_text()
    started = time.perf_counter()
    result = precompute(cfg)
    assert result.reused
    assert "reusing it" in capsys.readouterr().out
    assert (Path(store.path) / MANIFEST).read_text() == before
    assert time.perf_counter() - started < 20


def _copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _perturbed_weights(src: Path, dst: Path) -> Path:
    _copy_model(src, dst)
    weights = load_file(dst / "model.safetensors")
    name = sorted(weights)[0]
    weights[name] = weights[name] + 1e-3
    save_file(weights, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def _other_chat_template(src: Path, dst: Path) -> Path:
    _copy_model(src, dst)
    template = dst / "chat_template.jinja"
    config = dst / "tokenizer_config.json"
    if template.exists():
        template.write_text(template.read_text() + "\n")
    else:
        data = json.loads(config.read_text())
        data["chat_template"] = (data.get("chat_template") or "") + "\n"
        config.write_text(json.dumps(data))
    return dst


@pytest.mark.parametrize(
    ("component", "change"),
    [
        ("data", "data"),
        ("reference_weights", "weights"),
        ("tokenizer", "tokenizer"),
        ("truncation", "max_length"),
        ("pairing", "seed"),
        ("dtype", "dtype"),
    ],
)
def test_each_changed_fingerprint_component_is_named(
    built_store, tiny_model, small_data, tmp_path, component, change
):
    cfg, store = built_store
    tree = cfg.model_dump(mode="json")
    if change == "data":
        lines = small_data.read_text().splitlines()[:200]
        (tmp_path / "fewer.jsonl").write_text("\n".join(lines) + "\n")
        tree["data"]["paths"] = [str(tmp_path / "fewer.jsonl")]
    elif change == "weights":
        tree["model"]["path"] = str(_perturbed_weights(tiny_model, tmp_path / "m"))
    elif change == "tokenizer":
        tree["model"]["path"] = str(_other_chat_template(tiny_model, tmp_path / "m"))
    elif change == "max_length":
        tree["data"]["max_length"] = 150
    elif change == "seed":
        tree["data"]["seed"] = 1
    elif change == "dtype":
        tree["precompute"]["dtype"] = "bfloat16"
    changed = cfg.model_validate(tree)
    with pytest.raises(UserError) as info:
        precompute(changed)
    message = str(info.value)
    # Data alone differing is an append, refused at the first stored row the data lacks; any other
    # component refuses the store by its name.
    named = "row 200 of reference store" if component == "data" else f"different {component}"
    assert named in message and "--overwrite" in message
    with pytest.raises(UserError, match=component):
        open_store(store.path, _fingerprint(changed))


def _fingerprint(cfg):
    from kto_ray.store.check import store_fingerprint

    tokenizer = load_tokenizer(cfg.model)
    return store_fingerprint(cfg, prepare_text(cfg, tokenizer).data_digest, tokenizer)[0]


def test_overwrite_replaces_a_mismatched_store(built_store, tmp_path):
    cfg, store = built_store
    copy = tmp_path / "store"
    shutil.copytree(store.path, copy)
    changed = cfg.model_validate(
        cfg.model_dump(mode="json")
        | {"store": {"path": str(copy)}, "data": cfg.data.model_dump() | {"seed": 3}}
    )
    result = precompute(changed, overwrite=True)
    assert not result.reused
    # A build records its phases (kto_ray/rundir/timings.py), the Ray Data pass among them, in order.
    phases = [r["phase"] for r in result.timings]
    assert phases[0] == "process start" and phases[-1] == "ray shut down"
    assert "Ray Data pass: tokenize, score, write" in phases
    assert [r["at"] for r in result.timings] == sorted(r["at"] for r in result.timings)
    assert result.store.manifest.fingerprint["pairing"] != store.manifest.fingerprint["pairing"]
    assert open_store(copy, _fingerprint(changed)).manifest == result.store.manifest
    # The replaced store's data prefix is removed after the commit; the new manifest names the new one.
    assert sorted(p.name for p in copy.iterdir()) == sorted([result.store.manifest.data_dir, MANIFEST])


def test_killed_precompute_leaves_no_complete_looking_store(tiny_model, small_data, ray_local, tmp_path):
    cfg = make_config(tiny_model, small_data, tmp_path)
    config_file = tmp_path / "cfg.yaml"
    config_file.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    env = dict(os.environ, RAY_ADDRESS="local")  # its own Ray, killed with it
    proc = subprocess.Popen(
        [sys.executable, "-m", "kto_ray", "precompute", "--config", str(config_file)],
        env=env,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 180
    store_dir = tmp_path / "store"
    while not list(store_dir.glob("data-*")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert proc.poll() is None, "precompute ended before it could be killed"
    time.sleep(1.0)
    kill_process_tree(proc.pid)
    proc.wait()
    assert not (store_dir / MANIFEST).exists()  # partial data under a prefix, but nothing names it
    with pytest.raises(UserError, match="no reference store"):
        open_store(store_dir)
    result = precompute(cfg)  # the rerun starts clean and completes
    assert not result.reused and (store_dir / MANIFEST).exists()
    # The killed run's prefix is removed after the commit.
    assert sorted(p.name for p in store_dir.iterdir()) == sorted([result.store.manifest.data_dir, MANIFEST])
