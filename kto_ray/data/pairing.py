"""KL pairing and train/eval split. KTO's reference point z0 is estimated from mismatched pairs
(x_i, y_j): row i's prompt with the completion of a row j whose prompt differs. Both the partner and the
split depend only on a row and the rows before it in read order, so a store built from files A + B equals
A's store with B appended, row for row (kto_ray/store/segments.py), and new rows never rescore old ones:

- split: a row is `eval` when a seeded hash of its content (prompt, completion, label) falls below
  `data.eval_fraction`. About that fraction, not exactly; the same row gets the same split wherever it
  sits.
- KL partner: a seeded draw among the `WINDOW` rows just before it, redrawn (up to `DRAWS` times) while
  the drawn row has the same prompt; failing that, the nearest earlier row with another prompt. Rows
  before the first change of prompt (they have no earlier row with another prompt) take the first row
  with another prompt, which exists once there are two distinct prompts. Each row serves as a partner
  about once (the windows overlap evenly); partners lie within WINDOW rows in read order, so ordered
  data pairs near neighbours (as TRL's shift within a batch does).
"""

from __future__ import annotations

import hashlib
import json

import numpy as np

from kto_ray.errors import UserError

WINDOW = 4096
DRAWS = 8
RULE = "stream-v1"  # part of the `pairing` fingerprint: a store records which rule drew its pairs


def row_digest(prompt: str, completion: str, label: bool) -> bytes:
    """A row's identity: 16 bytes of sha256 over its rendered content (as content_fingerprint frames it)."""
    text = json.dumps([prompt, completion, label], ensure_ascii=False).encode()
    return hashlib.sha256(text).digest()[:16]


def split_assignment(digests: list[bytes], eval_fraction: float, seed: int) -> list[str]:
    """ "eval" for the rows whose seeded content hash falls below eval_fraction, else "train"."""
    if not 0.0 <= eval_fraction < 1.0:
        raise UserError(f"data.eval_fraction must be in [0, 1), got {eval_fraction}")
    salt = (seed % 2**64).to_bytes(8, "little")
    threshold = eval_fraction * 2**64
    split = []
    for digest in digests:
        u = int.from_bytes(hashlib.sha256(salt + digest).digest()[:8], "little")
        split.append("eval" if u < threshold else "train")
    return split


def kl_partners(prompts: list[str], seed: int) -> list[int]:
    """partner[i] = j != i with another prompt; depends only on prompts[: i + 1] (and, for the rows
    before the first change of prompt, on the first row after it)."""
    n = len(prompts)
    ids: dict[str, int] = {}
    codes = np.fromiter((ids.setdefault(p, len(ids)) for p in prompts), dtype=np.int64, count=n)
    if len(ids) < 2:
        raise UserError(
            f"KL pairing needs at least two different prompts, but the data has {len(ids)} distinct "
            f"prompt(s) in {n} rows"
        )
    rows = np.arange(n, dtype=np.int64)
    is_start = np.empty(n, dtype=bool)
    is_start[0] = True
    is_start[1:] = codes[1:] != codes[:-1]
    run_start = np.maximum.accumulate(np.where(is_start, rows, 0))
    partner = run_start - 1  # the row just before a row's run of equal prompts: another prompt
    head = partner < 0  # the first run: no earlier row has another prompt
    partner[head] = np.flatnonzero(is_start)[1]
    reach = np.minimum(rows, WINDOW)  # earlier rows a row may draw from
    pending = reach > 0
    for draw in range(DRAWS):
        offset = (_mix(rows, seed, draw) % np.maximum(reach, 1).astype(np.uint64)).astype(np.int64)
        candidate = rows - 1 - offset
        ok = pending & (codes[np.maximum(candidate, 0)] != codes)
        partner[ok] = candidate[ok]
        pending &= ~ok
    return partner.tolist()


def _mix(rows: np.ndarray, seed: int, draw: int) -> np.ndarray:
    """splitmix64 of (seed, draw, row): a seeded, platform-independent 64-bit hash per row."""
    with np.errstate(over="ignore"):
        key = np.uint64((seed * 0x9E3779B97F4A7C15 + draw * 0xBF58476D1CE4E5B9) % 2**64)
        x = rows.astype(np.uint64) * np.uint64(0x94D049BB133111EB) + key  # uint64: wraps mod 2**64
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))
