"""`kto-ray sweep`: many training runs on one reference store, through Ray Tune.

The store is scored once, before any trial. Each trial is one whole `kto-ray train` run (run dir
`<run.dir>/<sweep name>/<trial>`) started from a Tune class trainable; Ray Train V2 runs it outside
Tune's placement group, so Tune reserves only `sweep.trial_cpus` per trial and the sweep caps how
many trials run at once by what one trial's workers need. The trainable follows rank 0's metrics and
hands each step's eval metrics to Tune, whose scheduler may stop the trial; the stopped trial then
aborts its Ray Train run (`sweep/stop.py`).

Resuming is bookkeeping in the run dirs, not Tune's experiment restore (which does not keep the
scheduler's state): a trial that ended writes `trial.json`; on a rerun such trials replay their eval
records (so the scheduler sees them again) without training, and unfinished ones resume from their
last checkpoint, as a rerun of `kto-ray train` does.
"""

from __future__ import annotations

import json
import math
import os
import threading
import time
from dataclasses import dataclass
from typing import Any

from kto_ray.config import KTOConfig, config_from_dict
from kto_ray.errors import TrainingStopped, UserError
from kto_ray.raycluster import ray_session
from kto_ray.rundir import RunDir
from kto_ray.rundir.lease import Lease
from kto_ray.sweep.config import SweepConfig, check_scheduler, sweep_name, trial_configs
from kto_ray.sweep.report import SWEEP_FILE, TRIAL_FILE, read_json, summary_markdown, sweep_rows, table_text
from kto_ray.sweep.stop import abort_run, controller_mailbox

SUMMARY_FILE = "summary.md"
TUNE_DIR = "tune"  # Tune's own experiment folder in the sweep dir
POLL_S = 0.5
STOP_WAIT_S = 60.0  # a stopped trial waits this long for its aborted run to release the run dir


@dataclass(frozen=True)
class TrialNeed:
    cpus: float
    gpus: float


def trial_need(cfg: KTOConfig, sweep: SweepConfig) -> TrialNeed:
    """What one trial holds while it runs: Tune's actor, plus its Ray Train workers."""
    workers = cfg.cluster.workers
    return TrialNeed(
        sweep.trial_cpus + workers * cfg.cluster.cpus_per_worker, workers if cfg.cluster.use_gpu else 0
    )


def concurrency(needs: list[TrialNeed], sweep: SweepConfig, cluster: dict[str, float]) -> int:
    """How many trials run at once: what the cluster fits of the largest trial, at most
    `sweep.max_concurrent`; a trial the cluster cannot hold at all exits 2 before launch."""
    cpus, gpus = float(cluster.get("CPU", 0)), float(cluster.get("GPU", 0))
    most = TrialNeed(max(n.cpus for n in needs), max(n.gpus for n in needs))
    if most.gpus > gpus:
        raise UserError(
            f"each trial needs {most.gpus:g} GPUs (cluster.workers, one GPU per worker) and the cluster has "
            f"{gpus:g}: lower cluster.workers or add GPUs"
        )
    if most.cpus > cpus + 1e-9:
        raise UserError(
            f"each trial needs {most.cpus:g} CPUs (sweep.trial_cpus + cluster.workers x "
            f"cluster.cpus_per_worker) and the cluster has {cpus:g}"
        )
    fits = math.floor(cpus / most.cpus + 1e-9)
    if most.gpus:
        fits = min(fits, math.floor(gpus / most.gpus + 1e-9))
    return min(fits, sweep.max_concurrent or fits)


def _numbers(record: dict[str, Any]) -> dict[str, float]:
    return {k: v for k, v in record.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def trial_trainable():
    """Tune's class trainable for one trial (a class, so that Tune's stop runs `cleanup` in the trial's
    actor before it exits: there the Ray Train run is aborted, see `sweep/stop.py`)."""
    from ray import tune

    from kto_ray.rundir.metrics import MetricsFollower, read_metrics
    from kto_ray.training.launch.driver import train

    class Trial(tune.Trainable):
        """Trains (or resumes) in a thread; each `step` returns the next eval record rank 0 logged, the
        last with done. A trial that already ended replays its records without training."""

        def setup(
            self,
            config: dict[str, Any],
            trials: dict[str, dict[str, Any]],
            last_steps: dict[str, int],
            metric: str,
        ) -> None:
            self.name, self.metric = config["trial"], metric
            self.cfg = config_from_dict(trials[self.name], f"sweep trial {self.name}")
            self.run_dir = RunDir.of(self.cfg)
            # The last step's result is handed over once the run has ended (final checkpoint, export),
            # so a scheduler deciding on it cannot cut the run short.
            self.last_step = last_steps.get(self.name) or 1 << 62
            self.pending: list[dict[str, Any]] = []  # logged records not yet handed to Tune
            self.reported, self.last, self.thread = 0, None, None
            self.ended = read_json(self.run_dir, TRIAL_FILE) is not None
            if self.ended:
                self.pending = read_metrics(self.run_dir)
                return
            self.began, self.outcome = time.monotonic(), {}
            self.mailbox = controller_mailbox()
            self.follower = MetricsFollower(self.run_dir)
            self.thread = threading.Thread(target=self._train, name=f"kto-ray {self.name}", daemon=True)
            self.thread.start()

        def _train(self) -> None:
            try:
                self.outcome["result"] = train(self.cfg)
            except BaseException as err:  # raised by `step`
                self.outcome["error"] = err

        def _running(self) -> bool:
            return self.thread is not None and self.thread.is_alive()

        def _finish(self) -> None:
            """The run has ended: raise its error, or record that it finished (before the last results
            reach the scheduler, so that a stop decided on them does not mark it stopped)."""
            if "error" in self.outcome:
                raise self.outcome["error"]
            self.pending += self.follower.poll()
            seconds = round(time.monotonic() - self.began, 3)
            ended = {"status": "finished", "steps": self.outcome["result"].steps, "seconds": seconds}
            self.run_dir.write_text(TRIAL_FILE, json.dumps(ended))
            self.ended = True

        def step(self) -> dict[str, Any]:
            while True:
                if not self.ended and not self._running():
                    self._finish()
                while self.pending and (self.ended or int(self.pending[0]["step"]) < self.last_step):
                    record = self.last = self.pending.pop(0)
                    if int(record["step"]) > self.reported and self.metric in record:
                        self.reported = int(record["step"])
                        return _numbers(record)
                if self.ended:
                    return {**_numbers(self.last or {"step": 0}), "done": True}
                self.thread.join(POLL_S)
                self.pending += self.follower.poll()

        def save_checkpoint(self, checkpoint_dir: str) -> None:
            return None  # a trial's state is its run dir (Ray Train's checkpoints, trial.json)

        def load_checkpoint(self, checkpoint) -> None:
            return None

        def cleanup(self) -> None:
            if self._running():  # stopped by the scheduler: abort the run, let `train` release the lease
                abort_run(self.mailbox)
                self.thread.join(STOP_WAIT_S)

    return Trial


def _stopped_callback(shipped: dict[str, dict[str, Any]]):
    """A Tune callback on the driver: a trial that completed without its own `trial.json` was stopped by
    the scheduler; record that in its run dir, so a rerun of the sweep does not train it again."""
    from ray import tune

    class MarkStopped(tune.Callback):
        def on_trial_complete(self, iteration, trials, trial, **info):
            name = trial.config["trial"]
            run_dir = RunDir.of(config_from_dict(shipped[name]))
            if read_json(run_dir, TRIAL_FILE) is None:
                result = trial.last_result or {}
                seconds = round(float(result.get("time_total_s", 0.0)), 3)
                ended = {"status": "stopped", "steps": int(result.get("step", 0)), "seconds": seconds}
                run_dir.write_text(TRIAL_FILE, json.dumps(ended))

    return MarkStopped()


def _scheduler(sweep: SweepConfig, max_steps: int):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, MedianStoppingRule

    common = dict(time_attr="step", metric=sweep.metric, mode=sweep.mode, grace_period=sweep.grace_steps)
    if sweep.scheduler == "asha":
        return ASHAScheduler(
            **common,
            max_t=max(max_steps, sweep.grace_steps),
            reduction_factor=sweep.reduction_factor,
            stop_last_trials=False,  # a trial at its last step finishes (export) rather than being stopped
        )
    if sweep.scheduler == "median":
        return MedianStoppingRule(**common, min_samples_required=sweep.min_samples)
    return FIFOScheduler()


def _check_same_sweep(sweep_dir: RunDir, plan: dict[str, Any]) -> None:
    """A rerun resumes the sweep it names: refuse one whose trials differ (another grid or seed)."""
    before = read_json(sweep_dir, SWEEP_FILE)
    if before is not None and before.get("trials") != plan["trials"]:
        raise UserError(
            f"{sweep_dir.child(SWEEP_FILE)} was written for other trials (another grid, sample or seed): "
            "name this sweep differently (sweep.name) to start a new one"
        )


def run_sweep(cfg: KTOConfig, sweep: SweepConfig) -> None:
    """Validate every trial, score the store once, run the trials on Ray Tune, write the table."""
    from kto_ray.config import with_absolute_paths

    cfg = with_absolute_paths(cfg)
    trials = trial_configs(cfg, sweep)
    check_scheduler(sweep, trials)
    sweep_dir = RunDir(f"{cfg.run.dir.rstrip('/')}/{sweep_name(cfg, sweep)}")
    plan = {
        "trials": {name: values for name, (values, _) in trials.items()},
        "metric": sweep.metric,
        "mode": sweep.mode,
    }
    _check_same_sweep(sweep_dir, plan)
    with Lease(sweep_dir.location, "sweep"):
        sweep_dir.write_text(SWEEP_FILE, json.dumps(plan, indent=1))
        with ray_session(cfg.cluster.address):
            import ray

            limit = concurrency(
                [trial_need(t, sweep) for _, t in trials.values()], sweep, ray.cluster_resources()
            )
            last_steps: dict[str, int] = {}
            if cfg.reference.mode == "offline":
                from kto_ray.reference.precompute import precompute
                from kto_ray.training.launch.driver import total_steps

                store = precompute(cfg)
                print(f"store {'reused' if store.reused else 'scored'}: {cfg.store.path}", flush=True)
                rows = store.store.count("train")
                if not store.store.count("eval"):
                    raise UserError(
                        "a sweep ranks its trials on the store's eval split, which is empty: raise "
                        "data.eval_fraction"
                    )
                last_steps = {name: total_steps(t, rows) for name, (_, t) in trials.items()}
            print(
                f"sweep {sweep_name(cfg, sweep)}: {len(trials)} trials, up to {limit} at a time "
                f"-> {sweep_dir}",
                flush=True,
            )
            errors = _tune(sweep, trials, last_steps, sweep_dir, limit)
        rows = sweep_rows(sweep_dir, plan, errors)
        table = table_text(rows, sweep.metric)
        sweep_dir.write_text(SUMMARY_FILE, summary_markdown(sweep_dir, rows, sweep.metric))
    print(table, flush=True)
    failed = [row.trial for row in rows if row.status == "failed"]
    if failed:
        raise TrainingStopped(
            f"{len(failed)} trial(s) failed ({', '.join(failed)}); see {sweep_dir.child(SUMMARY_FILE)}"
        )


def _tune(
    sweep: SweepConfig,
    trials: dict[str, tuple[dict, KTOConfig]],
    last_steps: dict[str, int],
    sweep_dir: RunDir,
    limit: int,
) -> dict[str, str]:
    """Run the trials on a fresh Tuner; returns the failed trials' first error lines."""
    from ray import tune

    from kto_ray.console import is_verbose

    if not is_verbose():  # Tune's own tables (its new output engine prints some even when silent)
        os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
    shipped = {name: t.model_dump(mode="json") for name, (_, t) in trials.items()}
    max_steps = max(last_steps.values()) if len(last_steps) == len(trials) else 10**6
    trainable = tune.with_parameters(
        trial_trainable(), trials=shipped, last_steps=last_steps, metric=sweep.metric
    )
    trainable = tune.with_resources(trainable, {"CPU": sweep.trial_cpus})
    tuner = tune.Tuner(
        trainable,
        param_space={"trial": tune.grid_search(list(trials))},
        tune_config=tune.TuneConfig(
            scheduler=_scheduler(sweep, max_steps),
            max_concurrent_trials=limit,
            trial_name_creator=lambda trial: trial.config["trial"],
            trial_dirname_creator=lambda trial: trial.config["trial"],
        ),
        run_config=tune.RunConfig(
            name=TUNE_DIR,
            **sweep_dir.ray_storage(),
            verbose=0,
            callbacks=[_stopped_callback(shipped)],
            failure_config=tune.FailureConfig(max_failures=0),
            # Tune would save a class trainable at its end: a trial's state is its run dir instead.
            checkpoint_config=tune.CheckpointConfig(checkpoint_at_end=False),
        ),
    )
    return {
        result.config["trial"]: str(result.error).strip().splitlines()[-1][:300]
        for result in tuner.fit()
        if result.error is not None
    }
