"""The chunked log-prob path: values and gradients equal the full-logits path at a 128k vocabulary,
for untied and tied heads, any chunk size, and models whose logits are not a plain head fall back."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from kto_ray.models import logprobs
from kto_ray.models.logprobs import _ChunkedTokenLogps, pad_sequences, sequence_logps

VOCAB = 131_072  # a real tokenizer's size: chunking matters, and index arithmetic is exercised past 2^16


def _llama(tied: bool, vocab: int = VOCAB, dtype: torch.dtype = torch.float32) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=tied,
    )
    return LlamaForCausalLM(config).to(dtype)


def _batch(vocab: int = VOCAB):
    gen = torch.Generator().manual_seed(1)
    lengths = [(5, 9), (12, 3), (2, 17), (7, 1)]  # (prompt, completion): ragged, one 1-token completion
    prompts = [torch.randint(4, vocab, (p,), generator=gen).tolist() for p, _ in lengths]
    completions = [torch.randint(4, vocab, (c,), generator=gen).tolist() for _, c in lengths]
    return pad_sequences(prompts, completions, pad_id=0)


def _values_and_grads(model, batch, chunk_tokens):
    model.zero_grad(set_to_none=True)
    logps = sequence_logps(model, batch, chunk_tokens=chunk_tokens)
    # Unequal weights per row, so a gradient routed to the wrong row would show.
    (logps * torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=logps.dtype)).sum().backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return logps.detach(), grads


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("chunk_tokens", [1, 7, 1024])
def test_chunked_values_and_gradients_equal_the_full_path(tied, chunk_tokens):
    # float64, so the comparison sees the math, not the order of fp32 sums over 131k logits.
    model = _llama(tied, dtype=torch.float64)
    batch = _batch()
    full, full_grads = _values_and_grads(model, batch, None)
    chunked, chunked_grads = _values_and_grads(model, batch, chunk_tokens)
    assert full.dtype == chunked.dtype == torch.float64
    torch.testing.assert_close(chunked, full, rtol=1e-10, atol=1e-10)
    assert chunked_grads.keys() == full_grads.keys()
    assert ("lm_head.weight" in full_grads) != tied  # tied: one parameter, named by the embedding
    for name, grad in full_grads.items():
        torch.testing.assert_close(chunked_grads[name], grad, rtol=1e-9, atol=1e-12, msg=name)
    assert (full < 0).all()


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_chunked_float32_within_1e5_of_the_full_path(tied):
    model = _llama(tied)
    batch = _batch()
    full, full_grads = _values_and_grads(model, batch, None)
    chunked, chunked_grads = _values_and_grads(model, batch, 7)
    torch.testing.assert_close(chunked, full, rtol=1e-5, atol=1e-5)
    for name, grad in full_grads.items():
        # Relative error of each whole tensor: elementwise, fp32 rounding of near-zero entries shows.
        assert (chunked_grads[name] - grad).norm() <= 1e-5 * grad.norm(), name
    assert (full < 0).all()


def test_chunked_path_never_builds_the_full_logits(monkeypatch):
    model = _llama(tied=False)
    batch = _batch()
    calls = []
    model.register_forward_hook(lambda *_: calls.append("top-level forward"))  # the full logits path
    widths = []
    real_linear = torch.nn.functional.linear

    def recording_linear(x, weight, bias=None):
        if weight.shape[0] == VOCAB:
            widths.append(x.shape[0])
        return real_linear(x, weight, bias)

    monkeypatch.setattr(torch.nn.functional, "linear", recording_linear)
    sequence_logps(model, batch, chunk_tokens=8).sum().backward()
    assert calls == []
    completion_tokens = 9 + 3 + 17 + 1
    # Only completion positions reach the head, at most 8 at a time, in forward and again in backward.
    assert widths == [8, 8, 8, 6] * 2
    assert sum(widths) == 2 * completion_tokens


def test_head_with_bias_matches_autograd():
    torch.manual_seed(3)
    hidden = torch.randn(11, 16, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(50, 16, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(50, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 50, (11,))
    upstream = torch.randn(11, dtype=torch.float64)

    log_softmax = torch.log_softmax(torch.nn.functional.linear(hidden, weight, bias), dim=-1)
    expected = log_softmax.gather(-1, targets[:, None]).squeeze(-1)
    want = torch.autograd.grad((expected * upstream).sum(), (hidden, weight, bias))
    got_values = _ChunkedTokenLogps.apply(hidden, weight, bias, targets, 4)
    got = torch.autograd.grad((got_values * upstream).sum(), (hidden, weight, bias))
    torch.testing.assert_close(got_values, expected, rtol=1e-12, atol=1e-12)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)


def test_qwen2_and_inference_mode():
    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    model = Qwen2ForCausalLM(config).float().eval()
    batch = _batch()
    with torch.inference_mode():
        torch.testing.assert_close(
            sequence_logps(model, batch, chunk_tokens=5),
            sequence_logps(model, batch, chunk_tokens=None),
            rtol=1e-5,
            atol=1e-5,
        )


def test_models_with_transformed_logits_take_the_full_path():
    model = _llama(tied=False, vocab=64)
    assert logprobs._decoder_and_head(model) is not None
    model.config.final_logit_softcapping = 30.0  # Gemma-2 style: logits = cap * tanh(logits / cap)
    assert logprobs._decoder_and_head(model) is None
    batch = _batch(vocab=64)
    torch.testing.assert_close(sequence_logps(model, batch), sequence_logps(model, batch, chunk_tokens=None))


def test_a_head_with_accelerate_hooks_keeps_them():
    """A reference spread by device_map has accelerate hooks on its modules (an instance-level forward):
    the chunked path must leave them in place."""
    from accelerate.hooks import AlignDevicesHook, add_hook_to_module

    model = _llama(tied=False, vocab=64)
    add_hook_to_module(model.lm_head, AlignDevicesHook(execution_device="cpu"))
    hooked_forward = model.lm_head.__dict__["forward"]
    batch = _batch(vocab=64)
    with torch.no_grad():
        chunked = sequence_logps(model, batch, chunk_tokens=3)
        full = sequence_logps(model, batch, chunk_tokens=None)
    assert model.lm_head.__dict__["forward"] is hooked_forward
    torch.testing.assert_close(chunked, full, rtol=1e-5, atol=1e-5)
