"""Summed completion log-probs on the full-logits path (`chunk_tokens=None`): the trimmed logits (prompt
positions skipped) give the full forward's sums. The chunked path is tested in test_chunked_logprobs.py."""

import torch
from transformers import AutoModelForCausalLM

from kto_ray.models.logprobs import pad_sequences, sequence_logps
from kto_ray.objective import completion_logps

# Prompts of different lengths, so the first completion position differs per row.
PROMPTS = [[1, 5, 6, 7, 8, 9], [1, 10, 11], [1, 12, 13, 14]]
COMPLETIONS = [[20, 21, 2], [22, 23, 24, 25, 26, 2], [27, 2]]


class NoLogitsToKeep(torch.nn.Module):
    """A causal LM whose forward has no `logits_to_keep` (older or custom architectures)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, use_cache=False):
        return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=use_cache)


def _full_forward_logps(model, batch) -> torch.Tensor:
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    return completion_logps(logits, batch.input_ids, batch.completion_mask)


def test_trimmed_logits_give_the_full_forward_sums(tiny_model):
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    batch = pad_sequences(PROMPTS, COMPLETIONS, pad_id=0)
    logit_positions = []
    model.register_forward_hook(lambda _module, _args, out: logit_positions.append(out.logits.shape[1]))
    with torch.no_grad():
        full = _full_forward_logps(model, batch)
        trimmed = sequence_logps(model, batch, chunk_tokens=None)
        wrapped = sequence_logps(NoLogitsToKeep(model), batch, chunk_tokens=None)
    # Width 9, shortest prompt 3: logits from position 2 (predicting token 3) on, 7 of 9; full otherwise.
    assert logit_positions == [9, 7, 9]
    torch.testing.assert_close(trimmed, full, atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(wrapped, full, atol=0.0, rtol=0.0)
    assert (full < 0).all()


def test_trimmed_logits_pass_the_same_gradient(tiny_model):
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    batch = pad_sequences(PROMPTS, COMPLETIONS, pad_id=0)
    grads = []
    for logps_of in (_full_forward_logps, lambda m, b: sequence_logps(m, b, chunk_tokens=None)):
        model.zero_grad()
        logps_of(model, batch).sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    torch.testing.assert_close(grads[1], grads[0], atol=1e-5, rtol=1e-4)
