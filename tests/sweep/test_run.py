"""`kto-ray sweep` on real Ray Tune and Ray Train with the tiny model, on 2 CPUs: 4 trials, 2 at a time
(each Tune's trial actor at 0.5 CPU plus 1 worker at 0.5 CPU), ASHA on eval/loss.

One sweep is killed once its first two trials have finished, then rerun: the rerun trains neither of
them again, stops the two bad trials (a learning rate too small to move the loss), and ends with the
table; the store is scored once, by the first run. Each trial's metrics equal those of the same config
trained alone by `train()` (1e-5). A last sweep without train.eval_every on the same store ranks
its trial by the eval taken after its last step."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import yaml

from kto_ray.cli import main
from kto_ray.training.launch.driver import train
from tests.conftest import kill_process_tree, read_metrics, wait_for
from tests.helpers import make_config

pytestmark = pytest.mark.extended  # the second tier: tests/test_tiers.py

STEPS = 8  # long enough that ASHA's stop reaches a bad trial before it ends (at 4 one ran through)
GOOD_LR, BAD_LR = 1e-3, 1e-9
TIMING = {"step_time", "samples/s", "tokens/s"}


def _cli(*args: str, **popen) -> subprocess.Popen:
    # Its own local Ray (2 CPUs on this machine), gone with it when it is killed, like a lost job. Ray's
    # memory monitor kills workers when the host (shared with other jobs) is at 95%: off for this Ray.
    return subprocess.Popen(
        [sys.executable, "-m", "kto_ray", *args],
        env=dict(os.environ, RAY_ADDRESS="local", RAY_memory_monitor_refresh_ms="0"),
        start_new_session=True,
        **popen,
    )


def _finished(proc: subprocess.Popen, timeout: float = 900) -> str:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out
    return out


def _same_metrics(trial: list[dict], alone: list[dict]) -> None:
    assert trial and [r["step"] for r in trial] == [r["step"] for r in alone][: len(trial)]
    for got, want in zip(trial, alone):
        for key in set(want) - TIMING:
            if isinstance(want[key], float):
                assert math.isclose(got[key], want[key], rel_tol=1e-5, abs_tol=1e-5), (got["step"], key)
            else:
                assert got[key] == want[key], (got["step"], key)


def test_a_killed_sweep_resumes_stops_bad_trials_and_matches_runs_alone(
    tiny_model, small_data, tmp_path, ray_local, capsys
):
    cfg = make_config(
        tiny_model,
        small_data,
        tmp_path,
        train={"max_steps": STEPS, "eval_every": 1, "schedule": "constant", "warmup_ratio": 0.0,
               "micro_batch_size": 8, "log_every": 1},
        cluster={"workers": 1, "cpus_per_worker": 0.5},
        run={"name": "s", "checkpoint_every": 2, "export": False},
    )  # fmt: skip
    config = tmp_path / "cfg.yaml"
    config.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(
        yaml.safe_dump({"max_concurrent": 2, "trial_cpus": 0.5, "scheduler": "asha", "metric": "eval/loss"})
    )
    # The good trials come first, so they run (2 at a time) before the bad ones. The second key changes
    # only the console (the good trials tie on eval/loss, so ASHA keeps both; the bad ones fall behind).
    args = ["sweep", "--config", str(config), "--sweep", str(sweep),
            "--grid", f"train.lr={GOOD_LR},{BAD_LR}", "--grid", "train.log_every=1,2"]  # fmt: skip
    sweep_dir = tmp_path / "runs" / "s-sweep"
    trial = [sweep_dir / f"trial-{i:03d}" for i in range(4)]

    first = _cli(*args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    together = []  # moments both good trials were running (their workers up, neither ended)

    def good_ones_done() -> bool:
        running = [t for t in trial[:2] if (t / "workers.json").exists() and not (t / "trial.json").exists()]
        together.append(len(running) == 2)
        return all((t / "trial.json").exists() for t in trial[:2])

    wait_for(good_ones_done, lambda: first.poll() is None, timeout=900, interval=0.2)
    kill_process_tree(first.pid)
    assert any(together), "the two trials never ran at the same time"
    manifest = tmp_path / "store" / "manifest.json"
    scored = manifest.stat().st_mtime_ns
    ended = {t: ((t / "trial.json").read_text(), (t / "metrics.jsonl").stat().st_mtime_ns) for t in trial[:2]}

    out = _finished(_cli(*args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    assert "store reused" in out and manifest.stat().st_mtime_ns == scored  # scored once, by the first run
    assert len(list((tmp_path / "store").glob("data-*"))) == 1
    for t, (record, mtime) in ended.items():  # not trained again
        assert (t / "trial.json").read_text() == record and (t / "metrics.jsonl").stat().st_mtime_ns == mtime

    records = {t.name: json.loads((t / "trial.json").read_text()) for t in trial}
    assert [records[t.name]["status"] for t in trial[:2]] == ["finished", "finished"]
    assert [records[t.name]["status"] for t in trial[2:]] == ["stopped", "stopped"], records
    steps = {t.name: [r["step"] for r in read_metrics(t)] for t in trial}
    assert steps["trial-000"] == steps["trial-001"] == list(range(1, STEPS + 1))
    assert all(0 < len(steps[t.name]) < STEPS for t in trial[2:]), steps  # the stopped trials stopped
    # ... cleanly: Ray Train's run aborted (worker group, placement group), so `train` released the lease
    assert not any((t / ".lease.json").exists() for t in trial), [
        t.name for t in trial if (t / ".lease.json").exists()
    ]
    summary = (sweep_dir / "summary.md").read_text()
    for line in summary.splitlines()[6:10]:  # the table: trial, config, status, steps, final, best, ...
        assert line.startswith("| trial-") and ("finished" in line or "stopped" in line)
    assert "trial-000" in out and "best eval/loss" in out  # the console table

    # The same configs trained alone, in this process on the session's Ray (a CLI run would start a Ray
    # of its own for nothing this checks): the same metrics (the stopped ones up to where they stopped).
    for index in (0, 2):
        alone = cfg.model_copy(deep=True)
        alone.train.lr = (GOOD_LR, BAD_LR)[index // 2]
        alone.run.name = f"alone-{index}"
        train(alone)
        _same_metrics(read_metrics(trial[index]), read_metrics(tmp_path / "runs" / f"alone-{index}"))

    # `kto-ray report` draws the trials on shared axes.
    assert main(["report", str(sweep_dir)]) == 0
    printed = capsys.readouterr()
    assert "report of the sweep" in printed.out + printed.err
    assert {p.name for p in (sweep_dir / "report").glob("*.png")} >= {"loss.png", "eval_loss.png"}

    # Without train.eval_every (and no scheduler) the trials are evaluated after their last step, on the
    # same store, and the table ranks them by that eval.
    ranked = tmp_path / "ranked.yaml"
    ranked.write_text(yaml.safe_dump({"name": "ranked", "trial_cpus": 0.5, "metric": "eval/loss"}))
    out = _finished(
        _cli("sweep", "--config", str(config), "--sweep", str(ranked), "--set", "train.eval_every=null",
             "--set", "train.max_steps=2", "--grid", f"train.lr={GOOD_LR}",
             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    )  # fmt: skip
    assert "store reused" in out and manifest.stat().st_mtime_ns == scored
    records = read_metrics(tmp_path / "runs" / "ranked" / "trial-000")
    assert [r["step"] for r in records] == [1, 2] and "eval/loss" not in records[0]
    row = next(line for line in (tmp_path / "runs" / "ranked" / "summary.md").read_text().splitlines()
               if line.startswith("| trial-000"))  # fmt: skip
    final, best = row.split(" | ")[4:6]
    assert float(final) == float(best) == pytest.approx(records[-1]["eval/loss"], abs=1e-4), row
