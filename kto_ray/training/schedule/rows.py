"""The online-reference rows: there is no store to read (the driver tokenizes the rows and the table
travels through the object store), so `TableRows` gives a `RowReader`'s `take`/`prefetch`/`close` over
the table in memory."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa


@dataclass
class TableRows:
    """A `RowReader` over a table in memory."""

    table: pa.Table

    def prefetch(self, positions: Sequence[int] | np.ndarray) -> None:
        pass  # already in memory

    def take(self, positions: Sequence[int] | np.ndarray) -> pa.Table:
        return self.table.take(pa.array(np.asarray(positions, np.int64), pa.int64()))

    def close(self) -> None:
        pass
