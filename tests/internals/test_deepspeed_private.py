"""What kto_ray/internals/deepspeed_private.py relies on in DeepSpeed (written against 0.19.8): these
fail when an upgrade moves or changes it."""

from __future__ import annotations

import sys
from unittest import mock

import pytest

from kto_ray.internals import deepspeed_private


@pytest.fixture(scope="module")
def deepspeed():
    return deepspeed_private.import_deepspeed()


def _upgraded(deepspeed) -> str:
    return f"deepspeed {deepspeed.__version__} (written against {deepspeed_private.WRITTEN_AGAINST})"


def test_deepspeed_imports_without_leaving_mlflow_blocked(deepspeed):
    assert sys.modules.get("mlflow", "absent") is not None  # importable again (None would block it)


def test_the_shm_op_is_one_of_the_compatible_ops(deepspeed):
    assert deepspeed_private.SHM_COMM_OP in deepspeed.ops.__compatible_ops__, _upgraded(deepspeed)


def test_the_universal_load_switch_is_a_config_attribute_put_back_after(deepspeed):
    from deepspeed.runtime.config import DeepSpeedConfig

    config = DeepSpeedConfig({"train_batch_size": 1})
    assert config.load_universal_checkpoint is False, _upgraded(deepspeed)
    engine = mock.Mock(_config=config)
    with deepspeed_private.universal_load(engine, universal=True):
        assert config.load_universal_checkpoint is True
    assert config.load_universal_checkpoint is False


def test_every_zero_optimizer_has_the_micro_step_start(deepspeed):
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    for optimizer in (DeepSpeedZeroOptimizer, DeepSpeedZeroOptimizer_Stage3):
        assert callable(getattr(optimizer, "clear_backward_seen_flag", None)), _upgraded(deepspeed)
    started = mock.Mock()
    deepspeed_private.begin_micro_step(mock.Mock(optimizer=mock.Mock(clear_backward_seen_flag=started)))
    started.assert_called_once_with()


def test_the_converter_takes_exactly_the_arguments_passed(deepspeed, monkeypatch):
    from deepspeed.checkpoint import ds_to_universal

    monkeypatch.setattr(sys, "argv", ["ds_to_universal", "--input_folder", "in", "--output_folder", "out"])
    with mock.patch("builtins.print"):
        parsed = vars(ds_to_universal.parse_arguments())
    passed = {}
    with mock.patch.object(ds_to_universal, "main", side_effect=lambda args: passed.update(vars(args))):
        deepspeed_private.convert_to_universal("in", "out", extract_workers=1, merge_workers=1)
    assert set(passed) == set(parsed), _upgraded(deepspeed)
