"""Padding-free packed batches: a micro-batch's rows back to back in one sequence, position ids
restarting at 0 at every row and no attention mask. transformers 5 reads that layout as packed: its
masking utilities (`masking_utils.find_packed_sequence_indices`, called by `create_causal_mask` and the
sliding-window and chunked variants when `position_ids` are given, the 2D attention mask is None and
there is no cache) build a block-diagonal causal mask for the sdpa, eager and flex_attention kernels,
and the flash-attention kernels turn the restarting positions into varlen `cu_seqlens` (GPU only). No
padding token goes through the model, so a micro-batch costs its real tokens, not rows x its longest row.

Whether a model keeps packed rows apart depends on its modeling code passing `position_ids` on to the
mask and the position embeddings: rather than trusting a list of families, `keeps_rows_apart` checks
the model itself once.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from kto_ray.internals.transformers_private import attention_kernel

if TYPE_CHECKING:
    from kto_ray.models.logprobs import PaddedBatch

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PackedBatch:
    """Rows back to back in one sequence ([1, tokens] each); positions restart at 0 per row.

    completion_mask marks the completion tokens, except each row's first token: it is never
    predicted from inside its row (the padded layout drops column 0 the same way). row_ids gives
    each token's row; lengths each row's token count (to rebuild the padded layout).
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    completion_mask: torch.Tensor
    row_ids: torch.Tensor
    lengths: torch.Tensor
    pad_id: int

    @property
    def rows(self) -> int:
        return len(self.lengths)

    @property
    def tokens(self) -> int:
        """Real tokens (what a lane layout's tails add is not counted)."""
        return int(self.lengths.sum())

    def model_inputs(self) -> dict[str, torch.Tensor]:
        """The forward's inputs: no attention mask, so transformers derives the packed mask."""
        return {"input_ids": self.input_ids, "position_ids": self.position_ids}

    def rows_of(self, predicts_completion: torch.Tensor) -> torch.Tensor:
        """Row index of each position selected by a [1, tokens - 1] mask over the predicting positions."""
        return self.row_ids[:, 1:].to(predicts_completion.device)[predicts_completion]

    def to(self, device: torch.device | str) -> PackedBatch:
        tensors = (self.input_ids, self.position_ids, self.completion_mask, self.row_ids)
        return PackedBatch(
            *(t.to(device, non_blocking=True) for t in tensors), lengths=self.lengths, pad_id=self.pad_id
        )

    def in_lanes(self, width: int) -> PackedBatch:
        """The rows in lanes of `width` tokens ([lanes, width]; `width` at least the longest row),
        placed first-fit longest first; a lane's unused tail is a segment of its own that no
        completion token sees. Attention then costs lanes x width^2, not tokens^2."""
        lengths = self.lengths.tolist()
        width = max([width, *lengths])
        used: list[int] = []  # tokens placed per lane
        place = [0] * self.rows  # each row's flat offset in the [lanes, width] layout
        for row in sorted(range(self.rows), key=lambda r: -lengths[r]):
            lane = next((i for i, u in enumerate(used) if u + lengths[row] <= width), len(used))
            if lane == len(used):
                used.append(0)
            place[row] = lane * width + used[lane]
            used[lane] += lengths[row]
        lanes = max(len(used), 1)
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
        dest = np.concatenate([np.arange(n) + p for n, p in zip(lengths, place)]).astype(np.int64)
        positions = np.concatenate(  # tails restart at 0 too: a segment of their own
            [np.arange(width - u) for u in used] + [np.zeros(0, dtype=np.int64)]
        ).astype(np.int64)
        flat_positions = np.zeros(lanes * width, dtype=np.int64)
        tails = np.ones(lanes * width, dtype=bool)
        tails[dest] = False
        flat_positions[tails] = positions
        flat_positions[dest] = np.arange(sum(lengths)) - np.repeat(starts, lengths)
        device = self.input_ids.device
        index = torch.from_numpy(dest).to(device)

        def spread(values: torch.Tensor, fill: int) -> torch.Tensor:
            out = torch.full((lanes * width,), fill, dtype=values.dtype, device=device)
            return out.index_copy(0, index, values[0]).view(lanes, width)

        return PackedBatch(
            spread(self.input_ids, self.pad_id),
            torch.from_numpy(flat_positions).to(device).view(lanes, width),
            spread(self.completion_mask, 0),
            spread(self.row_ids, 0),
            lengths=self.lengths,
            pad_id=self.pad_id,
        )

    def padded(self) -> PaddedBatch:
        """The same rows right-padded (the fallback for models that cannot keep packed rows apart)."""
        from kto_ray.models.logprobs import PaddedBatch

        device = self.input_ids.device
        lengths = self.lengths.to(device)
        width = int(lengths.max()) if self.rows else 1
        valid = torch.arange(width, device=device)[None, :] < lengths[:, None]
        input_ids = torch.full((self.rows, width), self.pad_id, dtype=self.input_ids.dtype, device=device)
        completion = torch.zeros((self.rows, width), dtype=self.completion_mask.dtype, device=device)
        input_ids[valid] = self.input_ids[0]
        completion[valid] = self.completion_mask[0]
        return PaddedBatch(input_ids, valid.to(torch.int64), completion)


def pack_sequences(
    prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]], pad_id: int
) -> PackedBatch:
    """Concatenate prompt and completion ids per row, and the rows into one sequence (no padding).

    `pad_id` is kept for `PackedBatch.padded`, the fallback layout."""
    lengths = np.asarray([len(p) + len(c) for p, c in zip(prompts, completions)], dtype=np.int64)
    total = int(lengths.sum())
    input_ids = np.empty(total, dtype=np.int64)
    completion = np.zeros(total, dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    for start, p, c in zip(starts, prompts, completions):
        n_p, n = len(p), len(p) + len(c)
        input_ids[start : start + n_p] = p
        input_ids[start + n_p : start + n] = c
        completion[start + max(n_p, 1) : start + n] = 1  # never a row's first token
    row_ids = np.repeat(np.arange(len(lengths), dtype=np.int64), lengths)
    positions = np.arange(total, dtype=np.int64) - np.repeat(starts, lengths)
    return PackedBatch(
        *(torch.from_numpy(a)[None, :] for a in (input_ids, positions, completion, row_ids)),
        lengths=torch.from_numpy(lengths),
        pad_id=pad_id,
    )


def packed_full_logps(model: torch.nn.Module, batch: PackedBatch, extra: dict[str, bool]) -> torch.Tensor:
    """Summed completion log-prob per row of a packed batch through the model's full logits (the
    path for models whose logits are not a plain head; dtype as `logprobs.sequence_logps`). `extra`
    are more forward arguments (an MoE model's `output_router_logits=False`)."""
    logits = model(**batch.model_inputs(), use_cache=False, **extra).logits[:, :-1]
    predicts = batch.completion_mask[:, 1:].bool().to(logits.device)
    logits = logits[predicts].to(torch.promote_types(logits.dtype, torch.float32))
    targets = batch.input_ids[:, 1:].to(logits.device)[predicts]
    token_logps = logits.gather(-1, targets[:, None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)
    rows = batch.rows_of(predicts)
    out = torch.zeros(batch.rows, dtype=token_logps.dtype, device=token_logps.device)
    return out.index_add(0, rows, token_logps)


# The probe's verdict per model object (a model does not change its modeling code or kernel).
_VERDICTS: weakref.WeakKeyDictionary[torch.nn.Module, bool] = weakref.WeakKeyDictionary()
_SAID: set[tuple[str, str]] = set()
PROBE_LENGTH = 6


def layout_for(model: torch.nn.Module, batch: PackedBatch) -> PackedBatch | PaddedBatch:
    """The layout `model` runs `batch` (a flat one, from `pack_sequences`) in: one sequence for the
    flash-attention kernels (varlen: attention costs the sum of each row's length squared); lanes as
    wide as the longest row for the others, whose packed mask is dense (a single sequence would cost
    tokens^2 in attention), unless no two rows share a lane (length-sorted batches): then the padded
    batch is the same work without the packed mask's cost. Padded too where the model cannot keep
    packed rows apart."""
    if not keeps_rows_apart(model):
        return batch.padded()
    if str(attention_kernel(model.config, "")).startswith("flash"):
        return batch
    lanes = batch.in_lanes(int(batch.lengths.max()) if batch.rows else 1)
    return lanes if lanes.input_ids.shape[0] < batch.rows else batch.padded()


def keeps_rows_apart(model: torch.nn.Module) -> bool:
    """Whether `model` computes each row of a packed sequence as if it were alone, checked once by a
    forward of one short row twice back to back (eval mode, no gradients; under ZeRO-3 every rank runs
    it at the same call, as every forward). A kernel or model that leaks attention across rows, ignores
    the restarting positions or refuses `position_ids` fails, and its batches stay padded (said once per
    model class and kernel)."""
    if model not in _VERDICTS:
        _VERDICTS[model] = _probe(model)
        said = (type(model).__name__, str(attention_kernel(model.config, "unknown")))
        if not _VERDICTS[model] and said not in _SAID:
            _SAID.add(said)
            log.warning(
                "%s with %s attention does not keep packed rows apart: its batches stay padded", *said
            )
    return _VERDICTS[model]


def _probe(model: torch.nn.Module) -> bool:
    embeddings = model.get_input_embeddings()
    device = embeddings.weight.device
    vocab = int(getattr(model.config, "vocab_size", 0) or embeddings.num_embeddings)
    row = (torch.arange(PROBE_LENGTH, device=device) * 7 + 1) % vocab
    positions = torch.arange(PROBE_LENGTH, device=device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            alone = model(input_ids=row[None], use_cache=False).logits[0]
            twice = model(
                input_ids=torch.cat([row, row])[None],
                position_ids=torch.cat([positions, positions])[None],
                use_cache=False,
            ).logits[0]
    except (TypeError, ValueError) as err:  # a forward without position_ids, or one that refuses them
        log.debug("packing probe failed: %s", err)
        return False
    finally:
        model.train(was_training)
    tolerance = 1e-3 if twice.dtype.itemsize >= 4 else 5e-2  # fp32 vs half-precision kernels
    alone = alone.float()
    scale = float(alone.abs().max()) or 1.0
    halves = twice.float().split(PROBE_LENGTH)  # the row's first and second copy
    return all(bool(torch.allclose(x, alone, rtol=tolerance, atol=tolerance * scale)) for x in halves)
