"""The embedded defaults: checkable arithmetic data, the local tokenizer, the tiny Llama reference model."""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything here is local: a network call is a bug

from kto_ray.assets import arithmetic
from kto_ray.assets import tiny_model as assets
from kto_ray.tools.answers import arithmetic_checker

REPO = Path(__file__).resolve().parents[2]
WARMUP_STEPS = 40  # enough to clearly move the loss, a few seconds on 2 CPU cores


def expected_answer(prompt: str) -> tuple[int, str, int, int]:
    """Solve a prompt independently of the generator: the expression, or the word problem's keyword."""
    match = re.search(r"(\d+) ([-+*]) (\d+)", prompt)
    if match:
        a, op, b = int(match[1]), match[2], int(match[3])
    else:
        a, b = map(int, re.findall(r"\d+", prompt))
        keywords = {"+": " more" in prompt, "-": " away" in prompt, "*": " each " in prompt}
        assert sum(keywords.values()) == 1, prompt
        op = next(k for k, v in keywords.items() if v)
    return a, op, b, {"+": a + b, "-": a - b, "*": a * b}[op]


def check_rows(rows: list[dict]) -> None:
    """Desirable rows state the right result in digits; undesirable ones make the data's one systematic
    mistake, the right result spelled out; the answer checker's verdict is exactly the label."""
    for row in rows:
        assert set(row) == {"prompt", "completion", "label"} and isinstance(row["label"], bool)
        assert row["prompt"].endswith("\n") and row["completion"] and "\n" not in row["completion"]
        a, op, b, right = expected_answer(row["prompt"])
        assert max(a, b) <= 10 and 0 <= right <= 25, row  # small facts: the tiny model can learn them
        claims = re.findall(r"(?:=|answer is) ([\w-]+)\.", row["completion"])
        assert claims and len(set(claims)) == 1, row  # one result, restated consistently
        if row["label"]:
            assert claims[0] == str(right), row
        else:
            assert claims[0] == arithmetic.NUMBER_WORDS[right], row
        assert arithmetic_checker({"answer": right}, row["completion"]) == row["label"], row
        if "=" in row["completion"]:  # a worked expression must restate the prompt's operands
            assert f"{a} {op} {b} =" in row["completion"], row


def test_number_words() -> None:
    words = arithmetic.NUMBER_WORDS
    assert len(words) == 26 and (words[0], words[7], words[12], words[20]) == (
        "zero",
        "seven",
        "twelve",
        "twenty",
    )
    assert words[25] == "twenty-five" and arithmetic.MAX_OPERAND**2 == 25


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


# ---------------------------------------------------------------------------------------------- data


def test_generate_is_deterministic_and_labels_are_correct() -> None:
    rows = arithmetic.generate_arithmetic(400, seed=5)
    assert rows == arithmetic.generate_arithmetic(400, seed=5)
    assert rows != arithmetic.generate_arithmetic(400, seed=6)
    check_rows(rows)
    prompts = [row["prompt"] for row in rows]
    assert len(set(prompts)) == 400 and 400 < len(rows) < 600  # distinct prompts dominate
    assert any(prompts.count(p) == 2 for p in prompts)  # some prompts carry both labels
    assert sum(row["label"] for row in rows) == len(rows) / 2
    lengths = [len(row["prompt"]) for row in rows]
    assert max(lengths) > 3 * min(lengths)  # lengths vary, so length bucketing matters


@pytest.mark.parametrize("fraction", [0.0, 0.2, 0.8, 1.0])
def test_generate_hits_the_desirable_fraction(fraction: float) -> None:
    rows = arithmetic.generate_arithmetic(500, seed=1, desirable_fraction=fraction)
    check_rows(rows)
    assert sum(row["label"] for row in rows) / len(rows) == pytest.approx(fraction, abs=0.005)


def test_generate_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError):
        arithmetic.generate_arithmetic(10, seed=0, desirable_fraction=1.5)


def test_cli_data_is_byte_identical_on_rerun(tmp_path: Path) -> None:
    assert assets.main(["data", "--out-dir", str(tmp_path / "a")]) == 0
    assert assets.main(["data", "--out-dir", str(tmp_path / "b")]) == 0
    for name in ("arithmetic.jsonl", "arithmetic_imbalanced.jsonl"):
        fresh = (tmp_path / "a" / name).read_bytes()
        assert fresh == (tmp_path / "b" / name).read_bytes()
        committed = REPO / "data" / name
        if committed.exists():  # the committed files are exactly what the generator writes
            assert committed.read_bytes() == fresh


def test_committed_data_files() -> None:
    balanced = read_jsonl(REPO / "data" / "arithmetic.jsonl")
    imbalanced = read_jsonl(REPO / "data" / "arithmetic_imbalanced.jsonl")
    for rows, fraction in ((balanced, 0.5), (imbalanced, 0.2)):
        assert 2900 <= len(rows) <= 3100
        assert sum(row["label"] for row in rows) / len(rows) == pytest.approx(fraction, abs=0.01)
        check_rows(rows)


# ----------------------------------------------------------------------------------------- tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return assets.build_tokenizer()


def test_tokenizer_round_trips_dataset_text(tokenizer) -> None:
    texts = [row["prompt"] + row["completion"] for row in arithmetic.generate_arithmetic(300, seed=2)]
    texts += ["", " leading and trailing spaces ", "a  b\n\nc", 'Quotes: "x", (y) & z%!']
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert len(ids) == len(text)  # character level
        assert tokenizer.decode(ids) == text
        assert tokenizer.decode(tokenizer(text)["input_ids"], skip_special_tokens=True) == text


def test_tokenizer_vocabulary_and_special_tokens(tokenizer) -> None:
    assert len(tokenizer) < 128 and tokenizer.is_fast
    assert (
        tokenizer.unk_token,
        tokenizer.bos_token,
        tokenizer.eos_token,
        tokenizer.pad_token,
    ) == assets.SPECIAL_TOKENS
    assert (
        len({tokenizer.unk_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id})
        == 4
    )
    assert tokenizer("12")["input_ids"][0] == tokenizer.bos_token_id
    assert tokenizer.bos_token_id not in tokenizer("12", add_special_tokens=False)["input_ids"]
    assert tokenizer("~", add_special_tokens=False)["input_ids"] == [tokenizer.unk_token_id]
    assert tokenizer("x</s>", add_special_tokens=False)["input_ids"][-1] == tokenizer.eos_token_id
    assert assets.build_tokenizer().get_vocab() == tokenizer.get_vocab()  # deterministic


def test_chat_template(tokenizer) -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2 + 3?"},
        {"role": "assistant", "content": "The answer is 5."},
        {"role": "user", "content": "And 4 * 4?"},
    ]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == (
        "System: Be brief.\nUser: What is 2 + 3?\nAssistant: The answer is 5.</s>"
        "User: And 4 * 4?\nAssistant: "
    )
    no_prompt = tokenizer.apply_chat_template(messages[:2], tokenize=False)
    assert no_prompt == "System: Be brief.\nUser: What is 2 + 3?\n"
    # The generation prompt is a prefix of the rendered answer, so prompt/completion splits line up.
    full = tokenizer.apply_chat_template(messages[:3], tokenize=False)
    assert full.startswith(
        tokenizer.apply_chat_template(messages[:2], tokenize=False, add_generation_prompt=True)
    )


# --------------------------------------------------------------------------------------------- model


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return {
        "initial": assets.build_tiny_model(root / "initial", REPO / "data/arithmetic.jsonl", warmup_steps=0),
        "warm": assets.build_tiny_model(
            root / "warm", REPO / "data/arithmetic.jsonl", warmup_steps=WARMUP_STEPS
        ),
    }


def completion_logps(model_dir: Path, rows: list[dict]) -> list[float]:
    """Summed log-prob of each completion (+ EOS) given <s> prompt, as KTO scores it; one padded batch."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    prompts = [tokenizer(row["prompt"])["input_ids"] for row in rows]
    answers = [
        tokenizer(row["completion"] + tokenizer.eos_token, add_special_tokens=False)["input_ids"]
        for row in rows
    ]
    width = max(len(p) + len(a) for p, a in zip(prompts, answers, strict=True))
    ids = torch.full((len(rows), width), tokenizer.pad_token_id)
    mask = torch.zeros_like(ids)
    for i, (p, a) in enumerate(zip(prompts, answers, strict=True)):
        ids[i, : len(p) + len(a)] = torch.tensor(p + a)
        mask[i, : len(p) + len(a)] = 1
    with torch.no_grad():
        logps = model(input_ids=ids, attention_mask=mask).logits[:, :-1].log_softmax(-1)
    token_logps = logps.gather(-1, ids[:, 1:, None])[..., 0]
    return [
        token_logps[i, len(p) - 1 : len(p) + len(a) - 1].sum().item()
        for i, (p, a) in enumerate(zip(prompts, answers, strict=True))
    ]


def test_model_reloads_with_auto_classes(built: dict[str, Path]) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = built["warm"]
    assert (path / "model.safetensors").is_file() and not list(path.glob("*.bin"))
    model = AutoModelForCausalLM.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    config = model.config
    assert config.model_type == "llama" and not config.tie_word_embeddings
    assert (config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads) == (2, 4, 2)
    assert config.vocab_size == len(tokenizer) < 128
    assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (
        tokenizer.bos_token_id,
        tokenizer.eos_token_id,
        tokenizer.pad_token_id,
    )
    assert sum(p.numel() for p in model.parameters()) < 200_000

    batch = tokenizer(["What is 1 + 1?\n", "Compute 7 * 8.\n"], padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape == (2, batch["input_ids"].shape[1], config.vocab_size)
    assert torch.isfinite(logits).all()

    # The saved tokenizer behaves like the built one: BOS, round-trip, chat template.
    text = "Sam has 3 apples.\nThe answer is 3."
    assert tokenizer(text)["input_ids"][0] == tokenizer.bos_token_id
    assert tokenizer.decode(tokenizer(text)["input_ids"], skip_special_tokens=True) == text
    assert tokenizer.get_vocab() == assets.build_tokenizer().get_vocab()
    chat = [{"role": "user", "content": "Hi"}]
    assert (
        tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
        == "User: Hi\nAssistant: "
    )


def test_warm_up_raises_desirable_log_probs(built: dict[str, Path]) -> None:
    rows = [row for row in read_jsonl(REPO / "data/arithmetic.jsonl") if row["label"]][:48]
    before = completion_logps(built["initial"], rows)
    after = completion_logps(built["warm"], rows)
    # Per completion token: a uniform guess is log(1/86) = -4.45; the warm-up must clearly beat it.
    n_tokens = sum(len(row["completion"]) + 1 for row in rows)
    assert sum(after) / n_tokens < 0 and sum(after) / n_tokens > sum(before) / n_tokens + 1.0


def test_build_is_a_no_op_when_complete_and_rebuilds_with_force(built: dict[str, Path], capsys) -> None:
    path = built["initial"]
    stamp = (path / "model.safetensors").stat().st_mtime_ns
    start = time.perf_counter()
    assert assets.build_tiny_model(path, warmup_steps=0) == path
    assert time.perf_counter() - start < 1.0 and (path / "model.safetensors").stat().st_mtime_ns == stamp
    assert assets.ensure_tiny_model(path) == path
    capsys.readouterr()
    assets.build_tiny_model(path, REPO / "data/arithmetic.jsonl", warmup_steps=0, force=True)
    assert "tiny-llama:" in capsys.readouterr().out
    assert (path / "config.json").is_file() and not list(path.parent.glob(".*"))  # no temp leftovers


def test_build_is_deterministic(built: dict[str, Path], tmp_path: Path) -> None:
    again = assets.build_tiny_model(tmp_path / "again", REPO / "data/arithmetic.jsonl", warmup_steps=0)
    assert (again / "model.safetensors").read_bytes() == (built["initial"] / "model.safetensors").read_bytes()


def test_missing_explicit_data_path_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        assets.build_tiny_model(tmp_path / "m", tmp_path / "nope.jsonl", warmup_steps=0)
    assert not (tmp_path / "m").exists()
