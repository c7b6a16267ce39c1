"""MoE: the router's load-balancing loss on the policy pass (a tiny random Qwen3-MoE: 8 experts, top-2),
checked against transformers' own causal LM forward, which adds the same function's value as `aux_loss`;
the other passes record no router logits; a family without the function says so once."""

from __future__ import annotations

import warnings

import pyarrow as pa
import pytest
import torch
import transformers

from kto_ray.models import moe
from kto_ray.models.logprobs import pad_sequences, sequence_logps, sequence_logps_and_router_logits
from kto_ray.models.moe import router_aux
from kto_ray.store.format import SCHEMA
from kto_ray.training.schedule.batching import collate
from kto_ray.training.step import LossSettings, train_step
from tests.helpers import PlainEngine

VOCAB = 64
COEF = 0.5  # far above Qwen3's 0.001, so the aux gradient is not lost in the KTO one


def _model(output_router_logits: bool = True) -> transformers.Qwen3MoeForCausalLM:
    torch.manual_seed(0)
    config = transformers.Qwen3MoeConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        intermediate_size=32,
        moe_intermediate_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        num_experts=8,
        num_experts_per_tok=2,
        max_position_embeddings=64,
        output_router_logits=output_router_logits,
        router_aux_loss_coef=COEF,
        pad_token_id=0,
    )
    model = transformers.Qwen3MoeForCausalLM(config)
    with torch.no_grad():  # routers start at zero: make routing depend on the tokens
        for name, param in model.named_parameters():
            if name.endswith("gate.weight"):
                param.normal_(0, 1.0)
    return model


def _batch():
    gen = torch.Generator().manual_seed(1)
    lengths = [(5, 4), (2, 7), (6, 1)]
    prompts = [torch.randint(1, VOCAB, (p,), generator=gen).tolist() for p, _ in lengths]
    completions = [torch.randint(1, VOCAB, (c,), generator=gen).tolist() for _, c in lengths]
    return pad_sequences(prompts, completions, pad_id=0)


def _transformers_aux(model, batch) -> torch.Tensor:
    """transformers' own: the causal LM's forward with router logits returns load_balancing_loss_func's
    value over the non-padding tokens."""
    out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, output_router_logits=True)
    return out.aux_loss


@pytest.mark.parametrize("chunk_tokens", [3, None], ids=["chunked", "full"])
def test_router_aux_equals_the_causal_lm_forward_aux_loss(chunk_tokens):
    model = _model()
    batch = _batch()
    aux = router_aux(model)
    assert (aux.num_experts, aux.top_k, aux.coef) == (8, 2, COEF)
    logps, router_logits = sequence_logps_and_router_logits(model, batch, chunk_tokens)
    assert len(router_logits) == 2 and router_logits[0].shape == (batch.input_ids.numel(), 8)
    with torch.no_grad():
        expected = _transformers_aux(model, batch)
        torch.testing.assert_close(logps, sequence_logps(model, batch, chunk_tokens))
    assert expected > 0
    torch.testing.assert_close(aux(router_logits, batch.attention_mask), expected.float())


def test_no_router_logits_without_asking_even_when_the_config_sets_them():
    # Precompute, the KL pass and eval call sequence_logps: the config's output_router_logits must not
    # make every one of those forwards record (and keep) the router logits.
    model = _model()
    recorded = []
    model.get_decoder().register_forward_hook(lambda _m, _i, out: recorded.append(out.router_logits))
    sequence_logps(model, _batch(), 3)
    sequence_logps(model, _batch(), None)
    sequence_logps_and_router_logits(model, _batch(), 3)
    assert recorded[:2] == [None, None]
    assert len(recorded[2]) == 2


def test_no_aux_unless_the_config_asks_for_router_logits():
    assert router_aux(_model(output_router_logits=False)) is None  # as TRL: the config decides


def test_a_family_without_a_load_balancing_function_says_so_once():
    config = transformers.DeepseekV3Config(
        vocab_size=VOCAB,
        hidden_size=16,
        intermediate_size=32,
        moe_intermediate_size=8,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        n_routed_experts=4,
        num_experts_per_tok=2,
        n_group=1,
        topk_group=1,
        q_lora_rank=8,
        kv_lora_rank=8,
        qk_rope_head_dim=4,
        qk_nope_head_dim=4,
        v_head_dim=4,
        output_router_logits=True,
    )
    model = transformers.DeepseekV3ForCausalLM(config)
    moe._said.clear()
    with pytest.warns(UserWarning, match="DeepseekV3ForCausalLM: .* trains without the router's aux loss"):
        assert router_aux(model) is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert router_aux(model) is None


def _table(rows: int = 6) -> pa.Table:
    gen = torch.Generator().manual_seed(2)

    def ids(n):
        return torch.randint(1, VOCAB, (n,), generator=gen).tolist()

    return pa.table(
        {
            "id": list(range(rows)),
            "prompt_ids": [ids(2 + i % 3) for i in range(rows)],
            "completion_ids": [ids(1 + i % 4) for i in range(rows)],
            "kl_completion_ids": [ids(1 + i % 3) for i in range(rows)],
            "kl_id": [(i + 1) % rows for i in range(rows)],
            "label": [i % 3 != 0 for i in range(rows)],
            "ref_logps": (-20 * torch.rand(rows, generator=gen)).tolist(),
            "ref_kl_logps": (-20 * torch.rand(rows, generator=gen)).tolist(),
            "split": ["train"] * rows,
        },
        schema=SCHEMA,
    )


def _step(with_aux: bool, packed: bool = False):
    """One train_step (micro-batches of 2 and 4 rows, so the per-row weighting shows) with a plain engine
    that keeps the gradients; returns its metrics, the gradients and the micro-batches."""
    model = _model()
    engine = PlainEngine(model)  # no optimizer: the gradients stay
    table = _table()
    batches = [collate(table, rows, pad_id=0, packed=packed) for rows in ([0, 1], [2, 3, 4, 5])]
    settings = LossSettings(beta=0.5, desirable_weight=1.0, undesirable_weight=1.0)
    aux = router_aux(model) if with_aux else None
    metrics = train_step(engine, batches, settings, lambda t: t, 1, chunk_tokens=3, router_aux=aux)
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return metrics, grads, batches


def test_the_step_adds_coef_times_aux_loss_on_the_policy_pass_and_not_without():
    on, on_grads, batches = _step(with_aux=True)
    off, off_grads, _ = _step(with_aux=False)
    assert "aux_loss" not in off
    assert on["loss"] == pytest.approx(off["loss"], abs=1e-6)  # `loss` stays the KTO loss
    # By hand: transformers' aux_loss of each policy forward, a mean over the step's 6 rows.
    model = _model()
    hand = sum(_transformers_aux(model, mb.policy) * len(mb) for mb in batches) / 6
    assert on["aux_loss"] == pytest.approx(hand.item(), rel=1e-5)
    (COEF * hand).backward()
    aux_grads = {n: p.grad for n, p in model.named_parameters()}
    assert on_grads.keys() == off_grads.keys()
    for name, grad in on_grads.items():
        aux_grad = aux_grads[name] if aux_grads[name] is not None else torch.zeros_like(grad)
        torch.testing.assert_close(grad, off_grads[name] + aux_grad, rtol=1e-4, atol=1e-6, msg=name)
    router = "model.layers.0.mlp.gate.weight"
    assert (on_grads[router] - off_grads[router]).norm() > 1e-3 * on_grads[router].norm()


def test_packed_micro_batches_give_the_padded_step_with_the_aux_loss():
    # The policy pass with router logits runs a packed batch padded (the load-balancing loss weighs
    # tokens by a [rows, length] mask); the KL pass runs packed. The step is the same either way.
    padded, padded_grads, _ = _step(with_aux=True)
    packed, packed_grads, batches = _step(with_aux=True, packed=True)
    assert type(batches[0].policy).__name__ == "PackedBatch"
    for key in ("loss", "kl", "aux_loss", "rewards/chosen", "rewards/rejected"):
        assert packed[key] == pytest.approx(padded[key], rel=1e-5, abs=1e-6), key
    for name, grad in padded_grads.items():
        torch.testing.assert_close(packed_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_expert_blocks_are_flagged_as_zero3_leaves():
    from deepspeed.utils import z3_leaf_module

    model = _model()
    assert moe.mark_expert_blocks_as_z3_leaves(model) == ["Qwen3MoeSparseMoeBlock"]
    flagged = [name for name, module in model.named_modules() if z3_leaf_module(module)]
    assert flagged == ["model.layers.0.mlp", "model.layers.1.mlp"]
