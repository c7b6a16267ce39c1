"""The model zoo (kto_ray/assets/zoo.py) in-process, no Ray: every family builds offline with the
embedded tokenizer and reloads with transformers. The slow stages
(precompute, 2-worker ZeRO-3 training, export, evaluate) are in tests/integration/test_zoo.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from kto_ray.assets.tiny_model import build_tokenizer
from kto_ray.assets.zoo import FAMILIES, build_family, family_config


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
