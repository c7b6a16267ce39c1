"""The driver's auto memory settings (`deepspeed.stage`, `cluster.release_host_memory`): the planner's pick
for the worker memory, from one plan, and the start line."""

from __future__ import annotations

import pytest
import yaml

from kto_ray.config import load_config
from kto_ray.planning.cluster_memory import worker_memory_bytes
from kto_ray.planning.plan import GIB
from kto_ray.training.resume.stage import auto_plan, resolve_release, resolve_stage, stage_of_checkpoint


def _auto(tiny_model, *overrides: str):
    return load_config(None, [f"model.path={tiny_model}", "deepspeed.stage=auto", *overrides])


def test_a_fixed_stage_passes_through(tiny_model):
    cfg = load_config(None, [f"model.path={tiny_model}", "deepspeed.stage=3"])
    assert resolve_stage(cfg) == (cfg, "ZeRO-3")


def test_auto_picks_zero2_where_the_whole_model_fits(tiny_model):
    cfg, line = resolve_stage(_auto(tiny_model, "deepspeed.worker_memory_gib=64"))
    assert cfg.deepspeed.stage == 2 and cfg.deepspeed.offload_optimizer == "none"
    assert line.startswith("ZeRO-2 (stage auto: the 16-bit model and its sharded states need ")
    assert line.endswith(" of 64.0 GiB per worker)")


def test_a_resume_keeps_the_stage_its_checkpoint_was_written_in(tiny_model, capsys):
    # The planner would pick ZeRO-2 with 64 GiB; the checkpoint's shards are ZeRO-3 with the optimizer
    # offloaded, and only that layout loads them.
    cfg = _auto(tiny_model, "deepspeed.worker_memory_gib=64")
    written = {"stage": 3, "offload_optimizer": "cpu", "offload_params": "none"}
    kept = stage_of_checkpoint(cfg, "step_00000004", {"config": {"deepspeed": written}})
    assert (kept.deepspeed.stage, kept.deepspeed.offload_optimizer, kept.deepspeed.offload_params) == (
        3,
        "cpu",
        "none",
    )
    assert resolve_stage(kept)[1] == "ZeRO-3"
    assert "auto keeps ZeRO-3, the stage step_00000004 was written in" in capsys.readouterr().out
    assert stage_of_checkpoint(cfg, "old", {"config": {"deepspeed": {"stage": "auto"}}}) is cfg


def test_auto_offloads_last(tiny_model):
    # A budget below everything: ZeRO-3 with the optimizer and the parameters on the CPU, saying why.
    cfg, line = resolve_stage(_auto(tiny_model, "deepspeed.worker_memory_gib=0.001"))
    ds = cfg.deepspeed
    assert (ds.stage, ds.offload_optimizer, ds.offload_params) == (3, "cpu", "cpu")
    assert line.startswith("ZeRO-3 with optimizer+params->CPU (stage auto: ZeRO-2 needs ")
    assert "nothing fits 0.0 GiB per worker" in line


@pytest.mark.parametrize("memory_gib", [64, 0.001])
def test_one_plan_decides_both_auto_settings_as_a_plan_each_would(tiny_model, memory_gib):
    # 64 GiB: ZeRO-2, far from the memory, kept; 0.001 GiB: ZeRO-3 offloaded, above 80%, released.
    cfg = _auto(tiny_model, f"deepspeed.worker_memory_gib={memory_gib}")
    planned = auto_plan(cfg)
    staged, _words = resolve_stage(cfg, planned)
    released, words = resolve_release(staged, planned)
    assert resolve_release(staged) == (released, words)  # the picked stage planned again: the same
    assert released.cluster.release_host_memory is (memory_gib < 1)
    assert words.startswith(", host memory released (auto: ") if memory_gib < 1 else words == ""


def test_nothing_auto_to_decide_makes_no_plan(tiny_model):
    # A set stage, and GPU workers (release auto is off on GPUs without a plan).
    cfg = load_config(None, [f"model.path={tiny_model}", "deepspeed.stage=3", "cluster.use_gpu=true"])
    assert cfg.cluster.release_host_memory == "auto" and auto_plan(cfg) is None


@pytest.mark.slow
@pytest.mark.usefixtures("ray_local")
def test_auto_on_a_cluster_reads_its_memory_and_says_what_it_picked(built_store, tmp_path, capsys):
    import ray

    from kto_ray.training.launch.driver import train

    base, _store = built_store
    ram = sum(n["Resources"]["memory"] + n["Resources"]["object_store_memory"] for n in ray.nodes())
    cfg = base.model_validate(
        base.model_dump(mode="json")
        | {
            "deepspeed": base.deepspeed.model_dump() | {"stage": "auto"},
            "train": base.train.model_dump() | {"max_steps": 1, "micro_batch_size": 4},
            "run": base.run.model_dump() | {"name": "auto", "dir": str(tmp_path), "export": False},
        }
    )
    assert worker_memory_bytes(cfg) == pytest.approx(ram / cfg.cluster.workers) and ram > GIB
    # What this cluster's memory makes auto pick (ZeRO-2 for the tiny model where RAM allows).
    picked, words = resolve_stage(cfg)
    # ... and cluster.release_host_memory auto, from the plan of that stage (the tiny model: kept).
    released, release_words = resolve_release(picked)
    assert release_words == "" and released.cluster.release_host_memory is False  # not said when kept
    result = train(cfg)
    start = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("training "))
    assert f"(2 workers, 8 rows per step, {words}{release_words}, reference offline)" in start
    assert words.startswith(f"ZeRO-{picked.deepspeed.stage}") and "(stage auto: " in words
    # The run dir records the stage that ran, and whether the workers released host memory.
    recorded = yaml.safe_load((result.run_dir.local_path / "config.yaml").read_text())
    assert recorded["deepspeed"]["stage"] == picked.deepspeed.stage
    assert released.cluster.release_host_memory is False
    assert recorded["cluster"]["release_host_memory"] is False
