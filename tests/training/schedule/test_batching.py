"""The batch schedule: same global batches for any number of workers, equal steps, no repeats,
with and without grouping by length."""

import numpy as np
import pytest

from kto_ray.training.schedule.batching import GROUP_WINDOW_STEPS, Schedule, collate


def _skewed_lengths(rows: int) -> np.ndarray:
    """Pareto-like token counts, as in chat data: most rows short, a few very long."""
    return (np.random.default_rng(7).pareto(1.3, rows) * 40 + 20).astype(np.int64).clip(max=2000)


GROUPING = pytest.mark.parametrize("grouped", [False, True], ids=["shuffled", "grouped"])


@GROUPING
def test_one_worker_with_2b_sees_what_two_workers_with_b_see(grouped):
    lengths = _skewed_lengths(50) if grouped else None
    one = Schedule(rows=50, workers=1, micro_batch_size=8, accumulation=1, seed=3, lengths=lengths)
    two = Schedule(rows=50, workers=2, micro_batch_size=4, accumulation=1, seed=3, lengths=lengths)
    assert one.steps_per_epoch == two.steps_per_epoch == 6
    for step in range(8):
        both = np.concatenate([two.rows_for(step, 0)[0], two.rows_for(step, 1)[0]])
        np.testing.assert_array_equal(one.rows_for(step, 0)[0], both)


def test_micro_batches_times_accumulation_cover_the_same_rows():
    flat = Schedule(rows=40, workers=2, micro_batch_size=4, accumulation=1, seed=0)
    accum = Schedule(rows=40, workers=1, micro_batch_size=2, accumulation=4, seed=0)
    flat_rows = np.concatenate([flat.rows_for(0, 0)[0], flat.rows_for(0, 1)[0]])
    assert sorted(np.concatenate(accum.rows_for(0, 0))) == sorted(flat_rows)


@GROUPING
def test_every_rank_gets_equal_full_micro_batches_and_no_row_repeats_in_an_epoch(grouped):
    lengths = _skewed_lengths(103) if grouped else None
    schedule = Schedule(rows=103, workers=3, micro_batch_size=5, accumulation=2, seed=1, lengths=lengths)
    seen = []
    for step in range(schedule.steps_per_epoch):
        for rank in range(3):
            micro = schedule.rows_for(step, rank)
            assert [len(m) for m in micro] == [5, 5]
            seen.extend(np.concatenate(micro).tolist())
    assert len(seen) == len(set(seen)) == 90  # 103 rows, 13 dropped (drop_last)


@GROUPING
def test_epochs_reshuffle_deterministically(grouped):
    lengths = _skewed_lengths(20) if grouped else None
    schedule = Schedule(rows=20, workers=1, micro_batch_size=10, accumulation=1, seed=5, lengths=lengths)
    assert not np.array_equal(schedule.rows_for(0, 0)[0], schedule.rows_for(2, 0)[0])
    again = Schedule(rows=20, workers=1, micro_batch_size=10, accumulation=1, seed=5, lengths=lengths)
    np.testing.assert_array_equal(schedule.rows_for(3, 0)[0], again.rows_for(3, 0)[0])


def _padded_over_real(schedule: Schedule, lengths: np.ndarray) -> float:
    padded = real = 0
    for step in range(schedule.steps_per_epoch):
        for rows in schedule.rows_for(step, 0):
            padded += len(rows) * int(lengths[rows].max())
            real += int(lengths[rows].sum())
    return padded / real


def test_grouping_by_length_removes_most_padding_and_keeps_steps_shuffled():
    rows = 4 * GROUP_WINDOW_STEPS * 16
    lengths = _skewed_lengths(rows)
    shuffled = Schedule(rows, workers=1, micro_batch_size=16, accumulation=1, seed=0)
    grouped = Schedule(rows, workers=1, micro_batch_size=16, accumulation=1, seed=0, lengths=lengths)
    assert _padded_over_real(shuffled, lengths) > 2.0
    assert _padded_over_real(grouped, lengths) < 1.2
    # The same rows per epoch, in steps whose widths are not in sorted order, and a different order
    # in the next epoch.
    epoch = grouped.steps_per_epoch * grouped.rows_per_step
    assert sorted(grouped.permutation(0)) == sorted(shuffled.permutation(0)[:epoch])
    widths = [int(lengths[grouped.rows_for(step, 0)[0]].max()) for step in range(GROUP_WINDOW_STEPS)]
    assert widths != sorted(widths) and widths != sorted(widths, reverse=True)
    assert not np.array_equal(grouped.permutation(0), grouped.permutation(1))


def test_collate_pads_to_the_batch_longest_row():
    import pyarrow as pa

    from kto_ray.store.format import SCHEMA

    table = pa.table(
        {
            "id": [0, 1],
            "prompt_ids": [[1, 5], [1, 6, 7]],
            "completion_ids": [[8, 2], [9]],
            "kl_completion_ids": [[9], [8, 8, 2]],
            "kl_id": [1, 0],
            "label": [True, False],
            "ref_logps": [-1.0, -2.0],
            "ref_kl_logps": [-3.0, -4.0],
            "split": ["train", "train"],
        },
        schema=SCHEMA,
    )
    batch = collate(table, np.array([1, 0]), pad_id=0)
    assert batch.policy.input_ids.tolist() == [[1, 6, 7, 9], [1, 5, 8, 2]]
    assert batch.policy.completion_mask.tolist() == [[0, 0, 0, 1], [0, 0, 1, 1]]
    assert batch.kl.input_ids.tolist() == [[1, 6, 7, 8, 8, 2], [1, 5, 9, 0, 0, 0]]
    assert batch.kl.attention_mask.tolist() == [[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]]
    assert batch.desirable.tolist() == [False, True]
