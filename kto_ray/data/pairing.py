"""Seeded KL pairing and train/eval split, fixed once when the reference store is built.

KL pairing: KTO's reference point z0 is estimated from mismatched pairs (x_i, y_j): row i's prompt with
the completion of a row j whose prompt differs. The rows are shuffled with numpy's default_rng(seed); in
that order each row is paired with the next row (cyclically) whose prompt differs. Equal prompts are
grouped into runs of consecutive positions, so the partner of every row in a run is the first row of the
next run: O(n), whatever the number of duplicate prompts.
"""

from __future__ import annotations

import numpy as np

from kto_ray.errors import UserError

_SPLIT_STREAM = 0x5EED5  # a second random stream, so the split is not the pairing shuffle's prefix


def kl_partners(prompts: list[str], seed: int) -> list[int]:
    """partner[i] = j, a row whose prompt text differs from row i's (so j != i); deterministic per seed."""
    n = len(prompts)
    ids: dict[str, int] = {}
    codes = np.fromiter((ids.setdefault(p, len(ids)) for p in prompts), dtype=np.int64, count=n)
    if len(ids) < 2:
        raise UserError(
            f"KL pairing needs at least two different prompts, but the data has {len(ids)} distinct "
            f"prompt(s) in {n} rows"
        )
    order = _rng(seed).permutation(n)
    shuffled = codes[order]
    is_start = np.empty(n, dtype=bool)
    is_start[0] = True
    is_start[1:] = shuffled[1:] != shuffled[:-1]
    starts = np.flatnonzero(is_start)  # first position of each run of equal prompts
    run_of = np.cumsum(is_start) - 1  # run index of each position
    next_run = (np.arange(len(starts)) + 1) % len(starts)
    if shuffled[starts[-1]] == shuffled[starts[0]]:
        # the last run wraps into a first run with the same prompt: skip to the run after it, which
        # differs from both (and exists, because this case needs at least three runs)
        next_run[-1] = 1
    partner = np.empty(n, dtype=np.int64)
    partner[order] = order[starts[next_run[run_of]]]
    return partner.tolist()


def split_assignment(n: int, eval_fraction: float, seed: int) -> list[str]:
    """Split label per row ("train" or "eval"): exactly round(n * eval_fraction) seeded eval rows,
    clamped so that a positive fraction with n >= 2 leaves at least one row on each side."""
    if not 0.0 <= eval_fraction < 1.0:
        raise UserError(f"data.eval_fraction must be in [0, 1), got {eval_fraction}")
    n_eval = round(n * eval_fraction)
    if eval_fraction > 0 and n >= 2:
        n_eval = min(max(n_eval, 1), n - 1)
    rng = _rng(seed, _SPLIT_STREAM)
    split = np.full(n, "train", dtype=object)
    split[rng.permutation(n)[:n_eval]] = "eval"
    return split.tolist()


def _rng(seed: int, *stream: int) -> np.random.Generator:
    # numpy seeds must be non-negative; two's complement keeps distinct 64-bit seeds distinct
    entropy = seed % 2**64
    return np.random.default_rng([entropy, *stream] if stream else entropy)
