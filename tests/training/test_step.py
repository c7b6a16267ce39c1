"""The train step with stand-ins (a plain module + SGD in tests.helpers.PlainEngine, gloo process groups):
no Ray, no DeepSpeed.

SGD is used because its update is proportional to the gradient, so any loss-scaling error shows.
"""

from __future__ import annotations

import os

import pyarrow as pa
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from transformers import LlamaConfig, LlamaForCausalLM

from kto_ray.models.logprobs import pad_sequences, sequence_logps
from kto_ray.objective import kl_raw, kto_loss
from kto_ray.store.format import SCHEMA
from kto_ray.training import step as step_module
from kto_ray.training.distributed import all_reduce_sum
from kto_ray.training.schedule.batching import Schedule, collate
from kto_ray.training.step import LossSettings, train_step
from tests.helpers import PlainEngine

SETTINGS = LossSettings(beta=0.5, desirable_weight=1.3, undesirable_weight=0.8)


def _model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=32,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
        pad_token_id=0,
    )
    return LlamaForCausalLM(config)


def _table(rows: int = 8, labels: list[bool] | None = None) -> pa.Table:
    gen = torch.Generator().manual_seed(1)

    def ids(n):
        return torch.randint(1, 32, (n,), generator=gen).tolist()

    labels = labels or [i % 3 != 0 for i in range(rows)]
    prompts = [ids(3 + i % 4) for i in range(rows)]
    return pa.table(
        {
            "id": list(range(rows)),
            "prompt_ids": prompts,
            "completion_ids": [ids(2 + i % 3) for i in range(rows)],
            "kl_completion_ids": [ids(1 + i % 5) for i in range(rows)],
            "kl_id": [(i + 1) % rows for i in range(rows)],
            "label": labels,
            "ref_logps": (-30 * torch.rand(rows, generator=gen)).tolist(),
            "ref_kl_logps": (-30 * torch.rand(rows, generator=gen)).tolist(),
            "split": ["train"] * rows,
        },
        schema=SCHEMA,
    )


def _run(table, workers, rank, micro, accumulation, reduce=lambda t: t, estimate_kl=True):
    model = _model()
    engine = PlainEngine(model, torch.optim.SGD(model.parameters(), lr=1.0), accumulation)
    schedule = Schedule(len(table), workers, micro, accumulation, seed=0)
    batches = [collate(table, rows, pad_id=0) for rows in schedule.rows_for(0, rank)]
    metrics = train_step(engine, batches, SETTINGS, reduce, workers, estimate_kl=estimate_kl)
    return metrics, engine.module


def test_step_loss_and_z0_match_the_loss_module_on_the_whole_batch():
    table = _table()
    metrics, _ = _run(table, workers=1, rank=0, micro=8, accumulation=1)
    model = _model()
    part = table.to_pydict()
    with torch.no_grad():
        policy = sequence_logps(model, pad_sequences(part["prompt_ids"], part["completion_ids"], 0))
        policy_kl = sequence_logps(model, pad_sequences(part["prompt_ids"], part["kl_completion_ids"], 0))
    z0 = kl_raw(policy_kl, torch.tensor(part["ref_kl_logps"])).clamp(min=0.0)
    expected = kto_loss(
        policy,
        torch.tensor(part["ref_logps"]),
        torch.tensor(part["label"]),
        z0,
        beta=0.5,
        desirable_weight=1.3,
        undesirable_weight=0.8,
    )
    assert metrics["kl"] == pytest.approx(z0.item(), abs=1e-5)
    raw = kl_raw(policy_kl, torch.tensor(part["ref_kl_logps"])).item()
    assert metrics["kl/raw"] == pytest.approx(raw, abs=1e-5)  # unclamped: may be negative
    assert metrics["loss"] == pytest.approx(expected.loss.item(), abs=1e-6)
    assert metrics["count/chosen"] + metrics["count/rejected"] == 8


def test_a_fixed_zero_z0_skips_the_kl_forward_and_uses_z0_0(monkeypatch):
    table = _table()
    estimated, _ = _run(table, workers=1, rank=0, micro=4, accumulation=2)
    assert estimated["kl"] > 0.1  # the estimator would move z0 here: fixing it at 0 must show
    passes = []  # the step's log-prob passes, by batch: policy or KL sequences
    logps = step_module.sequence_logps
    monkeypatch.setattr(step_module, "sequence_logps", lambda m, b, *a: passes.append(b) or logps(m, b, *a))
    fixed, _ = _run(table, workers=1, rank=0, micro=4, accumulation=2, estimate_kl=False)
    assert len(passes) == 2  # the two policy micro-batches; no KL forward
    part = table.to_pydict()
    with torch.no_grad():
        policy = sequence_logps(_model(), pad_sequences(part["prompt_ids"], part["completion_ids"], 0))
    expected = kto_loss(
        policy,
        torch.tensor(part["ref_logps"]),
        torch.tensor(part["label"]),
        torch.tensor(0.0),
        beta=0.5,
        desirable_weight=1.3,
        undesirable_weight=0.8,
    )
    assert fixed["kl"] == 0.0
    assert fixed["loss"] == pytest.approx(expected.loss.item(), abs=1e-6)
    assert fixed["loss"] != pytest.approx(estimated["loss"], abs=1e-3)


def test_micro_batch_times_accumulation_gives_the_same_update():
    table = _table()
    flat_metrics, flat = _run(table, workers=1, rank=0, micro=8, accumulation=1)
    acc_metrics, acc = _run(table, workers=1, rank=0, micro=2, accumulation=4)
    assert acc_metrics["loss"] == pytest.approx(flat_metrics["loss"], abs=1e-6)
    assert acc_metrics["kl"] == pytest.approx(flat_metrics["kl"], abs=1e-6)
    assert acc_metrics["grad_norm"] == pytest.approx(flat_metrics["grad_norm"], rel=1e-4)
    for a, b in zip(flat.parameters(), acc.parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_one_class_step_reports_no_margin():
    # All 8 rows desirable: the rejected mean is 0 by definition and the margin is 0.0, not chosen - 0
    # (`kto_ray.objective`, the same definition as eval and `kto-ray evaluate`).
    table = _table(labels=[True] * 8)
    metrics, _ = _run(table, workers=1, rank=0, micro=4, accumulation=2)
    part = table.to_pydict()
    with torch.no_grad():
        policy = sequence_logps(_model(), pad_sequences(part["prompt_ids"], part["completion_ids"], 0))
    rewards = 0.5 * (policy - torch.tensor(part["ref_logps"]))
    assert (metrics["count/chosen"], metrics["count/rejected"]) == (8, 0)
    assert metrics["rewards/chosen"] == pytest.approx(rewards.mean().item(), abs=1e-5)
    assert abs(metrics["rewards/chosen"]) > 0.1  # so a margin of chosen - 0 would show
    assert metrics["rewards/rejected"] == metrics["logps/rejected"] == 0.0
    assert metrics["rewards/margins"] == 0.0


def test_every_rank_calls_the_same_collectives_in_order():
    # ZeRO-3 hangs if ranks disagree: [KL sum, count], one non-finite flag per micro-batch, the sums.
    calls = []

    def recording(tensor):
        calls.append(tuple(tensor.shape))
        return tensor

    _run(_table(), workers=1, rank=0, micro=2, accumulation=4, reduce=recording)
    assert calls[:5] == [(2,), (1,), (1,), (1,), (1,)]
    assert len(calls) == 6 and len(calls[5]) == 1 and calls[5][0] > 1


def _case_table(case: str) -> pa.Table:
    if case == "mixed":
        return _table()
    # Rank 0 gets only desirable rows and rank 1 only undesirable ones in step 0.
    table = _table(labels=[True] * 4 + [False] * 4)
    schedule = Schedule(8, 2, 4, 1, seed=0)
    order = torch.cat([torch.as_tensor(schedule.rows_for(0, r)[0]) for r in (0, 1)])
    return table.take(pa.array(torch.argsort(order).tolist()))


def _worker(rank: int, init_file: str, case: str, out: dict):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        metrics, model = _run(
            _case_table(case), workers=2, rank=rank, micro=4, accumulation=1, reduce=all_reduce_sum
        )
        if rank == 0:
            out["metrics"] = metrics
            out["params"] = [p.detach().clone() for p in model.parameters()]
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("case", ["mixed", "one-class-per-rank"])
def test_two_ranks_match_one_rank_with_twice_the_batch(tmp_path, case):
    table = _case_table(case)
    if case != "mixed":
        schedule = Schedule(8, 2, 4, 1, seed=0)
        assert collate(table, schedule.rows_for(0, 0)[0], 0).desirable.all()
        assert not collate(table, schedule.rows_for(0, 1)[0], 0).desirable.any()
    one_metrics, one = _run(table, workers=1, rank=0, micro=8, accumulation=1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    with mp.Manager() as manager:
        out = manager.dict()
        mp.start_processes(_worker, args=(str(tmp_path / "pg"), case, out), nprocs=2, start_method="spawn")
        two_metrics, two_params = out["metrics"], out["params"]
    assert two_metrics["loss"] == pytest.approx(one_metrics["loss"], abs=1e-6)
    assert two_metrics["kl"] == pytest.approx(one_metrics["kl"], abs=1e-6)
    assert two_metrics["grad_norm"] == pytest.approx(one_metrics["grad_norm"], rel=1e-4)
    for a, b in zip(one.parameters(), two_params):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
