"""The driver's LoopConfig as Ray Train carries it to the workers: inside the train_loop_config dict,
through pickle."""

from __future__ import annotations

import pickle

import pytest

from kto_ray.config import KTOConfig
from kto_ray.training.schedule.loop_config import LoopConfig

SECRET = "wandb-api-key-0123456789"


def _loop() -> LoopConfig:
    return LoopConfig(
        config=KTOConfig(),
        train_rows=None,  # a store index or an object ref in a run; neither is needed here
        eval_rows=None,
        total_steps=12,
        global_batch=8,
        desirable_weight=1.33,
        tracking_env={"WANDB_API_KEY": SECRET},
        storage_env={"AWS_ENDPOINT_URL": "http://127.0.0.1:9000"},
    )


def test_the_loop_config_round_trips_through_the_train_loop_config():
    loop = _loop()
    carried = pickle.loads(pickle.dumps(loop.as_train_loop_config()))
    unwrapped = LoopConfig.from_train_loop_config(carried)
    assert unwrapped == loop and unwrapped is not loop


def test_its_text_names_no_environment():
    # Ray Train records the loop config's text in its run state.
    assert SECRET not in repr(_loop()) and SECRET not in str(_loop().as_train_loop_config())
    assert "total_steps=12" in repr(_loop())


def test_a_plain_dict_is_refused():
    with pytest.raises(TypeError, match=r"not a LoopConfig.*\['config', 'total_steps'\]"):
        LoopConfig.from_train_loop_config({"config": {}, "total_steps": 12})
