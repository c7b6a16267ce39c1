"""The model zoo (tests/zoo.py) in-process, no Ray: every family builds offline with the
embedded tokenizer, reloads with transformers, and takes LoRA with the default `target_modules`
(all-linear as peft defines it) through kto-ray's own wrapping and adapter export. The slow stages
(precompute, 2-worker ZeRO-3 training, export, evaluate) are in tests/integration/test_zoo.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM
from transformers.pytorch_utils import Conv1D

from kto_ray.assets.tiny_model import build_tokenizer
from kto_ray.models.logprobs import pad_sequences, sequence_logps
from kto_ray.rundir import RunDir
from kto_ray.training.lora import export_adapter, trainable_parameters, wrap_policy
from tests.helpers import make_config
from tests.zoo import FAMILIES, build_family, family_config

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def zoo_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("zoo")


@pytest.fixture(params=list(FAMILIES))
def family(request, zoo_dir) -> tuple[str, Path]:
    return request.param, build_family(request.param, zoo_dir / request.param)


def tensor_names(folder: Path) -> set[str]:
    names: set[str] = set()
    for path in folder.glob("*.safetensors"):
        with safe_open(path, "pt") as f:
            names |= set(f.keys())
    return names


def test_unknown_family_is_refused_naming_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown model family 'bert'.*llama"):
        family_config("bert")


def test_family_folder_reloads_with_the_embedded_tokenizer(family):
    name, folder = family
    tokenizer = build_tokenizer()
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    assert model.config.model_type == family_config(name).model_type
    assert model.get_input_embeddings().num_embeddings == len(tokenizer)  # vocab sized to the tokenizer
    assert json.loads((folder / "tokenizer_config.json").read_text())["eos_token"] == tokenizer.eos_token
    assert model.config.pad_token_id == tokenizer.pad_token_id
    assert sum(p.numel() for p in model.parameters()) < 100_000  # tiny: every stage runs in seconds
    assert build_family(name, folder) == folder  # complete: not rebuilt


def _adapted(model: torch.nn.Module) -> set[str]:
    from peft.tuners.lora import LoraLayer

    return {
        name.removeprefix("base_model.model.")
        for name, m in model.named_modules()
        if isinstance(m, LoraLayer)
    }


def _lora_config(folder: Path, root: Path):
    # The shipped default target_modules (all-linear); only r is small and dropout off, for the check.
    return make_config(
        folder,
        REPO / "data" / "arithmetic.jsonl",
        root,
        lora={"enabled": True, "r": 4, "dropout": 0.0},
        run={"name": "lora", "merge_lora": True},
    )


def test_default_lora_targets_every_linear_layer_but_the_head(family, tmp_path):
    name, folder = family
    cfg = _lora_config(folder, tmp_path)
    assert cfg.lora.target_modules == "all-linear"
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    head = next(n for n, m in model.named_modules() if m is model.get_output_embeddings())
    layers = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear | Conv1D) and n != head}
    policy = wrap_policy(model, cfg)
    adapted = _adapted(policy)
    assert layers <= adapted, f"{name}: no adapter on {sorted(layers - adapted)[:4]}"
    assert head not in adapted
    if name == "gpt2":  # Conv1D, not Linear: peft's all-linear must still find them
        assert {"transformer.h.0.attn.c_attn", "transformer.h.0.mlp.c_fc"} <= adapted


def test_one_lora_step_moves_only_the_adapters_and_exports_them(family, tmp_path):
    """One backward through kto-ray's log-probs: every adapter's B matrix gets a gradient (A's is 0 at
    the first step: B starts at 0), no base weight does; the adapter folder (kto-ray's export) merges
    back into a model with the original tensor names."""
    name, folder = family
    cfg = _lora_config(folder, tmp_path)
    policy = wrap_policy(AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32), cfg)
    tokenizer = build_tokenizer()
    prompts = [tokenizer("3 + 4 = ")["input_ids"], tokenizer("What is 2 * 5?")["input_ids"]]
    completions = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in ("7.", "ten.")]
    batch = pad_sequences(prompts, completions, pad_id=tokenizer.pad_token_id)
    sequence_logps(policy, batch, cfg.model.logprob_chunk_tokens).sum().backward()
    trainable = {n for n, p in policy.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n for n in trainable), sorted(trainable)[:4]
    assert len(trainable_parameters(policy)) == len(trainable)
    for n, p in policy.named_parameters():
        if ".lora_B." in n:
            assert p.grad is not None and p.grad.abs().sum() > 0, f"{name}: no gradient reaches {n}"

    class Engine:  # what export_adapter reads of a DeepSpeed engine
        module = policy

    export_adapter(Engine(), tokenizer, cfg, RunDir.of(cfg), rank=0)
    final = tmp_path / "runs" / "lora" / "final"
    assert (final / "adapter_model.safetensors").is_file()
    assert tensor_names(tmp_path / "runs" / "lora" / "merged") == tensor_names(folder)


def test_disabled_dropout_makes_the_training_forward_score_as_the_reference(zoo_dir):
    """GPT-2 ships with dropout 0.1: the policy engine switches it off (kto_ray.training.engine), so the
    training-mode forward gives the eval-mode (reference) log-probs; with dropout on it does not."""
    from kto_ray.training.engine import disable_dropout

    model = AutoModelForCausalLM.from_pretrained(build_family("gpt2", zoo_dir / "gpt2"), dtype=torch.float32)
    assert model.config.resid_pdrop > 0
    tokenizer = build_tokenizer()
    batch = pad_sequences([tokenizer("3 + 4 = ")["input_ids"]], [[*tokenizer("7.")["input_ids"][1:], 2]], 3)
    with torch.no_grad():
        reference = sequence_logps(model.eval(), batch)
        torch.manual_seed(0)
        noisy = sequence_logps(model.train(), batch)
        disable_dropout(model)
        trained = sequence_logps(model.train(), batch)
    assert not torch.allclose(noisy, reference)
    torch.testing.assert_close(trained, reference)
