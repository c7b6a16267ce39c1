"""The stream rule (data.pairing: stream): pairs and splits that rows appended later never change."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from kto_ray.data.streaming import WINDOW, row_digest, stream_partners, stream_split
from kto_ray.errors import UserError
from tests.data.test_pairing import assert_valid_pairing


def _prompts(n: int, distinct: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [f"p{rng.randrange(distinct)}" for _ in range(n)]


@pytest.mark.parametrize("distinct", [2, 3, 40, 5000])
def test_partners_have_another_prompt(distinct):
    prompts = _prompts(3000, distinct)
    assert_valid_pairing(prompts, stream_partners(prompts, seed=0))


def test_every_prefix_keeps_its_partners():
    prompts = _prompts(6000, 30, seed=1)
    full = stream_partners(prompts, seed=7)
    for end in (2, 17, 1000, 4097, 5999):
        if len(set(prompts[:end])) >= 2:
            assert stream_partners(prompts[:end], seed=7) == full[:end]


def test_rows_before_the_first_prompt_change_take_the_first_other_prompt():
    prompts = ["a"] * 5 + ["b"] + ["a"] * 3 + ["c"]
    partner = stream_partners(prompts, seed=0)
    assert partner[:5] == [5] * 5
    assert_valid_pairing(prompts, partner)
    # Rows after the change draw from earlier rows only.
    assert all(partner[i] < i for i in range(5, len(prompts)))


def test_partners_stay_within_the_window_and_serve_about_once():
    prompts = [f"p{i}" for i in range(3 * WINDOW)]
    partner = stream_partners(prompts, seed=0)
    assert all(0 < i - j <= WINDOW for i, j in enumerate(partner) if i)
    uses = Counter(partner)
    late = [uses[j] for j in range(WINDOW, 2 * WINDOW)]  # rows with full windows after them
    assert sum(late) / len(late) == pytest.approx(1.0, abs=0.05)
    assert max(late) < 12


def test_seeded():
    prompts = _prompts(500, 20)
    assert stream_partners(prompts, seed=3) == stream_partners(prompts, seed=3)
    assert stream_partners(prompts, seed=3) != stream_partners(prompts, seed=4)


def test_one_prompt_is_refused():
    with pytest.raises(UserError, match="at least two different prompts"):
        stream_partners(["same"] * 4, seed=0)


def test_split_is_a_function_of_the_row():
    digests = [row_digest(f"prompt {i}", f"completion {i}", i % 2 == 0) for i in range(20000)]
    split = stream_split(digests, 0.1, seed=0)
    assert split.count("eval") / len(split) == pytest.approx(0.1, abs=0.01)
    # The same row gets the same split wherever it sits and whatever else the data holds.
    shuffled = list(range(len(digests)))
    random.Random(0).shuffle(shuffled)
    again = stream_split([digests[i] for i in shuffled[:5000]], 0.1, seed=0)
    assert again == [split[i] for i in shuffled[:5000]]
    assert stream_split(digests, 0.1, seed=1) != split
    assert set(stream_split(digests, 0.0, seed=0)) == {"train"}


def test_row_digest_is_the_content():
    assert row_digest("p", "c", True) == row_digest("p", "c", True)
    assert len({row_digest("p", "c", True), row_digest("p", "c", False), row_digest("pc", "", True)}) == 3


@pytest.mark.parametrize("fraction", [-0.1, 1.0])
def test_split_rejects_a_bad_fraction(fraction):
    with pytest.raises(UserError, match="eval_fraction"):
        stream_split([b"x" * 16], fraction, seed=0)
