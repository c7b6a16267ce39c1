"""Turn (prompt, completion) text into token ids, with one fixed truncation policy.

Policy (its summary, TRUNCATION_POLICY, is part of the reference store's fingerprint):
1. The prompt is tokenized with the tokenizer's special tokens, so it gets a BOS when the tokenizer adds
   one; a prompt whose text already starts with the BOS string (chat templates often render it) is
   tokenized without special tokens, so it never gets two. A trailing EOS that the tokenizer's post-processor
   appends to the prompt (and that is not in its text) is removed: the prompt must flow into the completion.
2. The completion is tokenized without special tokens, and the EOS id is appended so the model learns
   where to stop, unless it already ends with EOS (as a token, or as text followed only by whitespace:
   chat templates render e.g. "<|im_end|>\n"). Prompt and completion are tokenized separately: the
   boundary between them is exactly where the log-probs start.
3. A prompt longer than max_prompt_length keeps its LAST max_prompt_length tokens (the question is at the
   end; this can drop the BOS).
4. If prompt + completion is longer than max_length, the completion is cut to max_length - len(prompt)
   tokens, keeping its start (the EOS is then cut too).
5. When no completion token is left (or the prompt has no token at all), the result is None: the caller
   drops the row and counts it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

TRUNCATION_POLICY = (
    "v1: prompt with special tokens (one BOS, no EOS), keep last max_prompt_length; "
    "completion without special tokens + EOS (unless it ends with EOS), cut to max_length keeping its start; "
    "drop rows with no completion token left"
)


@dataclass(frozen=True)
class Tokenized:
    prompt_ids: list[int]
    completion_ids: list[int]


def truncate(
    prompt_ids: list[int], completion_ids: list[int], *, max_length: int, max_prompt_length: int
) -> Tokenized | None:
    """Apply steps 3-5 of the policy to already tokenized ids."""
    prompt = list(prompt_ids[-max_prompt_length:]) if max_prompt_length > 0 else []
    completion = list(completion_ids[: max(max_length - len(prompt), 0)])
    if not prompt or not completion:
        return None
    return Tokenized(prompt_ids=prompt, completion_ids=completion)


def tokenize_example(
    tokenizer: Any, prompt: str, completion: str, *, max_length: int, max_prompt_length: int
) -> Tokenized | None:
    """Tokenize and truncate one row; the same as one element of `tokenize_batch`."""
    return tokenize_batch(
        tokenizer, [prompt], [completion], max_length=max_length, max_prompt_length=max_prompt_length
    )[0]


def tokenize_batch(
    tokenizer: Any, prompts: list[str], completions: list[str], *, max_length: int, max_prompt_length: int
) -> list[Tokenized | None]:
    """Tokenize and truncate many rows with batched tokenizer calls (the fast tokenizers run them in Rust)."""
    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
    prompt_ids = _prompt_ids(tokenizer, prompts)
    completion_ids = _completion_ids(tokenizer, completions)
    return [
        truncate(p, c, max_length=max_length, max_prompt_length=max_prompt_length)
        for p, c in zip(prompt_ids, completion_ids, strict=True)
    ]


def _encode(tokenizer: Any, texts: list[str], *, special: bool) -> list[list[int]]:
    if not texts:
        return []
    # verbose=False: texts longer than model_max_length are expected here, truncation is ours
    out = tokenizer(texts, add_special_tokens=special, return_attention_mask=False, verbose=False)
    return [list(ids) for ids in out["input_ids"]]


def _prompt_ids(tokenizer: Any, prompts: list[str]) -> list[list[int]]:
    bos = getattr(tokenizer, "bos_token", None)
    has_bos = {i for i, p in enumerate(prompts) if bos and p.startswith(bos)}
    # two batched calls: prompts that already carry their BOS text, and the rest (which get specials)
    as_written = iter(_encode(tokenizer, [p for i, p in enumerate(prompts) if i in has_bos], special=False))
    with_specials = iter(
        _encode(tokenizer, [p for i, p in enumerate(prompts) if i not in has_bos], special=True)
    )
    return [
        next(as_written) if i in has_bos else _drop_added_eos(tokenizer, p, next(with_specials))
        for i, p in enumerate(prompts)
    ]


def _drop_added_eos(tokenizer: Any, text: str, ids: list[int]) -> list[int]:
    # some tokenizers' post-processors append EOS to every sequence; a prompt must flow into its completion
    eos_id, eos = getattr(tokenizer, "eos_token_id", None), getattr(tokenizer, "eos_token", None)
    if eos_id is not None and ids and ids[-1] == eos_id and not (eos and text.endswith(eos)):
        return ids[:-1]
    return ids


def _completion_ids(tokenizer: Any, completions: list[str]) -> list[list[int]]:
    eos_id, eos = getattr(tokenizer, "eos_token_id", None), getattr(tokenizer, "eos_token", None)
    result = _encode(tokenizer, completions, special=False)
    if eos_id is None:
        return result
    return [
        ids if (ids and ids[-1] == eos_id) or (eos and text.rstrip().endswith(eos)) else [*ids, eos_id]
        for text, ids in zip(completions, result, strict=True)
    ]
