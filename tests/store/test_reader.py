"""SplitIndex and RowReader on real Parquet stores written here (no Ray): rows by position equal to
`read_split(split).take(positions)`, lengths and schedule equal to the table's, read-ahead that reads
each row group once, a bounded cache, errors surfacing on `take`, an s3:// store, a small index."""

from __future__ import annotations

import pickle
import threading

import numpy as np
import pyarrow as pa
import pytest

from kto_ray.errors import StoreDamaged
from kto_ray.store.format import (
    SCHEMA,
    Store,
    row_lengths,
)
from kto_ray.store.reader import RowReader, SplitIndex
from kto_ray.training.schedule.batching import Schedule
from tests.helpers import write_store
from tests.s3server import s3_server


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Store:
    # Old-layout files (one big group), small groups, an odd size: any layout must read the same.
    return write_store(str(tmp_path_factory.mktemp("rows") / "store"), [1000, 64, 100, 37], 600)


@pytest.mark.parametrize("split", ["train", "eval"])
def test_take_equals_read_split_take(store, split):
    table = store.read_split(split)
    index = SplitIndex.build(store, split)
    assert index.rows == len(table) > 0
    rng = np.random.default_rng(1)
    with RowReader(index, cache_bytes=1 << 16) as reader:
        for size in (1, 7, 64, 300):
            positions = rng.choice(len(table), size, replace=False)
            got = reader.take(positions)
            assert str(got.schema) == str(table.schema) == str(SCHEMA)
            assert got.equals(table.take(pa.array(positions)))
        assert reader.take(np.arange(len(table))).equals(table)
        assert reader.take([5, 5, 2]).equals(table.take([5, 5, 2]))
        assert reader.take([]).num_rows == 0
        columns = ["id", "completion_ids", "ref_logps"]
        with RowReader(index, columns=columns) as narrow:
            assert narrow.take([3, 1]).equals(table.select(columns).take([3, 1]))
        with pytest.raises(IndexError):
            reader.take([len(table)])


@pytest.mark.parametrize("grouped", [False, True], ids=["shuffled", "grouped"])
def test_index_lengths_labels_and_schedule_match_the_table(store, grouped):
    table = store.read_split("train")
    index = SplitIndex.build(store, "train")
    np.testing.assert_array_equal(index.lengths, row_lengths(table))
    np.testing.assert_array_equal(index.labels, table["label"].to_numpy(zero_copy_only=False))
    ours = Schedule.for_index(index, workers=2, micro_batch_size=8, accumulation=2, seed=3, group=grouped)
    theirs = Schedule.for_table(table, workers=2, micro_batch_size=8, accumulation=2, seed=3, group=grouped)
    assert ours == theirs
    for step in (0, 1, ours.steps_per_epoch + 2):
        for rank in (0, 1):
            for a, b in zip(ours.rows_for(step, rank), theirs.rows_for(step, rank)):
                np.testing.assert_array_equal(a, b)


def test_prefetch_then_take_reads_each_group_once(store):
    table = store.read_split("train")
    index = SplitIndex.build(store, "train")
    schedule = Schedule.for_index(index, workers=2, micro_batch_size=8, accumulation=3, seed=0, group=False)
    with RowReader(index, cache_bytes=0) as reader:  # no cache: only the read-ahead can save reads
        for step in range(3):
            micro = schedule.rows_for(step, 1)
            before = reader.group_reads
            for rows in micro:
                reader.prefetch(rows)
            for rows in micro:
                assert reader.take(rows).equals(table.take(pa.array(rows)))
            # Each micro-batch's groups read once (micro-batches in flight together may share one).
            distinct = len(np.unique(index.row_group[np.concatenate(micro)]))
            per_micro = sum(len(np.unique(index.row_group[rows])) for rows in micro)
            assert distinct <= reader.group_reads - before <= per_micro
    # A whole-step read-ahead shared by threads taking at the same time.
    with RowReader(index, threads=3) as reader:
        steps = [np.concatenate(schedule.rows_for(step, 0)) for step in range(6)]
        for rows in steps:
            reader.prefetch(rows)
        results: dict[int, pa.Table] = {}
        threads = [
            threading.Thread(target=lambda i=i: results.__setitem__(i, reader.take(steps[i])))
            for i in range(6)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        for i, rows in enumerate(steps):
            assert results[i].equals(table.take(pa.array(rows)))
        assert reader.group_reads == len(np.unique(index.row_group[np.concatenate(steps)]))


def test_cache_is_bounded_and_least_recently_used_goes_first(store):
    index = SplitIndex.build(store, "train")
    small = [g for g in range(len(index.group_rows)) if index.group_rows[g] == 64][:4]
    first = [int(np.flatnonzero(index.row_group == g)[0]) for g in small]
    with RowReader(index) as probe:
        probe.take(first)
        group_bytes = max(table.nbytes for table in probe._cache.values())
    with RowReader(index, cache_bytes=int(group_bytes * 2.5)) as reader:
        for p in first:
            reader.take([p])
            assert reader._cached <= reader.cache_bytes
        assert reader.group_reads == 4 and len(reader._cache) < 4
        reader.take([first[-1]])  # still cached
        assert reader.group_reads == 4
        reader.take([first[0]])  # evicted: read again
        assert reader.group_reads == 5
        reader.take(np.arange(index.rows))  # a group over the budget is never cached
        assert reader._cached <= reader.cache_bytes


def test_a_failed_read_ahead_raises_on_take(tmp_path):
    store = write_store(str(tmp_path / "store"), [50, 50], 100)
    index = SplitIndex.build(store, "train")
    lost = int(np.flatnonzero(index.group_file[index.row_group] == 1)[0])
    store.location.fs.delete_file(index.files[1])
    with RowReader(index) as reader:
        reader.prefetch([lost])  # does not raise: the error belongs to the step that needs the rows
        with pytest.raises(StoreDamaged, match=r"file data-test/part-1\.parquet is damaged \(missing\)"):
            reader.take([lost])
        kept = int(np.flatnonzero(index.group_file[index.row_group] == 0)[0])
        assert reader.take([kept]).num_rows == 1


def test_index_pickles_small(tmp_path):
    store = write_store(str(tmp_path / "store"), [256] * 4, 2500)
    index = SplitIndex.build(store, "train")
    size = len(pickle.dumps(index))
    assert size <= 7 * index.rows + 4096, size / index.rows
    again = pickle.loads(pickle.dumps(index))
    np.testing.assert_array_equal(again.row_offset, index.row_offset)


def test_s3_store(monkeypatch):
    with s3_server() as server:
        for key, value in server.environment().items():
            monkeypatch.setenv(key, value)
        server.create_bucket("rows")
        store = write_store("s3://rows/stores/small", [128, 50, 300], 300, seed=4)
        assert store.path == "s3://rows/stores/small"
        table = store.read_split("train")
        index = pickle.loads(pickle.dumps(SplitIndex.build(store, "train")))  # as a worker gets it
        np.testing.assert_array_equal(index.lengths, row_lengths(table))
        positions = np.random.default_rng(2).permutation(len(table))
        with RowReader(index) as reader:
            for chunk in np.array_split(positions, 10):
                reader.prefetch(chunk)
            for chunk in np.array_split(positions, 10):
                assert reader.take(chunk).equals(table.take(pa.array(chunk)))


@pytest.mark.slow
def test_a_precomputed_store_reads_by_small_row_groups(built_store):
    from kto_ray.reference.precompute import ROW_GROUP_ROWS

    _, store = built_store
    index = SplitIndex.build(store, "train")
    assert 0 < index.group_rows.max() <= ROW_GROUP_ROWS
    table = store.read_split("train")
    positions = np.random.default_rng(0).permutation(len(table))
    with RowReader(index) as reader:
        assert reader.take(positions).equals(table.take(pa.array(positions)))


def test_a_split_with_no_rows(store):
    index = SplitIndex.build(store, "test")
    assert index.rows == 0 and Schedule.for_index(index, 1, 1, 1, 0, group=True).steps_per_epoch == 0
    with RowReader(index) as reader:
        assert reader.take([]).num_rows == 0
