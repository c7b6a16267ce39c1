"""Rows of one store split, read by position without loading the split anywhere.

The driver builds a `SplitIndex` (where each row lives, its length and label), streamed one row group
at a time. Workers read only their own micro-batches' rows with a `RowReader`: by row group, with a
bounded cache and a read-ahead, so a step does not wait on storage.

Positions are those of `Store.read_split(split)`: `RowReader(index).take(p)` equals
`store.read_split(split).take(p)` and `SplitIndex.lengths` equals `row_lengths` of it, so
`Schedule.for_index` builds the schedule `Schedule.for_table` builds from the table.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from kto_ray.errors import StorageError
from kto_ray.storage import display, resolve
from kto_ray.store.format import SCHEMA, ParquetOpened, Store, checked_read, open_parquet, row_lengths

_INDEX_COLUMNS = ["id", "split", "label", "prompt_ids", "completion_ids", "kl_completion_ids"]
# Read by the scan too, unused: a few bytes a row, so their pages' checksums are verified on the driver
# before any worker starts (a damaged log-prob stops the run before it trains on anything). With the
# index columns (the KL completions give a row's length) that is every column of the schema.
_VERIFIED_COLUMNS = ["kl_id", "ref_logps", "ref_kl_logps"]
# Open files (handle + parsed footer) a reader keeps: a cache hit saves a HEAD and a footer GET on S3.
_OPEN_FILES = 256


def _compact(values: np.ndarray) -> np.ndarray:
    """The smallest unsigned dtype that holds these non-negative integers: the index pickles small."""
    return values.astype(np.min_scalar_type(int(values.max()) if len(values) else 0))


def _concat(parts: list[np.ndarray], dtype: type) -> np.ndarray:
    return np.concatenate(parts) if parts else np.zeros(0, dtype)


def _scan(store: Store, path: str, split: str) -> list[tuple]:
    """Per row group of one file holding rows of `split`: its index and row count, and per such row
    its id, row within the group, length and label. Reads one row group at a time, checked against
    the manifest (`open_parquet`: size, footer, page checksums)."""
    found, columns = [], _INDEX_COLUMNS + _VERIFIED_COLUMNS
    with open_parquet(store, path) as opened:
        parquet = opened.file()
        for g in range(parquet.num_row_groups):
            part = checked_read(
                store, path, lambda g=g: parquet.read_row_group(g, columns=columns, use_threads=False)
            )
            keep = pc.fill_null(pc.equal(part["split"], split), False)  # as read_split's filter
            rows = np.flatnonzero(keep.to_numpy(zero_copy_only=False))
            if len(rows):
                part = part.take(pa.array(rows, pa.int64()))
                labels = part["label"].to_numpy(zero_copy_only=False).astype(bool)
                size = parquet.metadata.row_group(g).num_rows
                found.append((g, size, part["id"].to_numpy(), rows, row_lengths(part), labels))
    return found


@dataclass(frozen=True, eq=False)
class SplitIndex:
    """Where each row of one split lives, in `read_split` order; a few bytes per row, no token ids."""

    path: str  # the store, local folder or URI (Store.path)
    split: str
    files: tuple[str, ...]  # paths inside the store's file system, in Store.files() order
    group_file: np.ndarray  # per row group holding rows of the split: its file number,
    group_index: np.ndarray  # its index in that file
    group_rows: np.ndarray  # and its row count (all splits)
    row_group: np.ndarray  # per row: its row group (an index into the group_* arrays),
    row_offset: np.ndarray  # its row within that group,
    row_length: np.ndarray  # its length (store.format.row_lengths)
    labels: np.ndarray  # and its label (bool)
    store: Store  # its manifest lists each file's size and footer checksum, which readers check

    @classmethod
    def build(cls, store: Store, split: str, threads: int = 4) -> SplitIndex:
        files = store.files()
        # Files scanned in parallel (object storage: latency-bound), results kept in file order.
        with ThreadPoolExecutor(threads) as pool:
            scanned = list(pool.map(lambda path: _scan(store, path, split), files))
        columns: tuple[list, ...] = tuple([] for _ in range(7))
        for number, found in enumerate(scanned):
            for group in found:
                for column, value in zip(columns, (number, *group)):
                    column.append(value)
        group_file, group_index, group_rows, ids, offsets, lengths, labels = columns
        row_group = [np.full(len(rows), g) for g, rows in enumerate(offsets)]
        # read_split sorts by id (a stable sort over the files in this same order): so does the index.
        order = np.argsort(_concat(ids, np.int64), kind="stable")
        return cls(
            path=store.path,
            split=split,
            files=tuple(files),
            group_file=_compact(np.array(group_file, np.int64)),
            group_index=_compact(np.array(group_index, np.int64)),
            group_rows=_compact(np.array(group_rows, np.int64)),
            row_group=_compact(_concat(row_group, np.int64)[order]),
            row_offset=_compact(_concat(offsets, np.int64)[order]),
            row_length=_compact(_concat(lengths, np.int64)[order]),
            labels=_concat(labels, np.bool_)[order],
            store=store,
        )

    @property
    def rows(self) -> int:
        return len(self.row_group)

    @property
    def lengths(self) -> np.ndarray:
        # int64: Schedule sorts by -length, which unsigned storage would wrap.
        return self.row_length.astype(np.int64)


class RowReader:
    """Reads rows of a `SplitIndex` by position, one Parquet row group at a time.

    `take(positions)` returns exactly `store.read_split(split).take(positions)` (restricted to
    `columns`). `prefetch(positions)` starts those reads on background threads; the `take` of the same
    positions then waits only for what is still in flight, and raises any error the reads hit.
    Memory: the row groups cached (at most `cache_bytes`; evicted least recently used), the groups
    being read (at most `threads`), and the rows of pending prefetches (at most `max_pending`).
    Thread-safe.
    """

    def __init__(
        self,
        index: SplitIndex,
        columns: Sequence[str] | None = None,
        # Only a split that (nearly) fits gets cache hits (rows are drawn at random): small by default.
        cache_bytes: int = 16 << 20,
        threads: int = 4,
        max_pending: int = 64,
    ):
        self.index = index
        self.schema = pa.schema([SCHEMA.field(name) for name in (columns or SCHEMA.names)])
        self.cache_bytes, self.max_pending = cache_bytes, max_pending
        self.group_reads = 0  # row groups read from storage (tests and the benchmark count them)
        self._fs = resolve(index.path).fs  # on a worker: S3 endpoint and credentials from its env
        self._lock = threading.Lock()
        self._cache: OrderedDict[int, pa.Table] = OrderedDict()
        self._cached = 0
        self._loading: dict[int, Future[pa.Table]] = {}
        self._files: OrderedDict[int, ParquetOpened] = OrderedDict()
        self._pending: list[tuple[bytes, np.ndarray, list[Future[pa.Table]]]] = []
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="kto-rows")

    def prefetch(self, positions: Sequence[int] | np.ndarray) -> None:
        positions = np.asarray(positions, np.int64)
        job = (positions.tobytes(), *self._submit(positions))
        with self._lock:
            self._pending.append(job)
            dropped, self._pending = self._pending[: -self.max_pending], self._pending[-self.max_pending :]
        for _, _, futures in dropped:  # never taken: the caller moved on
            for future in futures:
                future.cancel()

    def take(self, positions: Sequence[int] | np.ndarray) -> pa.Table:
        positions = np.asarray(positions, np.int64)
        key = positions.tobytes()
        with self._lock:
            job = next((j for j in self._pending if j[0] == key), None)
            if job is not None:
                self._pending.remove(job)
        order, futures = job[1:] if job is not None else self._submit(positions)
        parts = [future.result() for future in futures]  # a failed read-ahead raises here
        if not parts:
            return self.schema.empty_table()
        # The parts hold the rows group by group, i.e. positions[order]: put them back in order.
        return pa.concat_tables(parts).take(pa.array(np.argsort(order), pa.int64()))

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def __enter__(self) -> RowReader:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _submit(self, positions: np.ndarray) -> tuple[np.ndarray, list[Future[pa.Table]]]:
        if len(positions) and (positions.min() < 0 or positions.max() >= self.index.rows):
            raise IndexError(f"row positions outside the {self.index.split} split's {self.index.rows} rows")
        groups = self.index.row_group[positions]
        order = np.argsort(groups, kind="stable")
        unique, starts = np.unique(groups[order], return_index=True)
        offsets = self.index.row_offset[positions].astype(np.int64)
        return order, [
            self._pool.submit(self._rows, int(g), offsets[chunk])
            for g, chunk in zip(unique, np.split(order, starts[1:]))
        ]

    def _rows(self, group: int, offsets: np.ndarray) -> pa.Table:
        return self._group(group).take(pa.array(offsets, pa.int64()))

    def _group(self, group: int) -> pa.Table:
        """The whole row group: cached, being read by another thread (wait for it), or read here."""
        with self._lock:
            table = self._cache.get(group)
            if table is not None:
                self._cache.move_to_end(group)
                return table
            loading = self._loading.get(group)
            mine = loading is None
            if mine:
                loading = self._loading[group] = Future()
        if not mine:
            return loading.result()
        try:
            table = self._read(group)
        except BaseException as err:
            with self._lock:
                del self._loading[group]
            loading.set_exception(err)
            raise
        with self._lock:
            del self._loading[group]
            self.group_reads += 1
            if table.nbytes <= self.cache_bytes:
                self._cache[group] = table
                self._cached += table.nbytes
                while self._cached > self.cache_bytes:
                    self._cached -= self._cache.popitem(last=False)[1].nbytes
        loading.set_result(table)
        return table

    def _read(self, group: int) -> pa.Table:
        number = int(self.index.group_file[group])
        path = self.index.files[number]
        store = self.index.store
        try:
            opened = self._open(number, path)
            # pre_buffer: the group's column chunks in one coalesced request (one GET on S3); every
            # page's checksum is verified as it decodes.
            parquet = opened.file(pre_buffer=True)
            table = checked_read(
                store,
                path,
                lambda: parquet.read_row_group(
                    int(self.index.group_index[group]), columns=self.schema.names, use_threads=False
                ),
            )
        except StorageError as err:
            raise StorageError(
                f"cannot read the {self.index.split} rows of {display(self.index.path)} "
                f"({path.rsplit('/', 1)[-1]}): {err}"
            ) from None
        # read_split's exact types (it reads with the store's SCHEMA): list fields named `item`, not
        # the `element` some writers record; a cast of equal types copies no data.
        return table.cast(self.schema)

    def _open(self, number: int, path: str) -> ParquetOpened:
        with self._lock:
            opened = self._files.get(number)
            if opened is not None:
                self._files.move_to_end(number)
                return opened
        # Positional reads: threads may share it. Its size and footer are checked here, once.
        opened = open_parquet(self.index.store, path, self._fs)
        with self._lock:
            self._files[number] = opened
            if len(self._files) > _OPEN_FILES:
                self._files.popitem(last=False)  # closed once no reader holds it
        return opened
