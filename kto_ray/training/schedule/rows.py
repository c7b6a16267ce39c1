"""The online-reference rows, as workers read them: a table in memory behind a `RowReader`'s interface.

Offline, workers read a store split with `kto_ray.store.reader.RowReader`; online there is no store
(the driver tokenizes the rows itself and the table travels through the object store), so `TableRows`
gives the same `take`/`prefetch`/`close` over that table.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pyarrow as pa


class TableRows:
    """A `RowReader` over a table in memory: the online-reference rows, tokenized by the driver (there
    is no store to read from). Same `take`/`prefetch`/`close`."""

    def __init__(self, table: pa.Table):
        self.table = table

    def prefetch(self, positions: Sequence[int] | np.ndarray) -> None:
        pass  # already in memory

    def take(self, positions: Sequence[int] | np.ndarray) -> pa.Table:
        return self.table.take(pa.array(np.asarray(positions, np.int64), pa.int64()))

    def close(self) -> None:
        pass
