"""Task accuracy of a model's own answers: greedy generation on held-out prompts, scored by a checker.

Implied-reward metrics say how a model ranks given completions; this says whether what it writes is
right. Any task plugs in a `Checker` (prompt row, generated text) -> bool; `arithmetic_checker` is the
one for the embedded data. Prompts are rendered and truncated exactly as training sees them.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from kto_ray.config import KTOConfig
from kto_ray.data.tokenize import tokenize_batch

Checker = Callable[[Mapping[str, Any], str], bool]

# What the arithmetic completions claim as the result: "= 12" and "answer is 12".
_CLAIM = re.compile(r"(?:=|answer is)\s*(-?\d+)")


def arithmetic_checker(row: Mapping[str, Any], completion: str) -> bool:
    """Right when the completion states a result and every result it states equals row["answer"].

    Every claim must agree: "7 * 5 = 35. So the answer is 36." is wrong, not half right.
    """
    claims = _CLAIM.findall(completion)
    return bool(claims) and all(int(c) == int(row["answer"]) for c in claims)


def render_prompt(tokenizer: Any, prompt: str | Sequence[Mapping[str, str]]) -> str:
    """Text as training renders it: text prompts as written, chat prompts through the chat template."""
    if isinstance(prompt, str):
        return prompt
    messages = [{"role": m["role"], "content": m["content"]} for m in prompt]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def prompt_ids(tokenizer: Any, prompts: Sequence[str], max_prompt_length: int) -> list[list[int]]:
    """Token ids of rendered prompts with training's policy (BOS handling, keep the last tokens).

    tokenize_batch is the one place that policy lives; a one-character placeholder completion with
    room to spare makes it return the prompt part only, truncated as in training.
    """
    limits = {"max_length": max_prompt_length + 4, "max_prompt_length": max_prompt_length}
    tokenized = tokenize_batch(tokenizer, list(prompts), ["0"] * len(prompts), **limits)
    return [t.prompt_ids if t is not None else [] for t in tokenized]


@dataclass(frozen=True)
class Answer:
    prompt: str
    completion: str
    correct: bool


@dataclass(frozen=True)
class AnswerScore:
    accuracy: float
    answers: list[Answer]


def score_answers(
    cfg: KTOConfig,
    model_path: str,
    rows: Sequence[Mapping[str, Any]],
    checker: Checker,
    *,
    max_prompt_length: int,
    max_new_tokens: int,
) -> AnswerScore:
    """Generate greedily for each row["prompt"] with the model at `model_path` (on the actors) and score
    every completion with `checker` (here)."""
    from kto_ray.models.loading import load_tokenizer
    from kto_ray.reference.scoring import GenerationSettings, generate_on_actors
    from kto_ray.tools.evaluate import on_the_cluster

    tokenizer = load_tokenizer(cfg.model, model_path)
    prompts = [render_prompt(tokenizer, row["prompt"]) for row in rows]
    ids = prompt_ids(tokenizer, prompts, max_prompt_length)
    # Batches of similar length waste less compute on padding; results go back to their prompt's slot.
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    settings = GenerationSettings(max_new_tokens=max_new_tokens, batch_size=64)
    with on_the_cluster(cfg):
        generated = generate_on_actors(cfg, model_path, [ids[i] for i in order], settings)
    texts = [text for _, text in sorted(zip(order, generated, strict=True))]
    answers = [Answer(p, t, checker(row, t)) for p, t, row in zip(prompts, texts, rows, strict=True)]
    accuracy = sum(a.correct for a in answers) / len(answers) if answers else 0.0
    return AnswerScore(accuracy, answers)
