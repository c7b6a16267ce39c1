"""Packed batches: the same log-probs and gradients as the padded batch of the same rows, for every
attention kernel that runs on CPU, in one sequence and in lanes; models that leak across rows fall
back to padding; a train step on packed micro-batches equals the padded one."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from transformers import LlamaForCausalLM

from kto_ray.config import ModelConfig
from kto_ray.models import packing
from kto_ray.models.loading import load_causal_lm
from kto_ray.models.logprobs import pad_sequences, sequence_logps
from kto_ray.models.packing import keeps_rows_apart, pack_sequences, packed_full_logps
from kto_ray.training.schedule.batching import collate
from kto_ray.training.step import LossSettings, train_step
from tests.helpers import PlainEngine
from tests.training.test_step import _model, _table

# Ragged rows: one much longer (lanes hold several short rows beside nothing), an empty prompt, and
# 1-token completions.
PROMPTS = [[1, 5, 6, 7, 8, 9, 10, 11], [1, 10, 11], [], [1, 12, 13, 14], [1, 15], [1, 16, 17]]
COMPLETIONS = [[20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 2], [22, 2], [30, 31, 2], [27], [33, 34, 2], [35]]
WEIGHTS = torch.tensor([1.0, -2.0, 0.5, 3.0, -1.5, 0.25])  # a gradient routed to the wrong row shows
# flex_attention does not run here: on CPU torch compiles it with inductor (minutes on 2 cores, then a
# C++ build error in this environment) and has no backward; flash-attention kernels are GPU-only.
KERNELS = ["eager", "sdpa"]


def _tiny(tiny_model, kernel: str) -> LlamaForCausalLM:
    return load_causal_lm(ModelConfig(path=str(tiny_model), attn_implementation=kernel), torch.float32)


def _values_and_grads(model, batch, chunk_tokens):
    model.zero_grad(set_to_none=True)
    logps = sequence_logps(model, batch, chunk_tokens)
    (logps * WEIGHTS).sum().backward()
    return logps.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("chunk_tokens", [4, None], ids=["chunked", "full"])
@pytest.mark.parametrize("kernel", KERNELS)
def test_packed_values_and_gradients_equal_the_padded_ones(tiny_model, kernel, chunk_tokens):
    model = _tiny(tiny_model, kernel)
    assert model.config._attn_implementation == kernel
    assert keeps_rows_apart(model)
    padded, padded_grads = _values_and_grads(model, pad_sequences(PROMPTS, COMPLETIONS, 0), chunk_tokens)
    packed, packed_grads = _values_and_grads(model, pack_sequences(PROMPTS, COMPLETIONS, 0), chunk_tokens)
    torch.testing.assert_close(packed, padded, rtol=1e-5, atol=1e-5)
    assert packed_grads.keys() == padded_grads.keys() and padded_grads
    for name, grad in padded_grads.items():
        torch.testing.assert_close(packed_grads[name], grad, rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.parametrize("kernel", KERNELS)
def test_one_sequence_layout_equals_the_padded_one(tiny_model, kernel):
    # The flash-attention layout (all rows in one sequence), here through the kernels' packed mask.
    model = _tiny(tiny_model, kernel).eval()
    flat = pack_sequences(PROMPTS, COMPLETIONS, 0)
    assert flat.input_ids.shape == (1, flat.tokens)
    with torch.no_grad():
        padded = sequence_logps(model, pad_sequences(PROMPTS, COMPLETIONS, 0), None)
        torch.testing.assert_close(packed_full_logps(model, flat, {}), padded, rtol=1e-5, atol=1e-5)


def test_lanes_hold_every_row_once_with_restarting_positions():
    flat = pack_sequences(PROMPTS, COMPLETIONS, pad_id=3)
    lanes = flat.in_lanes(int(flat.lengths.max()))
    width = max(len(p) + len(c) for p, c in zip(PROMPTS, COMPLETIONS))
    assert lanes.input_ids.shape[1] == width and lanes.input_ids.shape[0] < len(PROMPTS)
    assert lanes.tokens == flat.tokens == sum(len(p) + len(c) for p, c in zip(PROMPTS, COMPLETIONS))
    for row, (p, c) in enumerate(zip(PROMPTS, COMPLETIONS)):
        where = (lanes.row_ids == row) & (lanes.input_ids != 3)
        lane = int(where.any(dim=1).nonzero()[0])
        assert lanes.input_ids[where].tolist() == p + c
        assert lanes.position_ids[lane][where[lane]].tolist() == list(range(len(p) + len(c)))
        # every completion token is scored except a row's first token
        assert lanes.completion_mask[where].tolist() == [0] * max(len(p), 1) + [1] * (len(c) - (not p))


def test_padded_fallback_is_the_padded_layout():
    flat = pack_sequences(PROMPTS, COMPLETIONS, pad_id=3)
    expected = pad_sequences(PROMPTS, COMPLETIONS, pad_id=3)
    fallback = flat.padded()
    assert torch.equal(fallback.input_ids, expected.input_ids)
    assert torch.equal(fallback.attention_mask, expected.attention_mask)
    # the padded layout's completion mask may mark column 0 (empty prompt); it is never scored
    assert torch.equal(fallback.completion_mask[:, 1:], expected.completion_mask[:, 1:])


class _IgnoresPositions(torch.nn.Module):
    """A causal LM whose forward drops position_ids: packed rows would attend to each other."""

    def __init__(self, model: LlamaForCausalLM):
        super().__init__()
        self.inner, self.config = model, model.config

    def get_input_embeddings(self):
        return self.inner.get_input_embeddings()

    def forward(self, input_ids, attention_mask=None, position_ids=None, **kwargs):
        return self.inner(input_ids=input_ids, attention_mask=attention_mask, **kwargs)


def test_a_model_that_leaks_across_rows_stays_padded_and_says_so_once(tiny_model, caplog):
    model = _IgnoresPositions(_tiny(tiny_model, "sdpa")).eval()
    packed = pack_sequences(PROMPTS, COMPLETIONS, 0)
    packing._SAID.clear()
    with caplog.at_level(logging.WARNING, logger=packing.__name__), torch.no_grad():
        assert not keeps_rows_apart(model)
        first = sequence_logps(model, packed)
        again = sequence_logps(model, packed)
        padded = sequence_logps(model, pad_sequences(PROMPTS, COMPLETIONS, 0))
    assert [r.message for r in caplog.records].count(caplog.records[0].message) == 1
    assert "stay padded" in caplog.records[0].message
    torch.testing.assert_close(first, padded, rtol=0, atol=0)
    torch.testing.assert_close(again, padded, rtol=0, atol=0)
    # what the check guards against: run packed anyway, this model mixes the rows
    with torch.no_grad():
        leaked = packed_full_logps(model, packed, {})
    assert not torch.allclose(leaked, padded, rtol=1e-3, atol=1e-3)


def test_a_train_step_on_packed_micro_batches_equals_the_padded_one():
    settings = LossSettings(beta=0.5, desirable_weight=1.3, undesirable_weight=0.8)
    table = _table()
    results = {}
    for packed in (False, True):
        model = _model()
        engine = PlainEngine(model, torch.optim.SGD(model.parameters(), lr=1.0), 2)
        batches = [collate(table, rows, 0, packed) for rows in (np.arange(4), np.arange(4, 8))]
        metrics = train_step(engine, batches, settings, lambda t: t, 1)
        results[packed] = metrics, [p.detach().clone() for p in model.parameters()]
    (padded_metrics, padded_params), (packed_metrics, packed_params) = results[False], results[True]
    assert packed_metrics.keys() == padded_metrics.keys()
    for key, value in padded_metrics.items():
        assert packed_metrics[key] == pytest.approx(value, rel=1e-5, abs=1e-5), key
    assert packed_metrics["tokens"] == padded_metrics["tokens"] > 0
    for a, b in zip(packed_params, padded_params):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_precompute_scores_packed_batches_as_padded_ones(tiny_model):
    # The reference pass's actor callable itself (no Ray): its store columns, packed vs padded.
    from kto_ray.reference.scoring import ActorModel, ReferenceLogprobs

    n = len(PROMPTS)
    rows = {
        "id": list(range(n)),
        "kl_id": [(i + 1) % n for i in range(n)],
        "label": [i % 2 == 0 for i in range(n)],
        "split": ["train"] * n,
        "prompt_ids": PROMPTS,
        "completion_ids": COMPLETIONS,
        "kl_completion_ids": COMPLETIONS[1:] + COMPLETIONS[:1],
    }
    tables = {}
    for packed in (False, True):
        model_cfg = ModelConfig(path=str(tiny_model), packed_batches=packed)
        score = ReferenceLogprobs(ActorModel(model_cfg, str(tiny_model), "float32", 0.0, 4, None, pad_id=3))
        tables[packed] = score(rows)
    for column in ("ref_logps", "ref_kl_logps"):
        packed, padded = (torch.tensor(tables[p][column].to_pylist()) for p in (True, False))
        torch.testing.assert_close(packed, padded, rtol=1e-5, atol=1e-5)
