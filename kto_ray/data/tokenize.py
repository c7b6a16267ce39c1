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


def tokenize_batch(
    tokenizer: Any, prompts: list[str], completions: list[str], *, max_length: int, max_prompt_length: int
) -> list[Tokenized | None]:
    """Tokenize and truncate many rows with batched tokenizer calls (the fast tokenizers run them in Rust)."""
    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
    bos = getattr(tokenizer, "bos_token", None)
    eos_id, eos = getattr(tokenizer, "eos_token_id", None), getattr(tokenizer, "eos_token", None)
    has_bos = [bool(bos) and p.startswith(bos) for p in prompts]
    # two batched calls: prompts that already carry their BOS text, and the rest (which get specials)
    as_written = iter(_encode(tokenizer, [p for p, b in zip(prompts, has_bos) if b], special=False))
    with_specials = iter(_encode(tokenizer, [p for p, b in zip(prompts, has_bos) if not b], special=True))
    rows = []
    for prompt, completion, bos_in_text, completion_ids in zip(
        prompts, completions, has_bos, _encode(tokenizer, completions, special=False), strict=True
    ):
        prompt_ids = next(as_written) if bos_in_text else next(with_specials)
        # some post-processors append EOS to every sequence; a prompt must flow into its completion
        added_eos = eos_id is not None and prompt_ids and prompt_ids[-1] == eos_id
        if not bos_in_text and added_eos and not (eos and prompt.endswith(eos)):
            prompt_ids = prompt_ids[:-1]
        ends_with_eos = (completion_ids and completion_ids[-1] == eos_id) or (
            eos and completion.rstrip().endswith(eos)
        )
        if eos_id is not None and not ends_with_eos:
            completion_ids = [*completion_ids, eos_id]
        rows.append(
            truncate(prompt_ids, completion_ids, max_length=max_length, max_prompt_length=max_prompt_length)
        )
    return rows


def _encode(tokenizer: Any, texts: list[str], *, special: bool) -> list[list[int]]:
    if not texts:
        return []
    # verbose=False: texts longer than model_max_length are expected here, truncation is ours
    out = tokenizer(texts, add_special_tokens=special, return_attention_mask=False, verbose=False)
    return [list(ids) for ids in out["input_ids"]]
