"""Batch layout and the summed completion log-probs, shared by precompute, training and evaluation.

One function builds the padded tensors and one computes the log-probs, so the reference store and
the training forward see byte-identical inputs (step 0 with policy = reference gives rewards of 0).

By default the log-probs never hold the [rows, length, vocab] logits: the decoder's final hidden
states at the completion positions go through the LM head a chunk of tokens at a time (logsumexp and
gather per chunk), and backward recomputes each chunk's logits. At a 152k vocabulary and 2,048 tokens
the full fp32 logits are 1.2 GiB per row before their gradient; a 512-token chunk is 0.3 GiB whatever
the batch, and one forward + backward peaks at 0.19x the full path's memory (BENCHMARKS.md, "Chunked
log-probs").
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from kto_ray.internals.transformers_private import forward_replaced
from kto_ray.models.heads import PLAIN_HEAD, HeadTransform, head_transform, say_once
from kto_ray.models.packing import PackedBatch, layout_for, packed_full_logps
from kto_ray.objective import completion_logps


@dataclass(frozen=True)
class PaddedBatch:
    """Right-padded prompt+completion sequences; completion_mask marks the completion tokens."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    completion_mask: torch.Tensor

    @property
    def tokens(self) -> int:
        return int(self.attention_mask.sum())

    @property
    def rows(self) -> int:
        return int(self.input_ids.shape[0])

    def model_inputs(self) -> dict[str, torch.Tensor]:
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask}

    def rows_of(self, predicts_completion: torch.Tensor) -> torch.Tensor:
        """Row index of each position selected by a [rows, width - 1] mask over the predicting positions."""
        return predicts_completion.nonzero(as_tuple=True)[0]

    def to(self, device: torch.device | str) -> PaddedBatch:
        tensors = (self.input_ids, self.attention_mask, self.completion_mask)
        return PaddedBatch(*(t.to(device, non_blocking=True) for t in tensors))


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


DEFAULT_CHUNK_TOKENS = 512

RouterLogits = tuple[torch.Tensor, ...]


def sequence_logps(
    model: torch.nn.Module,
    batch: PaddedBatch | PackedBatch,
    chunk_tokens: int | None = DEFAULT_CHUNK_TOKENS,
) -> torch.Tensor:
    """Summed completion log-prob per row under `model` (float32; float64 for a float64 model).

    With `chunk_tokens` set (and a head `kto_ray.models.heads` knows), the logits of at most that many
    completion tokens exist at a time, in forward and in backward. With None, or for other models (said
    once), the full logits from the position that predicts the batch's first completion token on
    (transformers' `logits_to_keep`). An MoE model is asked not to record router logits here. A packed
    batch runs in the layout `kto_ray.models.packing.layout_for` picks.
    """
    return _sequence_logps(model, batch, chunk_tokens, router_logits=False)[0]


def sequence_logps_and_router_logits(
    model: torch.nn.Module, batch: PaddedBatch, chunk_tokens: int | None = DEFAULT_CHUNK_TOKENS
) -> tuple[torch.Tensor, RouterLogits]:
    """`sequence_logps` and the router logits of every MoE layer (transformers' `router_logits`,
    [rows x length, experts] each) from the same forward, for the load-balancing loss."""
    logps, router = _sequence_logps(model, batch, chunk_tokens, router_logits=True)
    if router is None:
        raise ValueError(f"{type(model).__name__} returned no router logits")
    return logps, router


def _sequence_logps(
    model: torch.nn.Module, batch: PaddedBatch, chunk_tokens: int | None, router_logits: bool
) -> tuple[torch.Tensor, RouterLogits | None]:
    # Models that know the flag (their config has it) get it explicitly either way: one whose config
    # sets it would otherwise record router logits on every forward (precompute, the KL pass).
    knows = getattr(getattr(model, "config", None), "output_router_logits", None) is not None
    extra = {"output_router_logits": router_logits} if router_logits or knows else {}
    if isinstance(batch, PackedBatch):
        # The load-balancing loss weighs tokens by an attention mask [rows, length]: rows whose
        # router logits it needs run padded.
        batch = batch.padded() if router_logits else layout_for(model, batch)
    if chunk_tokens is not None:
        parts = _decoder_and_head(model)
        if parts is not None:
            return _chunked_sequence_logps(*parts, batch, chunk_tokens, extra)
    if isinstance(batch, PackedBatch):
        return packed_full_logps(model, batch, extra), None
    return _full_sequence_logps(model, batch, extra)


def _full_sequence_logps(
    model: torch.nn.Module, batch: PaddedBatch, extra: dict[str, bool]
) -> tuple[torch.Tensor, RouterLogits | None]:
    inputs = {**batch.model_inputs(), "use_cache": False, **extra}
    width = batch.input_ids.shape[1]
    columns = batch.completion_mask.any(dim=0).nonzero()
    keep = width - (int(columns[0]) if len(columns) else 0) + 1
    if keep < width and _accepts_logits_to_keep(type(model)):
        out = model(**inputs, logits_to_keep=keep)
        logps = completion_logps(out.logits, batch.input_ids[:, -keep:], batch.completion_mask[:, -keep:])
    else:
        out = model(**inputs)
        logps = completion_logps(out.logits, batch.input_ids, batch.completion_mask)
    return logps, getattr(out, "router_logits", None)


def _decoder_and_head(
    model: torch.nn.Module,
) -> tuple[torch.nn.Module, torch.nn.Linear, HeadTransform] | None:
    """The base model that returns hidden states, the linear LM head and what turns its output into
    the logits; None (said once) when the model's logits are anything else."""
    get_decoder = getattr(model, "get_decoder", None)
    get_head = getattr(model, "get_output_embeddings", None)
    decoder = get_decoder() if get_decoder is not None else None
    head = get_head() if get_head is not None else None
    if decoder is None or decoder is model or not isinstance(head, torch.nn.Linear):
        say_once(model, "it has no separate decoder and linear LM head")
        return None
    transform = head_transform(model)
    if transform is None:
        return None
    return decoder, head, transform


def _chunked_sequence_logps(
    decoder: torch.nn.Module,
    head: torch.nn.Linear,
    transform: HeadTransform,
    batch: PaddedBatch | PackedBatch,
    chunk_tokens: int,
    extra: dict[str, bool],
) -> tuple[torch.Tensor, RouterLogits | None]:
    out = decoder(**batch.model_inputs(), use_cache=False, **extra)
    hidden = out.last_hidden_state
    # Position t's hidden state predicts token t + 1: keep only the positions that predict completion
    # tokens, flattened over rows ([tokens, hidden]); padding and prompts never reach the head.
    # A reference spread over GPUs (device_map) ends its decoder on another device than its inputs.
    device = head.weight.device
    predicts_completion = batch.completion_mask[:, 1:].bool().to(hidden.device)
    rows = batch.rows_of(predicts_completion).to(device)
    states = hidden[:, :-1][predicts_completion].to(device)
    targets = batch.input_ids[:, 1:].to(hidden.device)[predicts_completion].to(device)
    with forward_replaced(
        head,
        lambda h: _ChunkedTokenLogps.apply(h, head.weight, head.bias, targets, chunk_tokens, transform),
    ):
        # Called as a module so DeepSpeed ZeRO-3's hooks gather its partitioned (possibly tied)
        # weight for forward, gather it again for backward, and reduce its gradient, exactly as for
        # the model's own call of the head.
        token_logps = head(states)
    logps = torch.zeros(batch.rows, dtype=token_logps.dtype, device=token_logps.device)
    return logps.index_add(0, rows, token_logps), getattr(out, "router_logits", None)


class _ChunkedTokenLogps(torch.autograd.Function):
    """log p(target) per token from hidden states [N, H] through a linear head and its `transform`
    (soft-cap, scale), `chunk` tokens at a time.

    Forward keeps only the per-token logsumexp; backward recomputes each chunk's logits, turns them into
    d logp / d z = (onehot(target) - softmax) * d logits / d z (z the head's output), and accumulates
    the hidden-state and head gradients.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk, transform=PLAIN_HEAD):
        dtype = torch.promote_types(hidden.dtype, torch.float32)  # fp32 at least, fp64 in fp64 tests
        token_logps = torch.empty(hidden.shape[0], dtype=dtype, device=hidden.device)
        logsumexp = torch.empty_like(token_logps)
        for start in range(0, hidden.shape[0], chunk):
            part = slice(start, start + chunk)
            logits = transform.logits(torch.nn.functional.linear(hidden[part], weight, bias).to(dtype))
            logsumexp[part] = torch.logsumexp(logits, dim=-1)
            token_logps[part] = logits.gather(-1, targets[part, None]).squeeze(-1) - logsumexp[part]
        ctx.save_for_backward(hidden, weight, bias, targets, logsumexp)
        ctx.chunk, ctx.transform = chunk, transform
        return token_logps

    @staticmethod
    def backward(ctx, grad_logps):
        hidden, weight, bias, targets, logsumexp = ctx.saved_tensors
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        grad_weight = torch.zeros_like(weight) if need_weight else None
        grad_bias = torch.zeros_like(bias) if need_bias else None
        for start in range(0, hidden.shape[0], ctx.chunk):
            part = slice(start, start + ctx.chunk)
            grad_logits = torch.nn.functional.linear(hidden[part], weight, bias).to(logsumexp.dtype)
            # In place, a slice of rows at a time: a soft-cap's slope then needs a slice, not a chunk.
            end = min(start + ctx.chunk, hidden.shape[0])
            for rows in range(start, end, _SLOPE_ROWS):
                piece = slice(rows, min(rows + _SLOPE_ROWS, end))
                logits, slope = ctx.transform.logits_and_slope(grad_logits[rows - start : piece.stop - start])
                grad = grad_logps[piece, None].to(logsumexp.dtype)
                logits.sub_(logsumexp[piece, None]).exp_().mul_(-grad)
                logits.scatter_add_(-1, targets[piece, None], grad)
                if not isinstance(slope, float) or slope != 1:
                    logits.mul_(slope)  # d logp / d z
            grad_logits = grad_logits.to(weight.dtype)
            if need_hidden:
                grad_hidden[part] = grad_logits @ weight
            if need_weight:
                grad_weight.addmm_(grad_logits.T, hidden[part])
            if need_bias:
                grad_bias += grad_logits.sum(dim=0)
        return grad_hidden, grad_weight, grad_bias, None, None, None


_SLOPE_ROWS = 64


@functools.cache
def _accepts_logits_to_keep(model_type: type) -> bool:
    return "logits_to_keep" in inspect.signature(model_type.forward).parameters


def length_buckets(
    lengths: Sequence[int] | np.ndarray,
    max_rows: int | None = None,
    max_tokens: int | None = None,
    packed: bool = False,
) -> list[np.ndarray]:
    """Positions into `lengths` cut into batches longest first, so rows of similar length share one: at
    most `max_rows` rows and `max_tokens` tokens each (padded: rows x the batch's longest, its first;
    `packed`: their sum). A row longer than `max_tokens` is alone. Every position is in exactly one
    batch. The one longest-first cutter: the scoring actors' batches and token-budget micro-batches."""
    if max_tokens is not None and max_tokens < 1:
        raise ValueError(f"a token budget must be positive, not {max_tokens}")
    lengths = np.asarray(lengths, dtype=np.int64)
    order = np.argsort(-lengths, kind="stable")
    batches: list[np.ndarray] = []
    start = 0
    rows_cap = len(order) if max_rows is None else max_rows
    while start < len(order):
        longest = int(lengths[order[start]])
        if not packed:  # rows x the longest: the size in one step (the scoring actors' hot path)
            fit = rows_cap if max_tokens is None else max(1, min(rows_cap, max_tokens // max(longest, 1)))
            end = start + fit
        else:  # the sum of lengths: add rows while it stays within the budget
            end, tokens = start + 1, longest
            while end < len(order) and end - start < rows_cap:
                tokens += int(lengths[order[end]])
                if max_tokens is not None and tokens > max_tokens:
                    break
                end += 1
        batches.append(order[start:end])
        start = end
    return batches
