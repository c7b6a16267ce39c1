"""Batch layout and the summed completion log-probs, shared by precompute, training and evaluation.

One function builds the padded tensors and one computes the log-probs, so the reference store and
the training forward see byte-identical inputs (step 0 with policy = reference gives rewards of 0).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from kto_ray.loss import completion_logps


@dataclass(frozen=True)
class PaddedBatch:
    """Right-padded prompt+completion sequences; completion_mask marks the completion tokens."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    completion_mask: torch.Tensor

    @property
    def tokens(self) -> int:
        return int(self.attention_mask.sum())

    def to(self, device: torch.device | str) -> PaddedBatch:
        return PaddedBatch(
            *(
                t.to(device, non_blocking=True)
                for t in (self.input_ids, self.attention_mask, self.completion_mask)
            )
        )


def pad_sequences(
    prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]], pad_id: int
) -> PaddedBatch:
    """Concatenate prompt and completion ids per row and right-pad to the batch's own longest row."""
    lengths = [len(p) + len(c) for p, c in zip(prompts, completions)]
    width = max(lengths, default=1)
    input_ids = np.full((len(lengths), width), pad_id, dtype=np.int64)
    attention = np.zeros((len(lengths), width), dtype=np.int64)
    completion = np.zeros((len(lengths), width), dtype=np.int64)
    for row, (p, c) in enumerate(zip(prompts, completions)):
        n_p, n = len(p), len(p) + len(c)
        input_ids[row, :n_p] = p
        input_ids[row, n_p:n] = c
        attention[row, :n] = 1
        completion[row, n_p:n] = 1
    return PaddedBatch(torch.from_numpy(input_ids), torch.from_numpy(attention), torch.from_numpy(completion))


def sequence_logps(model: torch.nn.Module, batch: PaddedBatch) -> torch.Tensor:
    """Summed completion log-prob per row under `model` (float32).

    Logits are only computed from the position that predicts the batch's first completion token on
    (transformers' `logits_to_keep`): prompts need no vocabulary projection, which for 128k-token
    vocabularies is a large share of the logits' memory and of the head's FLOPs.
    """
    inputs = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask, "use_cache": False}
    width = batch.input_ids.shape[1]
    first = _first_completion_position(batch.completion_mask)
    keep = width - first + 1
    if keep < width and _accepts_logits_to_keep(model):
        logits = model(**inputs, logits_to_keep=keep).logits
        return completion_logps(logits, batch.input_ids[:, -keep:], batch.completion_mask[:, -keep:])
    logits = model(**inputs).logits
    return completion_logps(logits, batch.input_ids, batch.completion_mask)


def _first_completion_position(completion_mask: torch.Tensor) -> int:
    columns = completion_mask.any(dim=0).nonzero()
    return int(columns[0]) if len(columns) else 0


@functools.cache
def _accepts_logits_to_keep_type(model_type: type) -> bool:
    return "logits_to_keep" in inspect.signature(model_type.forward).parameters


def _accepts_logits_to_keep(model: torch.nn.Module) -> bool:
    return _accepts_logits_to_keep_type(type(model))


def length_buckets(lengths: Sequence[int], max_rows: int, max_tokens: int | None = None) -> list[np.ndarray]:
    """Split row indices into batches of similar length (longest first) to keep padding small.

    A batch holds at most `max_rows` rows and, when `max_tokens` is set, at most that many padded tokens.
    """
    order = np.argsort(-np.asarray(lengths), kind="stable")
    batches: list[np.ndarray] = []
    start = 0
    while start < len(order):
        width = lengths[order[start]]
        size = max_rows if max_tokens is None else max(1, min(max_rows, max_tokens // max(width, 1)))
        batches.append(order[start : start + size])
        start += size
    return batches
