"""KL pairing invariants and the seeded train/eval split."""

from __future__ import annotations

import numpy as np
import pytest

from kto_ray.data.pairing import kl_partners, split_assignment
from kto_ray.errors import UserError


def assert_valid_pairing(prompts: list[str], partner: list[int]) -> None:
    assert len(partner) == len(prompts)
    for i, j in enumerate(partner):
        assert isinstance(j, int) and 0 <= j < len(prompts)
        assert j != i
        assert prompts[j] != prompts[i]


def test_partners_have_a_different_prompt():
    prompts = [f"p{i}" for i in range(50)]
    assert_valid_pairing(prompts, kl_partners(prompts, seed=0))


def test_deterministic_for_a_seed_and_seed_dependent():
    prompts = [f"p{i % 37}" for i in range(200)]
    assert kl_partners(prompts, seed=3) == kl_partners(prompts, seed=3)
    assert kl_partners(prompts, seed=3) != kl_partners(prompts, seed=4)


def test_many_duplicate_prompts_still_pair():
    # 95% of rows share one prompt: every such row must pair with one of the few others
    prompts = ["common"] * 95 + [f"rare{i}" for i in range(5)]
    for seed in range(20):
        partner = kl_partners(prompts, seed=seed)
        assert_valid_pairing(prompts, partner)
        assert all(prompts[partner[i]].startswith("rare") for i in range(95))


def test_two_prompts_pair_with_each_other():
    prompts = ["a", "b", "a", "b", "b"]
    for seed in range(10):
        assert_valid_pairing(prompts, kl_partners(prompts, seed=seed))


def test_runs_that_wrap_around_are_handled():
    # with 3 distinct prompts and heavy duplication, some seeds shuffle the same prompt to both ends
    prompts = ["x"] * 6 + ["y", "z"]
    for seed in range(200):
        assert_valid_pairing(prompts, kl_partners(prompts, seed=seed))


def test_partner_is_the_next_row_with_a_different_prompt_in_shuffled_order():
    prompts = ["a", "a", "b", "c", "c", "d", "a"]
    seed = 7
    order = np.random.default_rng(seed).permutation(len(prompts)).tolist()
    partner = kl_partners(prompts, seed=seed)
    for pos, i in enumerate(order):
        k = 1
        while prompts[order[(pos + k) % len(order)]] == prompts[i]:
            k += 1
        assert partner[i] == order[(pos + k) % len(order)]


def test_negative_seed_is_accepted():
    prompts = ["a", "b", "c"]
    assert kl_partners(prompts, seed=-1) == kl_partners(prompts, seed=-1)


@pytest.mark.parametrize("prompts", [["same"] * 5, ["only"], []])
def test_fewer_than_two_distinct_prompts_is_a_user_error(prompts):
    with pytest.raises(UserError, match="KL pairing needs at least two different prompts"):
        kl_partners(prompts, seed=0)


@pytest.mark.parametrize(
    ("n", "fraction", "expected_eval"),
    [(100, 0.05, 5), (100, 0.0, 0), (10, 0.25, 2), (3, 0.01, 1), (2, 0.9, 1), (1, 0.5, 0), (0, 0.1, 0)],
)
def test_split_sizes(n, fraction, expected_eval):
    split = split_assignment(n, fraction, seed=0)
    assert len(split) == n
    assert set(split) <= {"train", "eval"}
    assert split.count("eval") == expected_eval
    if fraction > 0 and n >= 2:
        assert split.count("train") >= 1


def test_split_is_seeded():
    assert split_assignment(1000, 0.1, seed=1) == split_assignment(1000, 0.1, seed=1)
    assert split_assignment(1000, 0.1, seed=1) != split_assignment(1000, 0.1, seed=2)


@pytest.mark.parametrize("fraction", [-0.1, 1.0, 1.5])
def test_split_rejects_a_bad_fraction(fraction):
    with pytest.raises(UserError, match="eval_fraction"):
        split_assignment(10, fraction, seed=0)
