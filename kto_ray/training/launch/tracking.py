"""Live experiment tracking (`run.report_to`): rank 0 logs every step to TensorBoard, MLflow and W&B.

One small class per tracker behind one interface: `start(config)` (the resolved config as the run's
parameters), `log(step, metrics)` (the metrics.jsonl record, TRL's names), `finish(failed)` (MLflow's
FAILED, W&B's exit code 1). The driver's `prepare_tracking` fails before launch, not on a worker after
the model has loaded, and resolves the environment the workers need: on a cluster joined through
RAY_ADDRESS they neither inherit the driver's environment nor share its working directory.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import math
import os
import tempfile
import time
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, Protocol
from unittest import mock
from urllib.parse import urlparse

from kto_ray.console import is_verbose
from kto_ray.errors import UserError

PACKAGES = {"tensorboard": "tensorboard", "mlflow": "mlflow", "wandb": "wandb"}
DEFAULT_PROJECT = "kto-ray"  # MLflow experiment and W&B project when the environment names none
_HOST_LOCAL = {"WANDB_SERVICE"}
_PARAM_CHARS = 500  # MLflow's limit on a parameter value in its oldest supported versions


class Tracker(Protocol):
    def start(self, config: Mapping[str, Any]) -> None: ...
    def log(self, step: int, metrics: Mapping[str, Any]) -> None: ...
    def finish(self, failed: bool = False) -> None: ...


def scalars(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The numbers of a metrics record, without its step (the trackers take the step separately)."""
    return {
        key: float(value)
        for key, value in metrics.items()
        if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool)
    }


def flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, str | int | float | bool]:
    """Nested config -> {"train.beta": 0.1, ...}; lists and None become strings (hparams' value types)."""
    out: dict[str, str | int | float | bool] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out |= flatten(value, f"{name}.")
        elif isinstance(value, (str, int, float, bool)):
            out[name] = value
        else:
            out[name] = json.dumps(value)
    return out


def _quiet_libraries() -> None:
    # MLflow's sqlite store and alembic log every table migration at INFO on first use.
    if not is_verbose():
        for name in ("mlflow", "alembic"):
            logging.getLogger(name).setLevel(logging.WARNING)


class TensorBoardTracker:
    """Event files in `log_dir` (<run dir>/tensorboard); `tensorboard --logdir` shows them live."""

    def __init__(self, log_dir: Path, resume_step: int = 0):
        self.log_dir, self.resume_step = Path(log_dir), resume_step
        self.writer: Any = None

    def start(self, config: Mapping[str, Any]) -> None:
        from torch.utils.tensorboard import SummaryWriter
        from torch.utils.tensorboard.summary import hparams

        # purge_step: TensorBoard hides what an earlier attempt logged past the step this one resumes from.
        self.writer = SummaryWriter(str(self.log_dir), purge_step=self.resume_step + 1)
        params = flatten(config)
        # The HParams tab: written into this run's own event file (add_hparams would make a subfolder).
        for summary in hparams(params, {}):
            self.writer.file_writer.add_summary(summary)
        self.writer.add_text("config", "\n".join(f"    {k}: {v}" for k, v in params.items()))

    def log(self, step: int, metrics: Mapping[str, Any]) -> None:
        for key, value in scalars(metrics).items():
            self.writer.add_scalar(key, value, global_step=step)
        self.writer.flush()  # live: a step is visible as soon as it is logged

    def finish(self, failed: bool = False) -> None:
        if self.writer is not None:  # event files have no run status: a failed run's end is its last step
            self.writer.close()


class MlflowTracker:
    """One MLflow run (named `run.name`) in the experiment MLFLOW_EXPERIMENT_NAME (default kto-ray)."""

    def __init__(self, tracking_uri: str, run_name: str, experiment: str | None = None):
        self.tracking_uri, self.run_name = tracking_uri, run_name
        self.experiment = experiment or os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_PROJECT
        self.client: Any = None
        self.run_id: str | None = None

    def start(self, config: Mapping[str, Any]) -> None:
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        _quiet_libraries()
        self.client = MlflowClient(tracking_uri=self.tracking_uri)
        found = self.client.get_experiment_by_name(self.experiment)
        experiment_id = found.experiment_id if found else self.client.create_experiment(self.experiment)
        self.run_id = self.client.create_run(experiment_id, run_name=self.run_name).info.run_id
        params = [Param(k, str(v)[:_PARAM_CHARS]) for k, v in flatten(config).items()]
        for i in range(0, len(params), 100):  # log_batch takes at most 100 params per call
            self.client.log_batch(self.run_id, params=params[i : i + 100])

    def log(self, step: int, metrics: Mapping[str, Any]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, v, now, step) for k, v in scalars(metrics).items()]
        self.client.log_batch(self.run_id, metrics=batch)

    def finish(self, failed: bool = False) -> None:
        if self.run_id is not None:
            self.client.set_terminated(self.run_id, status="FAILED" if failed else "FINISHED")


class WandbTracker:
    """One W&B run in WANDB_PROJECT (default kto-ray); WANDB_MODE=offline keeps it on disk in `dir`."""

    def __init__(self, run_name: str, directory: Path, project: str | None = None):
        self.run_name, self.directory = run_name, Path(directory)
        self.project = project or os.environ.get("WANDB_PROJECT") or DEFAULT_PROJECT
        self.run: Any = None

    def start(self, config: Mapping[str, Any]) -> None:
        import wandb

        self.directory.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(
            project=self.project, name=self.run_name, config=dict(config), dir=str(self.directory)
        )

    def log(self, step: int, metrics: Mapping[str, Any]) -> None:
        # W&B drops a step lower than one it has seen (a step redone after a resume): it warns, no error.
        self.run.log({k: v for k, v in scalars(metrics).items() if math.isfinite(v)}, step=step)

    def finish(self, failed: bool = False) -> None:
        if self.run is not None:
            import wandb

            self.run.finish(exit_code=1 if failed else 0)
            # finish() returns before wandb-core has written the run's last records; teardown waits for
            # the service to exit, so the .wandb file is complete before the worker process goes away.
            wandb.teardown()


def build_trackers(
    names: Iterable[str], run_dir: Path | None, run_name: str, resume_step: int = 0
) -> list[Tracker]:
    """The trackers of `run.report_to`, not started, from the environment `prepare_tracking` made.
    `run_dir` is the run's local folder (None when it is on object storage)."""
    trackers: list[Tracker] = []
    for name in names:
        if name == "tensorboard":
            if run_dir is None:  # config validation refuses this; a clear error if called directly
                raise ValueError("tensorboard needs a local run dir")
            trackers.append(TensorBoardTracker(Path(run_dir) / "tensorboard", resume_step))
        elif name == "mlflow":
            trackers.append(MlflowTracker(os.environ["MLFLOW_TRACKING_URI"], run_name))
        elif name == "wandb":
            trackers.append(WandbTracker(run_name, Path(os.environ.get("WANDB_DIR") or _wandb_dir(run_dir))))
        else:
            raise ValueError(f"unknown tracker {name!r}")
    return trackers


@contextlib.contextmanager
def started_trackers(
    names: Iterable[str],
    config: Mapping[str, Any],
    run_dir: Path | None,
    resume_step: int,
    env: Mapping[str, str],
) -> Iterator[list[Tracker]]:
    """On rank 0, for the block: set the environment `prepare_tracking` resolved (the process is the
    worker's own), then build and start the trackers with the resolved config as the run's parameters.
    Every tracker is finished when the block ends, as failed when it raises (a tracker that fails to
    start too, and the ones started before it)."""
    os.environ.update(env)
    with contextlib.ExitStack() as started:
        trackers = build_trackers(names, run_dir, str(config["run"]["name"]), resume_step)
        for tracker in trackers:
            # Pushed first: what a failing start opened is closed too.
            started.push(lambda exc_type, *_, tracker=tracker: tracker.finish(failed=exc_type is not None))
            tracker.start(config)
        yield trackers


def _wandb_dir(run_dir: Path | None) -> Path:
    # W&B writes local files; next to a local run, else in this machine's temp folder.
    return run_dir if run_dir is not None else Path(tempfile.gettempdir()) / "kto-ray-wandb"


def _absolute_mlflow_uri(uri: str | None, run_dir: Path | None) -> str:
    """A tracking URI valid on any worker: local paths made absolute (workers run in another directory)."""
    if not uri and run_dir is None:
        raise UserError(
            "run.report_to: mlflow needs MLFLOW_TRACKING_URI when run.dir is a URI "
            "(its default, a sqlite file next to the run dirs, needs a local folder)"
        )
    if not uri:
        # MLflow's own default is sqlite:///mlflow.db in the working directory; next to the runs instead.
        return f"sqlite:///{Path(run_dir).parent.resolve() / 'mlflow.db'}"
    parsed = urlparse(uri)
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return f"sqlite:///{Path(uri[len('sqlite:///') :]).resolve()}"
    if parsed.scheme in ("", "file"):
        path = parsed.path if parsed.scheme == "file" else uri
        return Path(path).resolve().as_uri()
    return uri


def _check_mlflow(uri: str) -> None:
    from mlflow.tracking import MlflowClient

    _quiet_libraries()
    # One short request, no retries: a wrong host fails in seconds, not after MLflow's minutes of backoff.
    overrides = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
    try:
        with mock.patch.dict(os.environ, overrides):
            MlflowClient(tracking_uri=uri).search_experiments(max_results=1)
    except Exception as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
        raise UserError(f"run.report_to: mlflow cannot use MLFLOW_TRACKING_URI={uri}: {first}") from None


def prepare_tracking(names: Iterable[str], run_dir: Path | None) -> dict[str, str]:
    """On the driver, before training: check each tracker can start; returns the environment that rank 0
    sets before it builds them (the driver's MLFLOW_* and WANDB_* variables, resolved). `run_dir` is
    the run's local folder, None when it is on object storage."""
    names = list(names)
    for name in names:
        if importlib.util.find_spec(PACKAGES[name]) is None:
            raise UserError(
                f"run.report_to: {name} is not installed (pip install 'kto-ray[{name}]', "
                f"or remove it from run.report_to)"
            )
    # Not WANDB_SERVICE: wandb sets it to its service's socket on this host, which a worker cannot use.
    env = {
        k: v for k, v in os.environ.items() if k.startswith(("MLFLOW_", "WANDB_")) and k not in _HOST_LOCAL
    }
    if "mlflow" in names:
        env["MLFLOW_TRACKING_URI"] = _absolute_mlflow_uri(env.get("MLFLOW_TRACKING_URI"), run_dir)
        if env["MLFLOW_TRACKING_URI"].startswith("sqlite:///"):  # sqlite creates the file, not its folder
            Path(env["MLFLOW_TRACKING_URI"][len("sqlite:///") :]).parent.mkdir(parents=True, exist_ok=True)
        _check_mlflow(env["MLFLOW_TRACKING_URI"])
    if "wandb" in names:
        mode = env.get("WANDB_MODE", "online").strip().lower()
        if mode not in ("online", "offline", "disabled", "dryrun", "run", "shared"):
            raise UserError(f"run.report_to: wandb: WANDB_MODE={mode!r} is not a W&B mode")
        # wandb writes ./wandb in the working directory by default, which on a worker is Ray's.
        env["WANDB_DIR"] = str(Path(env.get("WANDB_DIR") or _wandb_dir(run_dir)).resolve())
        if not is_verbose():
            env.setdefault("WANDB_SILENT", "true")  # W&B prints banners and a summary table otherwise
    return env
