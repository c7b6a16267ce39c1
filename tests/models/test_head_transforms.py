"""Soft-capped and scaled LM heads on the chunked log-prob path: values and gradients equal the model's
own full-logits forward (Gemma 2, Gemma 3 text, Cohere, Granite), built from transformers' config
classes; heads outside the table take the full path and say so once."""

from __future__ import annotations

import warnings

import pytest
import torch
import transformers

from kto_ray.models import heads
from kto_ray.models.logprobs import pad_sequences, sequence_logps
from kto_ray.objective import completion_logps

VOCAB = 3_000
SHAPE = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    max_position_embeddings=128,
    pad_token_id=0,
)


def _gemma2():
    return transformers.Gemma2ForCausalLM(transformers.Gemma2Config(**SHAPE, final_logit_softcapping=3.0))


def _gemma3():
    config = transformers.Gemma3TextConfig(**SHAPE, final_logit_softcapping=3.0, sliding_window=4)
    return transformers.Gemma3ForCausalLM(config)


def _cohere():
    return transformers.CohereForCausalLM(transformers.CohereConfig(**SHAPE, logit_scale=4.0))


def _granite():
    return transformers.GraniteForCausalLM(transformers.GraniteConfig(**SHAPE, logits_scaling=0.25))


FAMILIES = {"gemma2": _gemma2, "gemma3": _gemma3, "cohere": _cohere, "granite": _granite}


def _model(family: str, dtype: torch.dtype) -> torch.nn.Module:
    torch.manual_seed(0)
    model = FAMILIES[family]().to(dtype)
    with torch.no_grad():
        # Logits of several units, so tanh saturates and a missed cap or scale would show.
        model.get_output_embeddings().weight.mul_(40.0)
    return model


def _batch():
    gen = torch.Generator().manual_seed(1)
    lengths = [(5, 9), (12, 3), (2, 17), (7, 1)]
    prompts = [torch.randint(4, VOCAB, (p,), generator=gen).tolist() for p, _ in lengths]
    completions = [torch.randint(4, VOCAB, (c,), generator=gen).tolist() for _, c in lengths]
    return pad_sequences(prompts, completions, pad_id=0)


def _values_and_grads(model, batch, chunk_tokens):
    model.zero_grad(set_to_none=True)
    logps = sequence_logps(model, batch, chunk_tokens=chunk_tokens)
    (logps * torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=logps.dtype)).sum().backward()
    return logps.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("family", FAMILIES)
def test_transformed_heads_chunked_equal_the_full_path_in_float64(family):
    model = _model(family, torch.float64)
    assert heads.head_transform(model) not in (None, heads.PLAIN_HEAD)
    batch = _batch()
    top_level = []
    handle = model.register_forward_hook(lambda *_: top_level.append(1))
    chunked, chunked_grads = _values_and_grads(model, batch, 7)
    assert top_level == []  # the chunked path: the model's own forward never ran
    handle.remove()
    full, full_grads = _values_and_grads(model, batch, None)
    torch.testing.assert_close(chunked, full, rtol=1e-9, atol=1e-9)
    assert chunked_grads.keys() == full_grads.keys()
    for name, grad in full_grads.items():
        torch.testing.assert_close(chunked_grads[name], grad, rtol=1e-9, atol=1e-12, msg=name)
    # The transform matters here: the plain head's log-probs are far from the model's.
    with torch.no_grad():
        hidden = model.get_decoder()(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
        plain_logits = model.get_output_embeddings()(hidden.last_hidden_state)
        plain = completion_logps(plain_logits, batch.input_ids, batch.completion_mask)
    assert (plain - full).abs().max() > 0.1


@pytest.mark.parametrize("family", FAMILIES)
def test_transformed_heads_float32_within_1e5_relative(family):
    model = _model(family, torch.float32)
    batch = _batch()
    full, full_grads = _values_and_grads(model, batch, None)
    chunked, chunked_grads = _values_and_grads(model, batch, 5)
    assert (chunked - full).norm() <= 1e-5 * full.norm()
    for name, grad in full_grads.items():
        assert (chunked_grads[name] - grad).norm() <= 1e-5 * grad.norm(), name


def test_every_family_in_the_table_is_a_transformers_class():
    for name in heads._FAMILIES:
        assert isinstance(getattr(transformers, name), type), name


def test_an_unknown_transform_takes_the_full_path_and_says_so_once():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(**SHAPE)
    config.logits_scaling = 2.0  # on a class outside the table: multiplied or divided? not known
    model = transformers.LlamaForCausalLM(config)
    batch = _batch()
    heads._said.clear()
    with pytest.warns(
        UserWarning, match="LlamaForCausalLM: log-probs take the full-logits path.*logits_scaling"
    ):
        first = sequence_logps(model, batch, chunk_tokens=7)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second warning would raise
        again = sequence_logps(model, batch, chunk_tokens=7)
        full = sequence_logps(model, batch, chunk_tokens=None)  # asked for the full path: no warning
    torch.testing.assert_close(first, full)
    torch.testing.assert_close(again, full)
