"""Every family of the model zoo (tests/zoo.py) through kto-ray's stages on one local Ray:
precompute (stored log-probs equal a direct transformers forward), 2-worker ZeRO-3 training for 2 steps
(policy == reference at step 1: rewards 0), export (the original tensor names, reloads, generates) and
`kto-ray evaluate` of the export. LoRA with the default target_modules is checked in-process for every
family in tests/assets/test_zoo.py.

Cost: one store and one 2-step run per family, on 40 rows (~40 s each on 2 idle cores); the families
share the session's Ray. `make test` runs gemma3 (a soft-capped head with sliding windows: the code path
that differs most from the tiny Llama the rest of the suite trains; MoE with its aux loss is
tests/training/test_moe_train.py's); `make test-extended` the others whose paths differ most (MoE
twice, other module names with an untied head, Conv1D with shipped dropout); KTO_RAY_ZOO=all runs all
twelve. (Phi-3's fused projections are plain linear layers to ZeRO-3 and the export;
tests/assets/test_zoo.py covers them.)"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pyarrow as pa
import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

from kto_ray.assets.tiny_model import build_tokenizer
from kto_ray.cli import main
from kto_ray.reference.precompute import precompute
from kto_ray.training.launch.driver import train
from tests.assets.test_zoo import tensor_names
from tests.conftest import REPO, make_config, read_metrics
from tests.zoo import FAMILIES, build_family

ROWS = 40  # eval_fraction 0.25: 13 eval rows, 27 train rows (2 steps of 2 workers x 2 rows use 8)
STEPS = 2


@pytest.fixture(scope="module")
def zoo_data(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("zoo-data") / "rows.jsonl"
    out.write_text("\n".join((REPO / "data" / "arithmetic.jsonl").read_text().splitlines()[:ROWS]) + "\n")
    return out


IN_FIRST_TIER = "gemma3"  # `slow`, in `make test`; every other family is `extended` (tests/test_tiers.py)
BY_DEFAULT = ("qwen3_moe", "mixtral", "gemma3", "gpt_neox", "gpt2")
ZOO = [
    pytest.param(f, id=f, marks=pytest.mark.slow if f == IN_FIRST_TIER else pytest.mark.extended)
    for f in FAMILIES
    if os.environ.get("KTO_RAY_ZOO") == "all" or f in BY_DEFAULT
]


@pytest.fixture(scope="module", params=ZOO)
def zoo_run(request, ray_local, zoo_data, tmp_path_factory):
    """One family's model, store and trained run (pytest runs a family's tests together, then the next)."""
    family = request.param
    root = tmp_path_factory.mktemp(f"zoo-{family}")
    model = build_family(family, root / "model")
    cfg = make_config(
        model,
        zoo_data,
        root,
        data={"max_length": 128, "max_prompt_length": 96, "eval_fraction": 0.25},
        precompute={"batch_rows": 16},
        train={
            "micro_batch_size": 2,
            "global_batch_size": 4,  # 2 workers x 2 rows
            "max_steps": STEPS,
            "lr": 1e-3,
            "warmup_ratio": 0.0,
        },
        cluster={"workers": 2},
        run={"name": family, "checkpoint_every": 100},
    )
    store = precompute(cfg).store
    result = train(cfg)
    assert result.steps == STEPS
    return family, cfg, store, model, result.run_dir.local_path


def _direct_logp(model, prompt_ids: list[int], completion_ids: list[int]) -> float:
    """Summed completion log-prob from one unpadded transformers forward, in float64 after the logits."""
    ids = torch.tensor([prompt_ids + completion_ids])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0].double(), -1)
    return sum(logp[t - 1, ids[0, t]].item() for t in range(len(prompt_ids), ids.shape[1]))


def test_stored_logps_equal_a_direct_transformers_forward(zoo_run):
    family, _cfg, store, model_dir, _run = zoo_run
    rows = pa.concat_tables([store.read_split("train"), store.read_split("eval")]).to_pylist()
    assert len(rows) == ROWS
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    for row in rows[::4]:
        expected = _direct_logp(model, row["prompt_ids"], row["completion_ids"])
        expected_kl = _direct_logp(model, row["prompt_ids"], row["kl_completion_ids"])
        assert row["ref_logps"] == pytest.approx(expected, rel=1e-5, abs=1e-5), family
        assert row["ref_kl_logps"] == pytest.approx(expected_kl, rel=1e-5, abs=1e-5), family


def test_zero3_training_starts_at_the_reference_and_exports_the_original_tensors(zoo_run):
    family, _cfg, _store, model_dir, run = zoo_run
    metrics = read_metrics(run)
    assert [m["step"] for m in metrics] == list(range(1, STEPS + 1))
    assert all(math.isfinite(m["loss"]) and math.isfinite(m["grad_norm"]) for m in metrics)
    # Step 1: the ZeRO-3 policy (loaded partitioned) scores as the precompute's reference did.
    assert abs(metrics[0]["rewards/chosen"]) < 1e-4 and abs(metrics[0]["rewards/rejected"]) < 1e-4, family
    assert metrics[0]["kl"] < 1e-4

    final = run / "final"
    assert tensor_names(final) == tensor_names(model_dir), family
    trained = AutoModelForCausalLM.from_pretrained(final, dtype=torch.float32).eval()
    reference = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    assert type(trained) is type(reference)
    moved = max(
        (p - q).abs().max().item()
        for p, q in zip(trained.state_dict().values(), reference.state_dict().values(), strict=True)
    )
    assert moved > 0, family  # two steps at lr 1e-3 changed the weights
    tokenizer = build_tokenizer()
    prompt = torch.tensor([tokenizer("3 + 4 = ")["input_ids"]])
    out = trained.generate(prompt, max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert out.shape[1] > prompt.shape[1], family


def test_evaluate_cli_scores_the_export(zoo_run, tmp_path):
    family, cfg, store, _model, run = zoo_run
    config, out = tmp_path / "config.yaml", tmp_path / "metrics.json"
    config.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    assert main(["evaluate", "--config", str(config), "--model", str(run / "final"), "--json", str(out)]) == 0
    scored = json.loads(out.read_text())
    assert scored["rows"] == store.count("eval") > 0, scored  # every eval row the store holds
    numbers = [v for v in scored.values() if isinstance(v, int | float)]
    assert all(math.isfinite(v) for v in numbers), (family, scored)
    assert scored["rewards/chosen"] != 0 or scored["rewards/rejected"] != 0, family  # the trained policy
