"""Tokenization and the truncation policy, with hand-written expected ids.

The fixture tokenizer is character level: every printable ASCII char's id is its code point (so "a" is
97), "\\n" is 10, and the specials are <pad>=0, <s>=1, </s>=2, <unk>=3.
"""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer, models, processors
from transformers import PreTrainedTokenizerFast

from kto_ray.data.tokenize import Tokenized, tokenize_batch, truncate

BOS, EOS = 1, 2


def _char_tokenizer(*, add_bos: bool = True, add_eos: bool = False) -> PreTrainedTokenizerFast:
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, "\n": 10, **{chr(i): i for i in range(32, 127)}}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.add_special_tokens(["<pad>", "<s>", "</s>", "<unk>"])
    single = " ".join([*(["<s>"] if add_bos else []), "$A", *(["</s>"] if add_eos else [])])
    tok.post_processor = processors.TemplateProcessing(
        single=single, special_tokens=[("<s>", 1), ("</s>", 2)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


@pytest.fixture
def tokenizer() -> PreTrainedTokenizerFast:
    return _char_tokenizer()


def ids(text: str) -> list[int]:
    return [ord(c) for c in text]


def tokenize_one(tokenizer, prompt: str, completion: str, **limits: int) -> Tokenized | None:
    """One row through the batched path."""
    return tokenize_batch(tokenizer, [prompt], [completion], **limits)[0]


# ---- truncate: pure id arithmetic --------------------------------------------------------------------


def test_truncate_keeps_everything_that_fits():
    assert truncate([1, 2, 3], [4, 5], max_length=5, max_prompt_length=3) == Tokenized([1, 2, 3], [4, 5])


def test_truncate_prompt_keeps_its_last_tokens():
    assert truncate([10, 11, 12, 13, 14], [20, 21], max_length=10, max_prompt_length=3) == Tokenized(
        [12, 13, 14], [20, 21]
    )


def test_truncate_completion_keeps_its_start():
    assert truncate([10, 11], [20, 21, 22, 23, 24], max_length=5, max_prompt_length=4) == Tokenized(
        [10, 11], [20, 21, 22]
    )


def test_truncate_prompt_first_then_completion():
    # prompt 6 -> last 4; budget 7 - 4 = 3 completion tokens
    out = truncate([1, 2, 3, 4, 5, 6], [7, 8, 9, 10, 11], max_length=7, max_prompt_length=4)
    assert out == Tokenized([3, 4, 5, 6], [7, 8, 9])


def test_truncate_exact_boundaries_are_not_cut():
    assert truncate([1, 2, 3], [4, 5, 6], max_length=6, max_prompt_length=3) == Tokenized(
        [1, 2, 3], [4, 5, 6]
    )
    # one more completion token than fits: exactly one is cut
    assert truncate([1, 2, 3], [4, 5, 6, 7], max_length=6, max_prompt_length=3) == Tokenized(
        [1, 2, 3], [4, 5, 6]
    )
    # one more prompt token than max_prompt_length: exactly the first is cut
    assert truncate([1, 2, 3, 4], [5], max_length=6, max_prompt_length=3) == Tokenized([2, 3, 4], [5])


def test_truncate_leaves_one_completion_token():
    assert truncate([1, 2, 3], [4, 5], max_length=4, max_prompt_length=3) == Tokenized([1, 2, 3], [4])


def test_truncate_returns_none_when_no_completion_token_is_left():
    assert truncate([1, 2, 3], [4, 5], max_length=3, max_prompt_length=3) is None
    assert truncate([1, 2, 3], [], max_length=10, max_prompt_length=5) is None


def test_truncate_returns_none_without_prompt_tokens():
    assert truncate([], [4, 5], max_length=10, max_prompt_length=5) is None


def test_truncate_does_not_alias_its_inputs():
    prompt, completion = [1, 2], [3, 4]
    out = truncate(prompt, completion, max_length=10, max_prompt_length=5)
    assert out is not None
    out.prompt_ids.append(99)
    out.completion_ids.append(99)
    assert prompt == [1, 2] and completion == [3, 4]


# ---- with a tokenizer --------------------------------------------------------------------------------


def test_prompt_gets_bos_and_completion_gets_eos(tokenizer):
    out = tokenize_one(tokenizer, "Q: 2+2?", " 4", max_length=64, max_prompt_length=32)
    assert out == Tokenized([BOS, *ids("Q: 2+2?")], [*ids(" 4"), EOS])


def test_bos_is_not_doubled_when_the_prompt_text_has_it(tokenizer):
    out = tokenize_one(tokenizer, "<s>hi", "yo", max_length=64, max_prompt_length=32)
    assert out == Tokenized([BOS, *ids("hi")], [*ids("yo"), EOS])


def test_eos_is_not_doubled_when_the_completion_ends_with_it(tokenizer):
    out = tokenize_one(tokenizer, "hi", "yo</s>", max_length=64, max_prompt_length=32)
    assert out == Tokenized([BOS, *ids("hi")], [*ids("yo"), EOS])


def test_eos_is_not_added_after_a_rendered_eos_and_whitespace(tokenizer):
    # chat templates end an assistant turn with EOS text and a newline: no second EOS
    out = tokenize_one(tokenizer, "hi", "yo</s>\n", max_length=64, max_prompt_length=32)
    assert out == Tokenized([BOS, *ids("hi")], [*ids("yo"), EOS, 10])


def test_eos_text_inside_the_completion_does_not_count(tokenizer):
    out = tokenize_one(tokenizer, "hi", "a</s>b", max_length=64, max_prompt_length=32)
    assert out == Tokenized([BOS, *ids("hi")], [*ids("a"), EOS, *ids("b"), EOS])


def test_no_bos_when_the_tokenizer_adds_none():
    out = tokenize_one(_char_tokenizer(add_bos=False), "hi", "yo", max_length=64, max_prompt_length=32)
    assert out == Tokenized(ids("hi"), [*ids("yo"), EOS])


def test_eos_added_by_the_post_processor_is_removed_from_the_prompt():
    out = tokenize_one(_char_tokenizer(add_eos=True), "hi", "yo", max_length=64, max_prompt_length=32)
    assert out == Tokenized([BOS, *ids("hi")], [*ids("yo"), EOS])


def test_long_prompt_keeps_its_end_and_drops_bos(tokenizer):
    out = tokenize_one(tokenizer, "abcdef", "x", max_length=10, max_prompt_length=3)
    assert out == Tokenized(ids("def"), [*ids("x"), EOS])


def test_long_completion_keeps_its_start_and_loses_eos(tokenizer):
    out = tokenize_one(tokenizer, "ab", "wxyz", max_length=5, max_prompt_length=4)
    assert out == Tokenized([BOS, *ids("ab")], ids("wx"))


def test_eos_kept_at_the_exact_boundary(tokenizer):
    # BOS + 2 prompt tokens + 2 completion tokens + EOS = 6 = max_length
    out = tokenize_one(tokenizer, "ab", "yz", max_length=6, max_prompt_length=3)
    assert out == Tokenized([BOS, *ids("ab")], [*ids("yz"), EOS])


def test_none_when_the_prompt_fills_max_length(tokenizer):
    assert tokenize_one(tokenizer, "abcdef", "x", max_length=4, max_prompt_length=4) is None


def test_batch_matches_one_by_one(tokenizer):
    prompts = ["<s>one", "two", "three is long", "<s>four"]
    completions = ["a", "bb</s>", "ccc", "dddddddd"]
    kw = {"max_length": 9, "max_prompt_length": 5}
    batch = tokenize_batch(tokenizer, prompts, completions, **kw)
    assert batch == [tokenize_one(tokenizer, p, c, **kw) for p, c in zip(prompts, completions, strict=True)]
    assert batch[0] == Tokenized([BOS, *ids("one")], [*ids("a"), EOS])
    assert batch[2] == Tokenized(ids(" long"), [*ids("ccc"), EOS])
    assert batch[3] == Tokenized([BOS, *ids("four")], ids("dddd"))


def test_batch_of_nothing(tokenizer):
    assert tokenize_batch(tokenizer, [], [], max_length=8, max_prompt_length=4) == []


def test_batch_length_mismatch_is_a_bug(tokenizer):
    with pytest.raises(ValueError):
        tokenize_batch(tokenizer, ["a"], [], max_length=8, max_prompt_length=4)
