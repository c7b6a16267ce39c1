"""A worker group the cluster cannot place says so: the capacity of nodes under each placement strategy,
the refusal of a fixed cluster, the waiting notices of an autoscaling one, and a real local Ray."""

from __future__ import annotations

import time

import pytest

from kto_ray.cli import main
from kto_ray.config import load_config
from kto_ray.errors import UserError
from kto_ray.training.launch.placement import Ask, capacity, check_placement, placement_notices
from tests.conftest import own_lines

NODE = {"CPU": 2.0, "memory": 8e9}
GPU_NODE = {"CPU": 16.0, "GPU": 8.0}


def _ask(*overrides: str) -> Ask:
    return Ask.of(load_config(None, list(overrides)))


@pytest.mark.parametrize(
    ("strategy", "held"), [("PACK", 8), ("SPREAD", 8), ("STRICT_PACK", 4), ("STRICT_SPREAD", 2)]
)
def test_capacity_follows_the_strategy(strategy, held):
    assert capacity([NODE, NODE], {"CPU": 0.5}, strategy) == held


def test_a_gpu_bundle_needs_a_gpu_node():
    assert capacity([NODE, GPU_NODE], {"CPU": 1.0, "GPU": 1.0}, "PACK") == 8
    assert capacity([NODE], {"CPU": 1.0, "GPU": 1.0}, "PACK") == 0


def test_a_group_that_fits_says_nothing():
    assert check_placement(_ask("cluster.workers=4"), [NODE], None) is None


def test_a_fixed_cluster_too_small_is_refused_in_one_line():
    with pytest.raises(UserError) as err:
        check_placement(_ask("cluster.workers=8"), [NODE], None)
    line = str(err.value)
    assert len(line.splitlines()) == 1
    assert "8 workers x (0.5 CPU) placed PACK asked, it holds 4 (1 node with 2 CPU in all)" in line
    assert "cannot grow" in line


def test_gpus_on_a_cpu_cluster_are_refused_naming_them():
    with pytest.raises(UserError, match=r"2 workers x \(0\.5 CPU, 1 GPU\).*holds 0 \(1 node with 2 CPU"):
        check_placement(_ask("cluster.use_gpu=true"), [NODE], None)


def test_an_elastic_range_goes_when_its_minimum_fits():
    assert check_placement(_ask("cluster.workers=[2, 16]"), [NODE], None) is None
    with pytest.raises(UserError, match="5-16 workers"):
        check_placement(_ask("cluster.workers=[5, 16]"), [NODE], None)


def test_an_autoscaling_cluster_waits_unless_even_its_maximum_is_too_small():
    line = check_placement(_ask("cluster.workers=16", "cluster.use_gpu=true"), [NODE], {"CPU": 64, "GPU": 16})
    assert line.startswith("waiting for the autoscaler: 16 workers x (0.5 CPU, 1 GPU) placed PACK asked")
    with pytest.raises(UserError, match=r"its autoscaler can bring up at most 0\.5 CPU, 8 GPU"):
        check_placement(_ask("cluster.workers=16", "cluster.use_gpu=true"), [NODE], {"CPU": 0.5, "GPU": 8})


def test_the_wait_is_said_once_then_every_interval_until_the_nodes_come(monkeypatch):
    import kto_ray.training.launch.placement as placement

    monkeypatch.setattr(placement, "autoscaler_limits", lambda: {"CPU": 64.0})
    arrived = time.monotonic() + 0.5
    lines: list[str] = []
    with placement_notices(
        _ask("cluster.workers=8"),
        say=lines.append,
        nodes=lambda: [NODE, NODE] if time.monotonic() > arrived else [NODE],
        every_s=0.1,
        poll_s=0.05,
    ):
        time.sleep(1.0)
    assert lines[0].startswith("waiting for the autoscaler: 8 workers")
    assert any(line.startswith("still waiting for nodes for 8 workers") for line in lines[1:-1])
    assert lines[-1].startswith("the cluster can place the worker group now (waited ")


@pytest.mark.slow
@pytest.mark.usefixtures("ray_local")
def test_a_group_larger_than_the_local_ray_exits_2_within_seconds(tiny_model, small_data, tmp_path, capsys):
    began = time.monotonic()
    code = main(
        [
            "train",
            *("--set", f"model.path={tiny_model}", "--set", f"data.paths=[{small_data}]"),
            *("--set", "reference.mode=online", "--set", f"run.dir={tmp_path}", "--set", "cluster.workers=8"),
        ]
    )
    elapsed = time.monotonic() - began
    lines = own_lines(capsys.readouterr().err)
    assert code == 2 and len(lines) == 1
    (err,) = lines
    assert "8 workers x (0.5 CPU) placed PACK asked, it holds 4 (1 node with 2 CPU in all)" in err
    assert elapsed < 60, elapsed  # seconds, not Ray Train's silent wait (the whole CLI path, on a loaded box)


def test_a_range_asks_ray_train_for_an_elastic_group_counted_by_the_workers_resources():
    """The ScalingConfig the driver builds: a range is Ray Train's elastic (min, max) with the resize
    interval; a custom per-worker resource is part of each worker's ask, here and in the placement check."""
    from kto_ray.training.launch.driver import _scaling

    elastic = load_config(
        None, ["cluster.workers=[1, 2]", "cluster.worker_resources={slot: 1}", "cluster.resize_interval_s=5"]
    )
    scaling = _scaling(elastic)
    assert scaling.num_workers == (1, 2) and scaling.elasticity_enabled
    assert scaling.elastic_resize_monitor_interval_s == 5
    assert scaling.resources_per_worker == {"CPU": 0.5, "slot": 1.0}
    fixed = _scaling(load_config(None, ["cluster.workers=2"]))
    assert fixed.num_workers == 2 and not fixed.elasticity_enabled
    ask = Ask.of(elastic)
    assert capacity([NODE | {"slot": 1.0}, NODE], ask.bundle, ask.strategy) == 1  # one slot, one worker
    two = load_config(None, ["cluster.workers=[2, 4]", "cluster.worker_resources={slot: 1}"])
    with pytest.raises(UserError, match=r"2-4 workers x \(0.5 CPU, 1 slot\)"):
        check_placement(Ask.of(two), [NODE | {"slot": 1.0}, NODE], None)
