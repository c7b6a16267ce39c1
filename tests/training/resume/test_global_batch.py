"""The global batch as a run's contract: fixed by the most workers, split into accumulation on any
worker count that divides it, refused in one line where one cannot."""

import numpy as np
import pytest

from kto_ray.config import load_config
from kto_ray.errors import UserError
from kto_ray.training.resume.global_batch import (
    accumulation,
    check_worker_range,
    config_for_world,
    first_global_batch,
)
from kto_ray.training.schedule.batching import Schedule


def test_the_first_start_fixes_it_at_the_most_workers():
    cfg = load_config(
        None, ["cluster.workers=[1, 4]", "train.micro_batch_size=2", "train.grad_accumulation=3"]
    )
    assert first_global_batch(cfg) == 4 * 2 * 3


def test_accumulation_makes_up_for_fewer_workers():
    assert accumulation(16, 2, 4) == 2 and accumulation(16, 1, 4) == 4 and accumulation(16, 4, 4) == 1
    with pytest.raises(UserError, match="global batch of 16 rows cannot be split over 3 workers"):
        accumulation(16, 3, 4)


def test_a_range_any_count_of_which_cannot_split_it_is_refused_naming_the_counts():
    check_worker_range(24, (1, 4), 2)  # 2, 4, 6, 8 all divide 24
    with pytest.raises(UserError) as err:
        check_worker_range(16, (1, 4), 2)
    assert "cannot be split over 3 workers" in str(err.value) and "cluster.workers 1-4" in str(err.value)
    with pytest.raises(UserError, match=r"over 3 workers x train\.micro_batch_size 4"):
        check_worker_range(16, (3, 3), 4)


def test_a_worker_builds_its_schedule_from_its_world_size():
    cfg = load_config(
        None, ["cluster.workers=[1, 2]", "train.micro_batch_size=2", "train.grad_accumulation=2"]
    )
    one, two = (config_for_world(cfg, first_global_batch(cfg), world).train for world in (1, 2))
    assert (one.grad_accumulation, two.grad_accumulation) == (4, 2)
    assert cfg.train.grad_accumulation == 2  # the config itself is left as it was
    # The same rows make every step on either count: the order depends only on rows per step.
    lengths = np.random.default_rng(0).integers(5, 90, 40)
    s1 = Schedule(40, 1, one.micro_batch_size, one.grad_accumulation, 7, lengths)
    s2 = Schedule(40, 2, two.micro_batch_size, two.grad_accumulation, 7, lengths)
    for step in range(6):
        rows1 = np.concatenate(s1.rows_for(step, 0))
        rows2 = np.concatenate([*s2.rows_for(step, 0), *s2.rows_for(step, 1)])
        assert sorted(rows1) == sorted(rows2)
