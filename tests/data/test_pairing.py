"""The KL pairing and the train/eval split: pairs and splits that rows appended later never change."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from kto_ray.data.pairing import WINDOW, kl_partners, row_digest, split_assignment
from kto_ray.errors import UserError


def assert_valid_pairing(prompts: list[str], partner: list[int]) -> None:
    assert len(partner) == len(prompts)
    for i, j in enumerate(partner):
        assert isinstance(j, int) and 0 <= j < len(prompts)
        assert j != i
        assert prompts[j] != prompts[i]


def _prompts(n: int, distinct: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [f"p{rng.randrange(distinct)}" for _ in range(n)]


@pytest.mark.parametrize("distinct", [2, 3, 40, 5000])
def test_partners_have_another_prompt(distinct):
    prompts = _prompts(3000, distinct)
    assert_valid_pairing(prompts, kl_partners(prompts, seed=0))


def test_many_duplicate_prompts_still_pair():
    # 95% of rows share one prompt: every such row must pair with one of the few others
    prompts = ["common"] * 95 + [f"rare{i}" for i in range(5)]
    random.Random(0).shuffle(prompts)
    for seed in range(20):
        partner = kl_partners(prompts, seed=seed)
        assert_valid_pairing(prompts, partner)
        assert all(prompts[partner[i]].startswith("rare") for i, p in enumerate(prompts) if p == "common")


def test_every_prefix_keeps_its_partners():
    prompts = _prompts(6000, 30, seed=1)
    full = kl_partners(prompts, seed=7)
    for end in (2, 17, 1000, 4097, 5999):
        if len(set(prompts[:end])) >= 2:
            assert kl_partners(prompts[:end], seed=7) == full[:end]


def test_rows_before_the_first_prompt_change_take_the_first_other_prompt():
    prompts = ["a"] * 5 + ["b"] + ["a"] * 3 + ["c"]
    partner = kl_partners(prompts, seed=0)
    assert partner[:5] == [5] * 5
    assert_valid_pairing(prompts, partner)
    # Rows after the change draw from earlier rows only.
    assert all(partner[i] < i for i in range(5, len(prompts)))


def test_partners_stay_within_the_window_and_serve_about_once():
    prompts = [f"p{i}" for i in range(3 * WINDOW)]
    partner = kl_partners(prompts, seed=0)
    assert all(0 < i - j <= WINDOW for i, j in enumerate(partner) if i)
    uses = Counter(partner)
    late = [uses[j] for j in range(WINDOW, 2 * WINDOW)]  # rows with full windows after them
    assert sum(late) / len(late) == pytest.approx(1.0, abs=0.05)
    assert max(late) < 12


def test_seeded():
    prompts = _prompts(500, 20)
    assert kl_partners(prompts, seed=3) == kl_partners(prompts, seed=3)
    assert kl_partners(prompts, seed=3) != kl_partners(prompts, seed=4)


def test_negative_seed_is_accepted():
    prompts = _prompts(50, 5)
    partner = kl_partners(prompts, seed=-1)
    assert partner == kl_partners(prompts, seed=-1)
    assert_valid_pairing(prompts, partner)
    digests = [row_digest(p, "c", True) for p in prompts]
    assert split_assignment(digests, 0.5, seed=-1) == split_assignment(digests, 0.5, seed=-1)


@pytest.mark.parametrize("prompts", [["same"] * 5, ["only"], []])
def test_fewer_than_two_distinct_prompts_is_a_user_error(prompts):
    with pytest.raises(UserError, match="KL pairing needs at least two different prompts"):
        kl_partners(prompts, seed=0)


def test_split_is_a_function_of_the_row():
    digests = [row_digest(f"prompt {i}", f"completion {i}", i % 2 == 0) for i in range(20000)]
    split = split_assignment(digests, 0.1, seed=0)
    assert split.count("eval") / len(split) == pytest.approx(0.1, abs=0.01)
    # The same row gets the same split wherever it sits and whatever else the data holds.
    shuffled = list(range(len(digests)))
    random.Random(0).shuffle(shuffled)
    again = split_assignment([digests[i] for i in shuffled[:5000]], 0.1, seed=0)
    assert again == [split[i] for i in shuffled[:5000]]
    assert split_assignment(digests, 0.1, seed=1) != split
    assert set(split_assignment(digests, 0.0, seed=0)) == {"train"}


def test_row_digest_is_the_content():
    assert row_digest("p", "c", True) == row_digest("p", "c", True)
    assert len({row_digest("p", "c", True), row_digest("p", "c", False), row_digest("pc", "", True)}) == 3


@pytest.mark.parametrize("fraction", [-0.1, 1.0, 1.5])
def test_split_rejects_a_bad_fraction(fraction):
    with pytest.raises(UserError, match="eval_fraction"):
        split_assignment([b"x" * 16], fraction, seed=0)
