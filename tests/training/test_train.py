"""Distributed training on a local Ray cluster with real DeepSpeed ZeRO-3 and the tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from kto_ray.models.logprobs import length_buckets, pad_sequences, sequence_logps
from kto_ray.rundir.timings import RANK0_TIMINGS_FILE, TIMINGS_FILE
from kto_ray.store.format import row_lengths
from kto_ray.training.launch.driver import train
from kto_ray.training.schedule.batching import Schedule
from tests.conftest import read_metrics

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("ray_local")]

LR = 1e-3  # one step at this rate: every run's weights are the tiny model's moved by one AdamW step


def _config(built_store, tmp_path, name: str, **sections):
    cfg, _store = built_store
    train = {"max_steps": 1, "micro_batch_size": 4, "lr": LR, "warmup_ratio": 0.0} | sections.pop("train", {})
    run = {"name": name, "dir": str(tmp_path), "checkpoint_every": 1} | sections.pop("run", {})
    tree = cfg.model_dump(mode="json")
    for section, values in {"train": train, "run": run, **sections}.items():
        tree[section] = tree[section] | values
    return cfg.model_validate(tree)


@pytest.fixture(scope="module")
def offline_runs(built_store, tmp_path_factory):
    """One step on 1 worker with micro-batch 8 and on 2 workers with 4 each: the same global batch."""
    root = tmp_path_factory.mktemp("runs")
    one = train(_config(built_store, root, "one", cluster={"workers": 1}, train={"micro_batch_size": 8}))
    two = train(_config(built_store, root, "two", cluster={"workers": 2}))
    return one.run_dir.local_path, two.run_dir.local_path


def test_step_zero_has_zero_rewards_and_kl(offline_runs):
    # Policy == reference at step 0: the store and the training forward must agree.
    for run_dir in offline_runs:
        first = read_metrics(run_dir)[0]
        assert first["step"] == 1
        assert abs(first["rewards/chosen"]) < 1e-4 and abs(first["rewards/rejected"]) < 1e-4
        assert abs(first["kl"]) < 1e-4
        assert first["loss"] == pytest.approx(0.5, abs=1e-4)  # (1 - sigmoid(0)) per row


def test_one_worker_equals_two_workers(offline_runs, built_store):
    one, two = (read_metrics(run_dir)[0] for run_dir in offline_runs)
    assert one["rows"] == two["rows"] == 8
    assert one["kl"] == pytest.approx(two["kl"], abs=1e-6)
    assert one["loss"] == pytest.approx(two["loss"], abs=1e-6)
    assert one["grad_norm"] == pytest.approx(two["grad_norm"], rel=1e-4)
    _assert_same_weights(offline_runs[0], offline_runs[1], built_store)


def test_accumulation_equals_more_workers(offline_runs, built_store, tmp_path):
    # The global batch is the contract (elastic runs, resumes on another worker count): 1 worker with
    # micro-batch 4 and a global batch of 8 accumulates 2 micro-batches, the step 2 workers x 4 take
    # (offline_runs' second). Under ZeRO-3 this failed (grad norm 1.71 vs 2.24) until the step did what
    # DeepSpeed's engine.forward does first (step._begin_forward): every backward overwrote the
    # accumulated gradient.
    accumulated = train(
        _config(built_store, tmp_path, "acc", cluster={"workers": 1}, train={"global_batch_size": 8})
    )
    two = read_metrics(offline_runs[1])[0]
    one = read_metrics(accumulated.run_dir.local_path)[0]
    assert one["rows"] == two["rows"] == 8
    for key in ("loss", "kl", "rewards/chosen", "rewards/rejected"):
        assert one[key] == pytest.approx(two[key], abs=1e-6), key
    assert one["grad_norm"] == pytest.approx(two["grad_norm"], rel=1e-4)
    _assert_same_weights(accumulated.run_dir.local_path, offline_runs[1], built_store)


def test_exported_model_loads_and_moved_away_from_the_reference(offline_runs, built_store):
    _cfg, store = built_store
    rows = store.read_split("eval").slice(0, 8).to_pydict()
    model = AutoModelForCausalLM.from_pretrained(offline_runs[1] / "final", dtype=torch.float32).eval()
    with torch.no_grad():
        logps = sequence_logps(model, pad_sequences(rows["prompt_ids"], rows["completion_ids"], 0))
    assert (logps - torch.tensor(rows["ref_logps"])).abs().max() > 1e-3


def test_online_reference_gives_the_offline_first_step_loss(offline_runs, built_store, tmp_path):
    online = train(
        _config(built_store, tmp_path, "online", reference={"mode": "online"}, run={"export": False})
    )
    offline_first = read_metrics(offline_runs[1])[0]
    online_first = read_metrics(online.run_dir.local_path)[0]
    assert online_first["loss"] == pytest.approx(offline_first["loss"], abs=1e-5)
    assert online_first["kl"] == pytest.approx(offline_first["kl"], abs=1e-5)
    assert online_first["grad_norm"] == pytest.approx(offline_first["grad_norm"], rel=1e-3)


# Resuming (a rerun after a killed driver, after a failed checkpoint write, after a lost worker) is
# tested in test_faults.py.


def test_packed_batches_give_the_padded_step_on_two_workers(offline_runs, built_store, tmp_path):
    # model.packed_batches: the same rows per micro-batch without padding; one optimizer step on 2 ZeRO-3
    # workers equals the padded run's (offline_runs' second), metrics and exported weights.
    packed = train(
        _config(built_store, tmp_path, "packed", cluster={"workers": 2}, model={"packed_batches": True})
    )
    padded_first = _assert_same_first_step(packed.run_dir.local_path, offline_runs[1], built_store)
    assert read_metrics(packed.run_dir.local_path)[0]["tokens"] == padded_first["tokens"]


def _assert_same_first_step(run_dir, reference_dir, built_store) -> dict:
    """The first step's metrics (1e-5) and the exported weights (`_assert_same_weights`) of two 8-row
    runs; returns the reference's first record."""
    reference_first, first = read_metrics(reference_dir)[0], read_metrics(run_dir)[0]
    assert first["rows"] == reference_first["rows"] == 8
    for key in ("loss", "kl", "rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected"):
        assert first[key] == pytest.approx(reference_first[key], abs=1e-5), key
    assert first["grad_norm"] == pytest.approx(reference_first["grad_norm"], rel=1e-5)
    _assert_same_weights(run_dir, reference_dir, built_store)
    return reference_first


# AdamW's first step (torch's eps 1e-8, no weight decay) moves a weight by LR * g / (|g| + eps): by LR
# whatever g's rounding once |g| >> eps, but with the slope LR * eps / (|g| + eps)^2, up to LR / eps
# (1e5), where |g| is near eps. Summing the same rows' gradient in another order (other micro-batch
# cuts, ranks, padded lengths) moves a float32 gradient under 1e-6 by up to 8e-10 (measured on the small
# data's first step, cut by token budget or not); such a weight may then differ by over 1e-5 (1.3e-5 at a
# gradient of 1.2e-8 in layers.0.mlp.down_proj, moved by 0.55 LR) however exact the step.
ADAM_EPS = 1e-8
GRADIENT_ROUNDING = 2e-9  # the float32 difference allowed in one gradient element, 2.5x the measured


def _assert_same_weights(run_dir, reference_dir, built_store) -> None:
    """Two runs' weights after one step agree to 1e-5 (and 1e-5 relative), plus each weight's step
    slope times GRADIENT_ROUNDING: next to nothing for the weights that moved by LR (most of them), up
    to 2e-4 for a gradient at or near zero."""
    cfg, _store = built_store
    initial = load_file(Path(cfg.model.path) / "model.safetensors")
    reference = load_file(reference_dir / "final" / "model.safetensors")
    weights = load_file(run_dir / "final" / "model.safetensors")
    assert weights.keys() == reference.keys() == initial.keys()
    for name, expected in reference.items():
        moved = ((expected - initial[name]).abs() / LR).clamp(max=1.0)  # |g| / (|g| + eps)
        slope = LR / ADAM_EPS * (1.0 - moved) ** 2  # LR * eps / (|g| + eps)^2
        tolerance = 1e-5 + 1e-5 * expected.abs() + slope * GRADIENT_ROUNDING
        excess = (weights[name] - expected).abs() - tolerance
        off = int((excess > 0).sum())
        assert off == 0, f"{name}: {off} weights off, the worst by {excess.max():.2e} over its tolerance"


def _budget_with_uneven_counts(built_store, workers: int, micro: int) -> tuple[int, list[int]]:
    """The smallest token budget under which the ranks of step 0 get different numbers of micro-batches."""
    cfg, store = built_store
    table = store.read_split("train")
    schedule = Schedule.for_table(table, workers, micro, 1, cfg.train.seed, cfg.train.group_by_length)
    lengths = [row_lengths(table.take(schedule.rows_for(0, rank)[0])) for rank in range(workers)]
    for budget in range(1, micro * max(int(x.max()) for x in lengths) + 1):
        counts = [len(length_buckets(x, max_tokens=budget)) for x in lengths]
        if len(set(counts)) > 1:
            return budget, counts
    raise AssertionError("no budget splits the ranks' rows differently")


def test_token_budget_micro_batches_give_the_fixed_step_on_two_workers(offline_runs, built_store, tmp_path):
    # train.micro_batch_tokens: each rank's 4 rows re-cut by tokens, a different number of micro-batches
    # per rank (the one with fewer runs fillers, so ZeRO-3's gathers stay in step); the step equals
    # the one-micro-batch run's (offline_runs' second), metrics and exported weights.
    budget, counts = _budget_with_uneven_counts(built_store, 2, 4)
    assert max(counts) > 1
    run = train(
        _config(built_store, tmp_path, "budget", cluster={"workers": 2}, train={"micro_batch_tokens": budget})
    )
    _assert_same_first_step(run.run_dir.local_path, offline_runs[1], built_store)


def test_runs_record_their_phases(offline_runs):
    # timings.json (the driver's phases) and timings-rank0.json (rank 0's, export included) on one
    # clock: each in order, rank 0's within the driver's launch and the fit's return.
    for run_dir in offline_runs:
        driver = json.loads((run_dir / TIMINGS_FILE).read_text())
        rank0 = json.loads((run_dir / RANK0_TIMINGS_FILE).read_text())
        for records in (driver, rank0):
            assert records[0]["phase"] == "process start"
            assert [r["at"] for r in records] == sorted(r["at"] for r in records)
            assert all(r["seconds"] >= 0 for r in records)
        phases = [r["phase"] for r in driver]
        launched = driver[phases.index("stage resolved, config written")]["at"]
        fitted = next(r["at"] for r in driver if r["phase"].startswith("trainer fit"))
        assert launched <= rank0[1]["at"] and rank0[-1]["at"] <= fitted
        assert [r["phase"] for r in rank0][-1] == "final export"
