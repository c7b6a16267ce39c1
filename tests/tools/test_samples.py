"""`kto-ray evaluate --generate N`: eval prompts with the trained model's and the reference's
completions side by side, prompts exactly as training saw them (a too-long prompt keeps its end)."""

from __future__ import annotations

import json

import pytest
import yaml

from kto_ray.cli import main
from kto_ray.config import dump_config
from kto_ray.models.loading import load_tokenizer
from kto_ray.reference.precompute import precompute
from kto_ray.rundir import RunDir
from kto_ray.tools.samples import write_samples
from tests.helpers import make_config

pytestmark = pytest.mark.slow

LONG = "Tell me a long story about numbers. " * 40  # ~1,400 characters: past the tiny model's 512 positions


@pytest.fixture(scope="module")
def store_with_a_long_prompt(tiny_model, small_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("samples")
    rows = [json.loads(line) for line in small_data.read_text().splitlines()]
    rows += [
        {"prompt": LONG + "What is 2 + 2?", "completion": " The answer is 4.", "label": True},
        {"prompt": LONG + "What is 2 + 2?", "completion": " The answer is 5.", "label": False},
    ]
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    # eval_fraction 1/2: the long prompt lands in the eval split with the default seed (checked below).
    cfg = make_config(tiny_model, data, root, data={"eval_fraction": 0.5})
    precompute(cfg)
    return cfg


def test_samples_side_by_side_from_the_store_prompts(store_with_a_long_prompt, tiny_model):
    cfg = store_with_a_long_prompt
    n = 400  # every eval row, so the long prompt is among them
    jsonl, markdown = write_samples(cfg, n, model_path=str(tiny_model))  # into the run dir
    samples = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert len(samples) > 100 and {"id", "prompt", "label", "reference", "trained"} <= samples[0].keys()
    # Same weights on both sides and greedy decoding: identical completions, and non-empty ones.
    assert all(s["reference"] == s["trained"] for s in samples)
    assert sum(bool(s["trained"].strip()) for s in samples) > 0.9 * len(samples)
    text = markdown.read_text()
    assert text.startswith(f"# Samples: {len(samples)} eval prompts, greedy")
    assert text.count("**trained**") == len(samples)

    # The long prompt is cut as training cuts it: its last max_prompt_length tokens.
    tokenizer = load_tokenizer(cfg.model)
    long = [s for s in samples if "Tell me a long story" in s["prompt"]]
    assert long, "the long prompt is not in the eval split"
    ids = tokenizer(long[0]["prompt"], add_special_tokens=False)["input_ids"]
    assert len(ids) == cfg.data.max_prompt_length
    assert long[0]["prompt"].endswith("What is 2 + 2?")


def test_cli_writes_samples_to_the_run_dir_and_sampling_is_seeded(store_with_a_long_prompt, tmp_path, capsys):
    cfg = store_with_a_long_prompt.model_copy(deep=True)
    cfg.run.dir = str(tmp_path / "runs")
    config = tmp_path / "config.yaml"
    config.write_text(dump_config(cfg))
    args = ["evaluate", "--config", str(config), "--json", str(tmp_path / "m.json"), "--generate", "3"]
    outputs = []
    for _ in range(2):
        assert main([*args, "--temperature", "1.0", "--seed", "7"]) == 0
        outputs.append((RunDir.of(cfg).local_path / "samples.jsonl").read_text())
    assert outputs[0] == outputs[1]  # seeded sampling repeats
    assert len(outputs[0].splitlines()) == 3
    assert "samples: " in capsys.readouterr().out
    assert "sampled (temperature 1.0, seed 7)" in (RunDir.of(cfg).local_path / "samples.md").read_text()
    assert yaml.safe_load(config.read_text())["run"]["dir"] == str(tmp_path / "runs")
