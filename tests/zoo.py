"""A zoo of tiny random causal LMs, one per architecture family users train, built offline from
transformers' own config classes and saved with the embedded tokenizer (kto_ray/assets/tiny_model.py).

Each family differs from Llama in something kto-ray's stages touch: attention biases (Qwen2), q/k norms
(Qwen3, OLMo 2), routed experts (Qwen3-MoE, Mixtral), tied heads with tanh soft-capping and sliding
windows (Gemma 2, Gemma 3), fused projections (Phi-3, GPT-NeoX), other module names and an untied
`embed_out` (GPT-NeoX), Conv1D instead of Linear (GPT-2). Weights are random (seeded) and tiny (hidden 32,
2 layers, 4 heads), so a test can push every family through every stage in seconds.

    python -m tests.zoo --out artifacts/zoo [FAMILY ...]   # one folder per family
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kto_ray.assets.tiny_model import _is_complete, _save_atomically, build_tokenizer

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedTokenizerFast

HIDDEN, INTERMEDIATE, LAYERS, HEADS, KV_HEADS, HEAD_DIM = 32, 64, 2, 4, 2, 8
MAX_POSITIONS = 256
WINDOW = 16  # sliding-window families: shorter than the test rows, so the window actually masks


def _decoder(tokenizer: PreTrainedTokenizerFast, **extra: Any) -> dict[str, Any]:
    """What every Llama-like config takes: the tiny shapes and the tokenizer's vocabulary and ids."""
    return {
        "vocab_size": len(tokenizer),
        "hidden_size": HIDDEN,
        "intermediate_size": INTERMEDIATE,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS,
        "max_position_embeddings": MAX_POSITIONS,
        **_special_ids(tokenizer),
        **extra,
    }


def _special_ids(tokenizer: PreTrainedTokenizerFast) -> dict[str, int]:
    # Some config classes default to ids of their real vocabulary (Phi-3's pad is 32000): always ours.
    return {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }


def _llama(tok):
    from transformers import LlamaConfig

    return LlamaConfig(**_decoder(tok, tie_word_embeddings=False))


def _mistral(tok):
    from transformers import MistralConfig

    return MistralConfig(**_decoder(tok, sliding_window=WINDOW, head_dim=HEAD_DIM))


def _qwen2(tok):
    from transformers import Qwen2Config

    return Qwen2Config(**_decoder(tok, tie_word_embeddings=False))  # q/k/v with biases


def _qwen3(tok):
    from transformers import Qwen3Config

    return Qwen3Config(**_decoder(tok, head_dim=HEAD_DIM, tie_word_embeddings=True))


def _qwen3_moe(tok):
    from transformers import Qwen3MoeConfig

    # 8 experts, top 2, every layer sparse; asks for router logits as TRL's aux-loss recipe does.
    return Qwen3MoeConfig(
        **_decoder(tok, head_dim=HEAD_DIM),
        num_experts=8,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        output_router_logits=True,
        router_aux_loss_coef=0.01,
    )


def _mixtral(tok):
    from transformers import MixtralConfig

    return MixtralConfig(**_decoder(tok, head_dim=HEAD_DIM), num_local_experts=4, num_experts_per_tok=2)


def _gemma2(tok):
    from transformers import Gemma2Config

    return Gemma2Config(
        **_decoder(tok, head_dim=HEAD_DIM, sliding_window=WINDOW),
        query_pre_attn_scalar=HEAD_DIM,
        final_logit_softcapping=30.0,
        attn_logit_softcapping=50.0,
    )


def _gemma3(tok):
    from transformers import Gemma3TextConfig

    # Gemma 3 ships without final soft-capping; set here as the 262k-vocabulary issue describes.
    return Gemma3TextConfig(
        **_decoder(tok, head_dim=HEAD_DIM, sliding_window=WINDOW),
        query_pre_attn_scalar=HEAD_DIM,
        final_logit_softcapping=30.0,
        layer_types=["sliding_attention", "full_attention"],
    )


def _phi3(tok):
    from transformers import Phi3Config

    return Phi3Config(**_decoder(tok))  # fused qkv_proj and gate_up_proj


def _olmo2(tok):
    from transformers import Olmo2Config

    return Olmo2Config(**_decoder(tok))


def _gpt_neox(tok):
    from transformers import GPTNeoXConfig

    return GPTNeoXConfig(
        vocab_size=len(tok),
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        max_position_embeddings=MAX_POSITIONS,
        tie_word_embeddings=False,  # embed_out, not lm_head
        **_special_ids(tok),
    )


def _gpt2(tok):
    from transformers import GPT2Config

    return GPT2Config(
        vocab_size=len(tok),
        n_embd=HIDDEN,
        n_inner=INTERMEDIATE,
        n_layer=LAYERS,
        n_head=HEADS,
        n_positions=MAX_POSITIONS,
        **_special_ids(tok),
    )


# family -> its config; the names are what tests parametrize over.
FAMILIES: dict[str, Callable[[PreTrainedTokenizerFast], PretrainedConfig]] = {
    "llama": _llama,
    "mistral": _mistral,
    "qwen2": _qwen2,
    "qwen3": _qwen3,
    "qwen3_moe": _qwen3_moe,
    "mixtral": _mixtral,
    "gemma2": _gemma2,
    "gemma3": _gemma3,
    "phi3": _phi3,
    "olmo2": _olmo2,
    "gpt_neox": _gpt_neox,
    "gpt2": _gpt2,
}


def family_config(family: str, tokenizer: PreTrainedTokenizerFast | None = None) -> PretrainedConfig:
    """The tiny fp32 config of `family`, sized to the embedded tokenizer (or `tokenizer`)."""
    if family not in FAMILIES:
        raise ValueError(f"unknown model family {family!r}; known: {', '.join(FAMILIES)}")
    config = FAMILIES[family](tokenizer or build_tokenizer())
    config.dtype = "float32"
    return config


def build_family(family: str, out_dir: str | Path, *, seed: int = 0, force: bool = False) -> Path:
    """A random `family` model with the embedded tokenizer in `out_dir` (safetensors), written
    atomically; a no-op when the folder is already complete."""
    out = Path(out_dir)
    if _is_complete(out) and not force:
        return out
    import torch
    from transformers import AutoModelForCausalLM

    tokenizer = build_tokenizer()
    config = family_config(family, tokenizer)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    _save_atomically(model.eval(), tokenizer, out)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.zoo", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="artifacts/zoo", help="one folder per family under it")
    parser.add_argument("families", nargs="*", help=f"default: all ({', '.join(FAMILIES)})")
    parser.add_argument("--force", action="store_true", help="rebuild even if a folder is complete")
    args = parser.parse_args(argv)
    unknown = [family for family in args.families if family not in FAMILIES]
    if unknown:
        parser.error(f"unknown model family {unknown[0]!r}; known: {', '.join(FAMILIES)}")
    for family in args.families or FAMILIES:
        print(f"{family}: {build_family(family, Path(args.out) / family, force=args.force)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
