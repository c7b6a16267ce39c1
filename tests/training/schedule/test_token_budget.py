"""Token-budget micro-batches (train.micro_batch_tokens): the splitting, the ranks' agreement on a count,
and the step's math unchanged, with the stand-ins of test_step (a plain module + SGD, gloo ranks)."""

from __future__ import annotations

import itertools
import os

import numpy as np
import pyarrow as pa
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from kto_ray.models.logprobs import length_buckets
from kto_ray.store.format import SCHEMA, row_lengths
from kto_ray.training.distributed import all_reduce_sum, most_over_ranks
from kto_ray.training.schedule.batching import collate
from kto_ray.training.schedule.token_budget import budget_batches
from kto_ray.training.step import train_step
from tests.helpers import PlainEngine
from tests.training.test_step import SETTINGS, _model


def _cost(lengths: np.ndarray, packed: bool) -> int:
    return int(lengths.sum()) if packed else len(lengths) * int(lengths.max())


def test_rows_are_cut_longest_first_within_the_budget_and_a_long_row_runs_alone():
    lengths = np.array([5, 30, 7, 7, 2, 12])
    padded = length_buckets(lengths, max_tokens=24)
    assert [b.tolist() for b in padded] == [[1], [5, 2], [3, 0, 4]]  # 3 x 7 = 21; 2 x 12 = 24
    packed = length_buckets(lengths, max_tokens=24, packed=True)
    assert [b.tolist() for b in packed] == [[1], [5, 2], [3, 0, 4]]  # 19; 7 + 5 + 2 = 14
    assert [b.tolist() for b in length_buckets(lengths, max_tokens=100, packed=True)] == [[1, 5, 2, 3, 0, 4]]
    assert [b.tolist() for b in length_buckets(lengths, max_tokens=100)] == [
        [1, 5, 2],
        [3, 0, 4],
    ]  # 3 x 30 = 90
    assert [b.tolist() for b in length_buckets(lengths, max_tokens=1)] == [[1], [5], [2], [3], [0], [4]]
    assert length_buckets(np.array([], dtype=np.int64), max_tokens=8) == []
    with pytest.raises(ValueError):
        length_buckets(lengths, max_tokens=0)


@pytest.mark.parametrize("packed", [False, True])
def test_every_row_is_in_one_micro_batch_of_at_most_the_budget(packed):
    rng = np.random.default_rng(3)
    for _ in range(50):
        lengths = rng.integers(1, 200, size=int(rng.integers(1, 40)))
        budget = int(rng.integers(1, 600))
        batches = length_buckets(lengths, max_tokens=budget, packed=packed)
        assert sorted(np.concatenate(batches).tolist()) == list(range(len(lengths)))
        for rows in batches:
            assert len(rows) == 1 or _cost(lengths[rows], packed) <= budget
        # Greedy: the next micro-batch's first row would not have fitted into this one.
        for rows, after in itertools.pairwise(batches):
            assert _cost(lengths[np.append(rows, after[0])], packed) > budget


def test_the_ranks_agree_on_the_most_micro_batches_from_one_sum():
    others = torch.zeros(9)
    others[[2, 7]] = 1.0  # two other ranks with 2 and 7 micro-batches
    calls = []

    def reduce(tensor):
        calls.append(tensor.clone())
        return tensor + others

    assert most_over_ranks(3, 8, reduce) == 7
    assert most_over_ranks(8, 8, reduce) == 8
    assert len(calls) == 2 and calls[0].sum() == 1.0
    with pytest.raises(ValueError):
        most_over_ranks(9, 8, reduce)


def _skewed_table() -> pa.Table:
    """Rows 0-3 long (prompts of 20-26 tokens), rows 4-7 short: the two halves split differently."""
    gen = torch.Generator().manual_seed(2)

    def ids(n):
        return torch.randint(1, 32, (n,), generator=gen).tolist()

    prompt_lengths = [26, 20, 23, 21, 3, 4, 2, 5]
    return pa.table(
        {
            "id": list(range(8)),
            "prompt_ids": [ids(n) for n in prompt_lengths],
            "completion_ids": [ids(2 + i % 3) for i in range(8)],
            "kl_completion_ids": [ids(1 + i % 5) for i in range(8)],
            "kl_id": [(i + 1) % 8 for i in range(8)],
            "label": [i % 3 != 0 for i in range(8)],
            "ref_logps": (-30 * torch.rand(8, generator=gen)).tolist(),
            "ref_kl_logps": (-30 * torch.rand(8, generator=gen)).tolist(),
            "split": ["train"] * 8,
        },
        schema=SCHEMA,
    )


def _step(table: pa.Table, workers: int, budget: int | None, packed: bool = False, reduce=lambda t: t):
    model = _model()
    engine = PlainEngine(model, torch.optim.SGD(model.parameters(), lr=1.0), accumulation=1)
    filler = None
    if budget is None:
        batches = [collate(table, np.arange(len(table)), 0, packed)]
    else:
        batches, filler = budget_batches(table, budget, 0, packed)
    metrics = train_step(engine, batches, SETTINGS, reduce, workers, filler=filler)
    return metrics, model, len(batches)


def _assert_same_step(metrics, model, reference_metrics, reference_model):
    for key in ("loss", "kl", "rewards/chosen", "rewards/rejected", "logps/chosen", "rows", "tokens"):
        assert metrics[key] == pytest.approx(reference_metrics[key], abs=1e-5), key
    assert metrics["grad_norm"] == pytest.approx(reference_metrics["grad_norm"], rel=1e-5)
    for a, b in zip(model.parameters(), reference_model.parameters()):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("packed", [False, True])
def test_token_budget_micro_batches_give_the_step_of_one_micro_batch(packed):
    table = _skewed_table()
    assert row_lengths(table).tolist()[:2] == [26 + 2, 20 + 3]  # prompt + the longer completion
    whole_metrics, whole, _ = _step(table, 1, None, packed)
    budget_metrics, budgeted, count = _step(table, 1, 40, packed)
    assert count > 2  # really cut
    _assert_same_step(budget_metrics, budgeted, whole_metrics, whole)


def _worker(rank: int, init_file: str, out: dict):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        calls = []

        def recording(tensor):
            calls.append(tuple(tensor.shape))
            return all_reduce_sum(tensor)

        half = _skewed_table().slice(4 * rank, 4)  # rank 0 the long rows, rank 1 the short ones
        metrics, model, count = _step(half, 2, 30, reduce=recording)
        out[rank] = (metrics, [p.detach().clone() for p in model.parameters()], count, calls)
    finally:
        dist.destroy_process_group()


def test_ranks_with_different_micro_batch_counts_run_the_same_collectives_and_the_same_step(tmp_path):
    whole_metrics, whole, _ = _step(_skewed_table(), 1, None)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    with mp.Manager() as manager:
        out = manager.dict()
        mp.start_processes(_worker, args=(str(tmp_path / "pg"), out), nprocs=2, start_method="spawn")
        (metrics, params, long_count, long_calls), (_, _, short_count, short_calls) = out[0], out[1]
    assert long_count == 4 and short_count == 2  # rank 1 runs 2 fillers
    assert long_calls == short_calls  # the histogram, [KL sum, count], 4 finite flags, the sums
    assert len(long_calls) == 7
    model = _model()
    with torch.no_grad():
        for p, value in zip(model.parameters(), params):
            p.copy_(value)
    _assert_same_step(metrics, model, whole_metrics, whole)


def test_the_row_cap_and_the_token_cap_cut_together():
    # Longest first: 30 (1), 28 (5), 25 (4), 20 (2), 10 (0), 5 (3); padded cost rows x the first's length.
    lengths = np.array([10, 30, 20, 5, 25, 28])
    both = length_buckets(lengths, max_rows=2, max_tokens=60)
    assert [b.tolist() for b in both] == [[1, 5], [4, 2], [0, 3]]
    tighter = length_buckets(lengths, max_rows=2, max_tokens=50)  # 2 x 30 and 2 x 28 exceed 50
    assert [b.tolist() for b in tighter] == [[1], [5], [4, 2], [0, 3]]
    assert [b.tolist() for b in length_buckets(lengths, max_rows=4)] == [[1, 5, 4, 2], [0, 3]]
