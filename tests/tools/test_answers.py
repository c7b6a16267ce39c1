"""Answer accuracy: the arithmetic checker, greedy generation on the tiny model, training's truncation."""

from __future__ import annotations

import pytest

from kto_ray.assets.arithmetic import heldout_problems
from kto_ray.data.tokenize import tokenize_batch
from kto_ray.tools.answers import arithmetic_checker, prompt_ids, render_prompt, score_answers
from tests.helpers import make_config

ROW = {"prompt": "What is 7 * 5?\n", "answer": 35}


@pytest.mark.parametrize(
    ("completion", "right"),
    [
        ("The answer is 35.", True),
        ("7 * 5 = 35. The answer is 35.", True),
        ("Let me work it out: 7 * 5 = 35. So the answer is 35.", True),
        ("The answer is 36.", False),
        ("7 * 5 = 35. The answer is 36.", False),  # every stated result must agree
        ("7 * 5 = 3", False),
        ("", False),
        ("The answer is", False),
        ("35 apples", False),  # no stated result: malformed
        ("The it: 9 - 8 = 9.", False),
    ],
)
def test_arithmetic_checker(completion: str, right: bool) -> None:
    assert arithmetic_checker(ROW, completion) is right


@pytest.fixture(scope="module")
def model_and_tokenizer(tiny_model):
    from transformers import AutoTokenizer

    return str(tiny_model), AutoTokenizer.from_pretrained(tiny_model)


@pytest.fixture(scope="module")
def cfg(tiny_model, small_data, tmp_path_factory):
    return make_config(tiny_model, small_data, tmp_path_factory.mktemp("answers"))


def test_render_prompt_matches_training(model_and_tokenizer) -> None:
    _, tokenizer = model_and_tokenizer
    assert render_prompt(tokenizer, "What is 1 + 1?\n") == "What is 1 + 1?\n"  # text as written
    chat = [{"role": "user", "content": "What is 1 + 1?"}]
    assert render_prompt(tokenizer, chat) == "User: What is 1 + 1?\nAssistant: "  # generation prompt


def test_prompt_ids_truncate_like_training(model_and_tokenizer) -> None:
    _, tokenizer = model_and_tokenizer
    long = "I am checking my homework and want to be sure. " * 5 + "What is 2 + 2?\n"
    ids = prompt_ids(tokenizer, [long, "Compute 3 - 1.\n"], max_prompt_length=32)
    [trained] = tokenize_batch(tokenizer, [long], ["The answer is 4."], max_length=64, max_prompt_length=32)
    assert ids[0] == trained.prompt_ids and len(ids[0]) == 32  # the last 32 tokens, the question kept
    assert tokenizer.decode(ids[0]).endswith("What is 2 + 2?\n")
    assert ids[1][0] == tokenizer.bos_token_id and tokenizer.decode(ids[1][1:]) == "Compute 3 - 1.\n"


@pytest.mark.slow
def test_answers_are_text_for_each_prompt(model_and_tokenizer, cfg, ray_local) -> None:
    # On the actors (kto_ray/reference/scoring.py), as the demo's answer check runs.
    model, tokenizer = model_and_tokenizer
    prompts = ["What is 7 + 3?\n", "Compute 2 * 4.\n", "I am checking my homework. What is 9 - 1?\n" * 3]

    def texts(some: list[str]) -> list[str]:
        rows = [{"prompt": p} for p in some]
        score = score_answers(
            cfg, model, rows, lambda row, text: False, max_prompt_length=64, max_new_tokens=24
        )
        return [a.completion for a in score.answers]

    batched = texts(prompts)
    assert len(batched) == 3 and all(isinstance(t, str) and t for t in batched)
    assert all(len(tokenizer(t, add_special_tokens=False)["input_ids"]) <= 24 for t in batched)
    # Left padding: each prompt's answer is the same alone as in a batch with longer prompts.
    assert texts(prompts[:1]) == batched[:1]


@pytest.mark.slow
def test_score_answers_on_heldout_prompts(model_and_tokenizer, cfg, ray_local) -> None:
    model, _ = model_and_tokenizer
    train = {"What is 7 + 3?\n"}
    rows = heldout_problems(12, seed=3, exclude=train)
    assert len({r["prompt"] for r in rows}) == 12 and not train & {r["prompt"] for r in rows}
    score = score_answers(cfg, model, rows, arithmetic_checker, max_prompt_length=128, max_new_tokens=64)
    assert len(score.answers) == 12 and 0.0 <= score.accuracy <= 1.0
    assert score.accuracy == sum(a.correct for a in score.answers) / 12
    assert [a.prompt for a in score.answers] == [r["prompt"] for r in rows]
