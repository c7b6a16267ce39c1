"""The global batch as a run's contract: train.global_batch_size (null: the most workers x micro-batch),
split into accumulation on any worker count that divides it, refused in one line where one cannot."""

import numpy as np
import pytest

from kto_ray.config import load_config
from kto_ray.errors import UserError
from kto_ray.training.resume.global_batch import (
    accumulation,
    check_worker_range,
)
from kto_ray.training.schedule.batching import Schedule


def test_the_first_start_fixes_it_from_the_config():
    cfg = load_config(
        None, ["cluster.workers=[1, 4]", "train.micro_batch_size=2", "train.global_batch_size=24"]
    )
    assert cfg.first_global_batch == 24
    # null: the most workers x micro-batch, no accumulation at the most workers.
    cfg = load_config(None, ["cluster.workers=[1, 4]", "train.micro_batch_size=2"])
    assert cfg.train.global_batch_size is None and cfg.first_global_batch == 4 * 2


def test_accumulation_makes_up_for_fewer_workers():
    assert accumulation(16, 2, 4) == 2 and accumulation(16, 1, 4) == 4 and accumulation(16, 4, 4) == 1
    with pytest.raises(UserError, match="global batch of 16 rows cannot be split over 3 workers"):
        accumulation(16, 3, 4)


def test_a_global_batch_size_the_workers_cannot_split_is_refused_in_one_line_naming_the_numbers():
    cfg = load_config(None, ["cluster.workers=2", "train.micro_batch_size=4", "train.global_batch_size=12"])
    with pytest.raises(UserError) as err:
        check_worker_range(cfg.first_global_batch, cfg.cluster.worker_range, cfg.train.micro_batch_size)
    line = str(err.value)
    assert len(line.splitlines()) == 1
    assert "a global batch of 12 rows cannot be split over 2 workers x train.micro_batch_size 4" in line


def test_a_range_any_count_of_which_cannot_split_it_is_refused_naming_the_counts():
    check_worker_range(24, (1, 4), 2)  # 2, 4, 6, 8 all divide 24
    with pytest.raises(UserError) as err:
        check_worker_range(16, (1, 4), 2)
    assert "cannot be split over 3 workers" in str(err.value) and "cluster.workers 1-4" in str(err.value)
    with pytest.raises(UserError, match=r"over 3 workers x train\.micro_batch_size 4"):
        check_worker_range(16, (3, 3), 4)


def test_a_worker_builds_its_schedule_from_its_world_size():
    cfg = load_config(
        None, ["cluster.workers=[1, 2]", "train.micro_batch_size=2", "train.global_batch_size=8"]
    )
    micro, global_batch = cfg.train.micro_batch_size, cfg.first_global_batch
    one, two = (accumulation(global_batch, world, micro) for world in (1, 2))
    assert (one, two) == (4, 2)
    # The same rows make every step on either count: the order depends only on rows per step.
    lengths = np.random.default_rng(0).integers(5, 90, 40)
    s1 = Schedule(40, 1, micro, one, 7, lengths)
    s2 = Schedule(40, 2, micro, two, 7, lengths)
    assert s1.rows_per_step == s2.rows_per_step == global_batch
    for step in range(6):
        rows1 = np.concatenate(s1.rows_for(step, 0))
        rows2 = np.concatenate([*s2.rows_for(step, 0), *s2.rows_for(step, 1)])
        assert sorted(rows1) == sorted(rows2)
