"""A real pretrained model end to end: SmolLM2-135M-Instruct (49k BPE vocabulary, tied embeddings, ChatML
template) through precompute, 2-worker ZeRO-3 training, export and evaluation, on chat-format data.

The first tests need no Ray and no real model: the loader refuses folders it cannot load, naming them.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import pyarrow as pa
import pytest
import torch
import yaml
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from kto_ray.cli import main
from kto_ray.data.prepare import prepare_text
from kto_ray.errors import UserError
from kto_ray.models.loading import load_causal_lm, load_tokenizer
from kto_ray.reference.precompute import precompute
from kto_ray.tools.evaluate import evaluate
from kto_ray.training.launch.driver import train
from tests.conftest import REPO, make_config, read_metrics
from tests.smollm2 import greedy_reply

CHAT_DATA = REPO / "data" / "chat_sample.jsonl"
END_OF_TURN = "<|im_end|>"
# Short rows (35-58 tokens rendered): a 128-token window keeps every forward cheap on 2 cores.
DATA = {"max_length": 128, "max_prompt_length": 96, "eval_fraction": 0.25}


# ---------------------------------------------------------------------- loader errors (fast, no Ray)


def _empty(folder: Path, tiny_model: Path) -> None:
    pass


def _gguf_only(folder: Path, tiny_model: Path) -> None:
    (folder / "SmolLM2-135M-Instruct.Q4_1.gguf").write_bytes(b"GGUF")  # the name is all the check reads


def _no_weights(folder: Path, tiny_model: Path) -> None:
    for path in tiny_model.iterdir():  # config and tokenizer of a real folder, its weights left out
        if path.suffix != ".safetensors":
            shutil.copy(path, folder / path.name)


BAD_FOLDERS = {
    "empty": (_empty, r"has no config\.json"),
    "gguf_only": (_gguf_only, r"holds only GGUF weights .*python -m kto_ray\.assets"),
    "no_weights": (_no_weights, r"has no weight files"),
}


@pytest.fixture(params=list(BAD_FOLDERS))
def bad_folder(request, tiny_model, tmp_path) -> tuple[Path, str]:
    make, message = BAD_FOLDERS[request.param]
    folder = tmp_path / f"model-{request.param}"
    folder.mkdir()
    make(folder, tiny_model)
    return folder, message


def test_loaders_refuse_a_bad_model_folder_naming_it(bad_folder, tiny_model):
    folder, message = bad_folder
    cfg = make_config(tiny_model, CHAT_DATA, folder.parent, model={"path": str(folder)})
    for load in (lambda: load_tokenizer(cfg.model), lambda: load_causal_lm(cfg.model, torch.float32)):
        with pytest.raises(UserError, match=message) as err:
            load()
        assert str(folder) in str(err.value)


def test_cli_refuses_a_bad_model_folder_with_exit_2_and_one_line(bad_folder, tiny_model, capsys):
    folder, message = bad_folder
    config = folder.parent / "config.yaml"
    cfg = make_config(tiny_model, CHAT_DATA, folder.parent / "out")
    config.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    capsys.readouterr()  # drop what the tiny-model fixture printed
    assert main(["precompute", "--config", str(config), "--set", f"model.path={folder}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("kto-ray: error: ") and "\n" not in err, err
    assert str(folder) in err
    assert re.search(message, err), err
    assert not (folder.parent / "out").exists()  # nothing written: no store, no run dir


@pytest.mark.parametrize("stage", ["precompute", "train"])
def test_max_length_above_the_model_context_is_refused(stage, tiny_model, small_data, tmp_path):
    from transformers import AutoConfig

    limit = AutoConfig.from_pretrained(tiny_model).max_position_embeddings
    cfg = make_config(tiny_model, small_data, tmp_path, data={"max_length": limit + 1})
    with pytest.raises(UserError, match=rf"data\.max_length {limit + 1} .*max_position_embeddings {limit}"):
        precompute(cfg) if stage == "precompute" else train(cfg)
    assert not (tmp_path / "store").exists() and not (tmp_path / "runs").exists()


# ------------------------------------------------------------------- the real model (slow, local Ray)


@pytest.fixture(scope="module")
def real_store(real_model, ray_local, tmp_path_factory):
    """The chat sample's reference store under SmolLM2, built on the module's Ray; the config also holds
    the 3-step training run (2 workers x 2 rows per step, fp32 ZeRO-3 on CPU)."""
    cfg = make_config(
        real_model,
        CHAT_DATA,
        tmp_path_factory.mktemp("real"),
        precompute={"batch_rows": 8},
        train={
            "micro_batch_size": 2,
            "global_batch_size": 4,  # 2 workers x 2 rows
            "max_steps": 3,
            "lr": 1e-5,
            "warmup_ratio": 0.0,
        },
        cluster={"workers": 2},
        run={"name": "smollm2", "checkpoint_every": 100},
        data=DATA,
    )
    result = precompute(cfg)
    assert not result.reused
    return cfg, result.store


@pytest.fixture(scope="module")
def real_run(real_store) -> Path:
    cfg, _store = real_store
    result = train(cfg)
    assert result.steps == 3
    return result.run_dir.local_path


def _jsonl_rows() -> list[dict]:
    return [json.loads(line) for line in CHAT_DATA.read_text().splitlines() if line.strip()]


def _all_rows(store) -> list[dict]:
    return pa.concat_tables([store.read_split("train"), store.read_split("eval")]).sort_by("id").to_pylist()


def _direct_logp(model, prompt_ids: list[int], completion_ids: list[int]) -> float:
    """Summed completion log-prob from one unpadded transformers forward, in float64 after the logits."""
    ids = torch.tensor([prompt_ids + completion_ids])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0].double(), -1)
    n = len(prompt_ids)
    return sum(logp[t - 1, ids[0, t]].item() for t in range(n, ids.shape[1]))


def _tensor_names(folder: Path) -> set[str]:
    names: set[str] = set()
    for path in folder.glob("*.safetensors"):
        with safe_open(path, "pt") as f:
            names |= set(f.keys())
    return names


@pytest.mark.slow
def test_ref_logps_equal_a_direct_transformers_forward(real_store, real_model):
    _cfg, store = real_store
    rows = _all_rows(store)
    assert len(rows) == len(_jsonl_rows())  # nothing dropped at max_length 128
    model = AutoModelForCausalLM.from_pretrained(real_model, dtype=torch.float32).eval()
    for row in rows[::3]:  # every third row, both splits and labels: ~10 s of forwards on 2 cores
        expected = _direct_logp(model, row["prompt_ids"], row["completion_ids"])
        expected_kl = _direct_logp(model, row["prompt_ids"], row["kl_completion_ids"])
        assert row["ref_logps"] == pytest.approx(expected, abs=1e-4)
        assert row["ref_kl_logps"] == pytest.approx(expected_kl, abs=1e-4)


@pytest.mark.slow
def test_prompt_is_the_models_chat_template_and_completion_ends_with_one_end_of_turn(real_store):
    cfg, store = real_store
    tokenizer = load_tokenizer(cfg.model)
    text = prepare_text(cfg, tokenizer).table.to_pydict()
    end_id = tokenizer.convert_tokens_to_ids(END_OF_TURN)
    assert tokenizer.eos_token_id == end_id
    source = _jsonl_rows()
    assert any(r["prompt"][0]["role"] == "system" for r in source)  # both kinds of rows are covered
    assert any(r["prompt"][0]["role"] != "system" for r in source)
    for row, stored in zip(source, _all_rows(store), strict=True):
        prompt = tokenizer.apply_chat_template(row["prompt"], tokenize=False, add_generation_prompt=True)
        assert text["prompt"][stored["id"]] == prompt
        # the token ids too: no BOS added in front of the template's own <|im_start|>
        assert stored["prompt_ids"] == tokenizer(prompt, add_special_tokens=False)["input_ids"]
        completion = stored["completion_ids"]
        assert completion.count(end_id) == 1, tokenizer.decode(completion)
        # the template ends a turn with "<|im_end|>\n": only that newline may follow the end-of-turn token
        after = completion[completion.index(end_id) + 1 :]
        assert tokenizer.decode(after).strip() == "", tokenizer.decode(completion)
        answer = row["completion"] if isinstance(row["completion"], str) else row["completion"][0]["content"]
        assert tokenizer.decode(completion).startswith(answer + END_OF_TURN)


@pytest.mark.slow
def test_two_worker_zero3_training_exports_the_original_tensors(real_run, real_model):
    metrics = read_metrics(real_run)
    assert [m["step"] for m in metrics] == [1, 2, 3]
    assert all(math.isfinite(m["loss"]) and math.isfinite(m["grad_norm"]) for m in metrics)
    # step 1: policy == reference, so the store and the training forward agree on the real model too
    assert abs(metrics[0]["rewards/chosen"]) < 1e-4 and abs(metrics[0]["rewards/rejected"]) < 1e-4
    assert metrics[0]["loss"] == pytest.approx(0.5, abs=1e-4)

    final = real_run / "final"
    assert _tensor_names(final) == _tensor_names(real_model)  # tied: no separate lm_head.weight
    model = AutoModelForCausalLM.from_pretrained(final, dtype=torch.float32).eval()
    assert model.config.tie_word_embeddings
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    reference = AutoModelForCausalLM.from_pretrained(real_model, dtype=torch.float32)
    moved = max(
        (p - q).abs().max().item()
        for p, q in zip(model.state_dict().values(), reference.state_dict().values(), strict=True)
    )
    assert moved > 0  # three steps at lr 1e-5 changed the weights ...
    tokenizer = load_tokenizer(make_config(final, CHAT_DATA, real_run).model)
    reply = greedy_reply(model, tokenizer, "What is the capital of France?", max_new_tokens=8)
    assert reply.strip(), reply  # ... and the exported model still generates text


@pytest.mark.slow
def test_evaluate_cli_on_the_trained_model_gives_finite_metrics(real_store, real_run, tmp_path, capsys):
    cfg, _store = real_store
    reference = evaluate(cfg)  # the reference scored against its own store: zero rewards
    assert abs(reference["rewards/chosen"]) < 1e-4 and abs(reference["rewards/rejected"]) < 1e-4
    config, out = tmp_path / "config.yaml", tmp_path / "metrics.json"
    config.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    assert (
        main(["evaluate", "--config", str(config), "--model", str(real_run / "final"), "--json", str(out)])
        == 0
    )
    trained = json.loads(out.read_text())
    numbers = {k: v for k, v in trained.items() if isinstance(v, int | float)}
    assert {"loss", "rewards/chosen", "rewards/rejected"} <= numbers.keys(), trained
    assert all(math.isfinite(v) for v in numbers.values()), trained
    assert numbers["rewards/chosen"] != reference["rewards/chosen"]
