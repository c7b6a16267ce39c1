"""The sweep's typed config and its trials, with no Ray: expansion, validation up front, bad inputs through
the CLI (exit 2 naming the key, before anything starts), the resource check, the shipped sweep YAML."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from kto_ray.cli import main
from kto_ray.config import load_config
from kto_ray.errors import UserError
from kto_ray.sweep.config import (
    SweepConfig,
    check_scheduler,
    load_sweep,
    trial_configs,
    trial_overrides,
)
from kto_ray.sweep.run import TrialNeed, concurrency, trial_need
from tests.conftest import own_lines

REPO = Path(__file__).resolve().parents[2]


def test_grid_is_the_product_first_key_slowest_and_draws_are_seeded():
    sweep = load_sweep(None, ["train.beta=0.05,0.1", "train.lr=1e-5,1e-4"])
    assert trial_overrides(sweep) == [
        {"train.beta": 0.05, "train.lr": 1e-5},
        {"train.beta": 0.05, "train.lr": 1e-4},
        {"train.beta": 0.1, "train.lr": 1e-5},
        {"train.beta": 0.1, "train.lr": 1e-4},
    ]
    sampled = load_sweep(None, ["train.beta=0.1,0.2"], ["train.lr=loguniform:1e-6:1e-3"])
    sampled = sampled.model_copy(update={"samples": 3})
    trials = trial_overrides(sampled)
    assert [t["train.beta"] for t in trials] == [0.1] * 3 + [0.2] * 3
    assert all(1e-6 <= t["train.lr"] < 1e-3 for t in trials)
    assert len({t["train.lr"] for t in trials}) == 6
    assert trial_overrides(sampled) == trials  # the same seed, the same trials (what resuming needs)
    other = trial_overrides(sampled.model_copy(update={"seed": 1}))
    assert [t["train.lr"] for t in other] != [t["train.lr"] for t in trials]
    ints = trial_overrides(
        load_sweep(None, (), ["train.micro_batch_size=int:1:3"]).model_copy(update={"samples": 20})
    )
    assert {t["train.micro_batch_size"] for t in ints} == {1, 2, 3}


def test_the_command_line_replaces_the_files_entry(tmp_path):
    path = tmp_path / "sweep.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "grid": {"train.beta": [0.1, 0.2]},
                "sample": {"train.lr": {"dist": "uniform", "low": 1e-5, "high": 1e-4}},
            }
        )
    )
    sweep = load_sweep(path, ["train.lr=1e-5,2e-5"])
    assert sweep.grid == {"train.beta": [0.1, 0.2], "train.lr": [1e-5, 2e-5]} and sweep.sample == {}


@pytest.mark.parametrize(
    ("tree", "named"),
    [
        ({"grids": {}}, "unknown key 'grids'"),
        ({"sample": {"train.lr": {"dist": "normal", "low": 0, "high": 1}}}, "sample.train.lr.dist"),
        ({"sample": {"train.lr": {"dist": "loguniform", "low": 0, "high": 1}}}, "loguniform needs low > 0"),
        ({"sample": {"train.lr": {"dist": "uniform", "low": 2, "high": 1}}}, "must be below high"),
        ({"metric": "eval/accuracy"}, "metric 'eval/accuracy' is not one of"),
        ({"scheduler": "hyperband"}, "scheduler"),
        ({"grid": {"train.beta": []}}, "grid train.beta: no values"),
    ],
)
def test_a_bad_sweep_file_is_refused_naming_the_key(tmp_path, tree, named):
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(tree))
    with pytest.raises(UserError, match=named.replace(".", r"\.").replace("(", r"\(")):
        load_sweep(path)


def _base(tmp_path, **train):
    cfg = load_config(REPO / "configs" / "demo.yaml")
    cfg.run.dir = str(tmp_path / "runs")
    cfg.train = cfg.train.model_copy(update=train)
    return cfg


def test_every_trial_is_a_whole_validated_config_in_its_own_run_dir(tmp_path):
    cfg = _base(tmp_path)
    trials = trial_configs(cfg, load_sweep(None, ["train.beta=0.05,0.2", "cluster.workers=1,2"]))
    assert list(trials) == ["trial-000", "trial-001", "trial-002", "trial-003"]
    values, third = trials["trial-002"]
    assert values == {"train.beta": 0.2, "cluster.workers": 1}
    assert third.train.beta == 0.2 and third.cluster.workers == 1 and third.train.lr == cfg.train.lr
    assert third.run.dir == f"{cfg.run.dir}/demo-sweep" and third.run.name == "trial-002"
    named = trial_configs(cfg, SweepConfig(name="lr", grid={"train.lr": [1e-5]}))
    assert named["trial-000"][1].run.dir.endswith("/lr")
    # Every trial evaluates after its last step, so the table ranks it without train.eval_every.
    assert cfg.train.eval_every is None and not cfg.train.eval_at_end
    assert all(trial.train.eval_at_end and trial.train.evaluates for _, trial in trials.values())


@pytest.mark.parametrize(
    ("grid", "named"),
    [
        ("train.betta=0.1,0.2", "unknown key 'train.betta'"),
        ("trian.beta=0.1", "unknown key 'trian'"),
        ("train.beta=0.1,abc", "train.beta: Input should be a valid number"),
        ("train.beta=0.1,-1", "train.beta: Input should be greater than 0"),
        ("data.seed=1,2", "sweep key data.seed: a sweep trains every trial on one store"),
        ("model.path=a,b", "sweep key model.path"),
        ("model.revision=a,b", "sweep key model.revision: a sweep trains every trial on one store"),
        ("run.name=a,b", "sweep key run.name: the sweep names"),
        ("train.eval_at_end=false", "sweep key train.eval_at_end: the sweep evaluates every trial"),
    ],
)
def test_a_bad_grid_key_or_value_exits_2_naming_it_before_anything_starts(tmp_path, capsys, grid, named):
    config = tmp_path / "cfg.yaml"
    cfg = _base(tmp_path)
    config.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    assert main(["sweep", "--config", str(config), "--grid", grid]) == 2
    err = capsys.readouterr().err.strip()
    assert len(own_lines(err)) == 1 and named in err, err
    assert not (tmp_path / "runs").exists()  # nothing written, nothing launched


def test_a_bad_sample_on_the_command_line_exits_2(tmp_path, capsys):
    config = tmp_path / "cfg.yaml"
    config.write_text(yaml.safe_dump(_base(tmp_path).model_dump(mode="json")))
    assert main(["sweep", "--config", str(config), "--sample", "train.lr=loguniform:1e-5"]) == 2
    assert "expected DIST:LOW:HIGH" in capsys.readouterr().err


def test_a_scheduler_needs_eval_during_training(tmp_path):
    sweep = load_sweep(None, ["train.beta=0.1,0.2"]).model_copy(update={"scheduler": "asha"})
    with pytest.raises(UserError, match=r"needs train.eval_every \(unset in trial-000"):
        check_scheduler(sweep, trial_configs(_base(tmp_path), sweep))
    check_scheduler(sweep, trial_configs(_base(tmp_path, eval_every=2), sweep))


def test_the_resource_check_and_how_many_trials_run_at_once(tmp_path):
    sweep = SweepConfig(trial_cpus=0.5)
    cfg = _base(tmp_path)
    cfg.cluster = cfg.cluster.model_copy(update={"workers": 1, "cpus_per_worker": 0.5})
    need = trial_need(cfg, sweep)
    assert need == TrialNeed(cpus=1.0, gpus=0)
    assert concurrency([need] * 4, sweep, {"CPU": 2.0}) == 2  # the CPU test: 2 trials at once on 2 CPUs
    assert concurrency([need] * 4, sweep.model_copy(update={"max_concurrent": 1}), {"CPU": 2.0}) == 1
    gpu = cfg.model_copy(deep=True)
    gpu.cluster = gpu.cluster.model_copy(update={"workers": 4, "use_gpu": True})
    with pytest.raises(UserError, match=r"each trial needs 4 GPUs .* the cluster has 2"):
        concurrency([trial_need(gpu, sweep)], sweep, {"CPU": 64.0, "GPU": 2.0})
    assert concurrency([trial_need(gpu, sweep)], sweep, {"CPU": 64.0, "GPU": 16.0}) == 4
    with pytest.raises(UserError, match=r"each trial needs 1 CPUs .* the cluster has 0\.5"):
        concurrency([need], sweep, {"CPU": 0.5})


def test_the_shipped_sweep_yaml_is_valid():
    sweep = load_sweep(REPO / "configs" / "sweeps" / "demo.yaml")
    cfg = load_config(REPO / "configs" / "demo.yaml")
    cfg.train.eval_every = 20
    trials = trial_configs(cfg, sweep)
    check_scheduler(sweep, trials)
    assert len(trials) >= 4
