"""The sweep's own typed config (`kto-ray sweep --sweep FILE`, and `--grid` / `--sample` on the command
line) and the trials it expands to.

A sweep is fixed before anything is launched: the grid's cartesian product, times `samples` seeded draws
of the sampled keys, in a fixed order, each trial named `trial-NNN`. So every trial's whole config is
validated up front (a key that does not exist or a value of the wrong type exits 2 naming it), and a
rerun of the same sweep finds the same trials under the same names, which is what resuming needs.
"""

from __future__ import annotations

import contextlib
import itertools
import math
from pathlib import Path
from typing import Any, Literal

import numpy as np
import yaml
from pydantic import Field, ValidationError, model_validator

from kto_ray.config import KTOConfig, Section, config_from_dict, describe_invalid, parse_override
from kto_ray.errors import UserError
from kto_ray.objective import EVAL_KEYS

# A sweep trains every trial on one store: keys that change what the store holds are not swept (the
# model keys the store's fingerprint reads: its weights and tokenizer come from model.path at
# model.revision; model.dtype is the training dtype, the store's is precompute.dtype).
STORE_SECTIONS = ("data", "store", "precompute", "reference")
STORE_KEYS = ("model.path", "model.revision", "model.trust_remote_code")
LAYOUT_KEYS = ("run.dir", "run.name")  # set by the sweep: <run.dir>/<sweep name>/<trial>
# Set by the sweep on every trial: an eval after its last step, which the table ranks by.
RANKING_KEY = "train.eval_at_end"
EVAL_METRICS = tuple(f"eval/{key}" for key in EVAL_KEYS if key != "rows")


class Distribution(Section):
    """A sampled key: `uniform` and `loguniform` draw floats in [low, high), `int` integers in
    [low, high] (both ends included)."""

    dist: Literal["uniform", "loguniform", "int"] = Field(description="How the value is drawn.")
    low: float = Field(description="Lower bound.")
    high: float = Field(description="Upper bound (above low).")

    @model_validator(mode="after")
    def _bounds(self) -> Distribution:
        if not self.low < self.high:
            raise ValueError(f"low ({self.low}) must be below high ({self.high})")
        if self.dist == "loguniform" and self.low <= 0:
            raise ValueError(f"loguniform needs low > 0 (got {self.low})")
        if self.dist == "int" and not (float(self.low).is_integer() and float(self.high).is_integer()):
            raise ValueError("int needs whole bounds")
        return self

    def draw(self, rng: np.random.Generator) -> float | int:
        if self.dist == "int":
            return int(rng.integers(int(self.low), int(self.high), endpoint=True))
        if self.dist == "loguniform":
            return float(math.exp(rng.uniform(math.log(self.low), math.log(self.high))))
        return float(rng.uniform(self.low, self.high))


class SweepConfig(Section):
    """`kto-ray sweep`'s settings. Keys are dotted config keys (`train.beta`), as for `--set`."""

    name: str | None = Field(
        None,
        description="The sweep's folder under run.dir (its trials' run dirs, summary.md, sweep.json); "
        "default: <run.name>-sweep. Rerunning the same sweep resumes it.",
    )
    grid: dict[str, list[Any]] = Field(
        default_factory=dict,
        description="Every combination of these values is a trial (the first key varies slowest).",
    )
    sample: dict[str, Distribution] = Field(
        default_factory=dict, description="Keys drawn at random, `samples` times per grid point."
    )
    samples: int = Field(1, ge=1, description="Draws of the sampled keys per grid point.")
    seed: int = Field(0, description="Seed of the draws: the same seed gives the same trials.")
    max_concurrent: int | None = Field(
        None, ge=1, description="At most this many trials at once (default: as many as the cluster fits)."
    )
    trial_cpus: float = Field(
        0.5,
        gt=0.0,
        description="CPUs of Tune's actor per trial (it drives the trial's Ray Train run and "
        "follows its metrics), on top of its workers' cluster.cpus_per_worker each.",
    )
    scheduler: Literal["none", "asha", "median"] = Field(
        "none",
        description="Early stopping on `metric`, which needs train.eval_every (the table needs none: "
        "every trial is evaluated after its last step): ASHA (asynchronous successive halving) or the "
        "median stopping rule; none runs every trial to its end.",
    )
    metric: str = Field(
        "eval/loss",
        description=f"The eval metric the scheduler and the table rank by: one of {EVAL_METRICS}.",
    )
    mode: Literal["min", "max"] = Field("min", description="Whether lower or higher `metric` is better.")
    grace_steps: int = Field(
        1, ge=1, description="Optimizer steps every trial runs before it can be stopped."
    )
    reduction_factor: float = Field(
        2.0, gt=1.0, description="ASHA: a rung keeps the best 1/reduction_factor of the trials."
    )
    min_samples: int = Field(
        3, ge=1, description="Median stopping: trials with a result needed before any trial is stopped."
    )

    @model_validator(mode="after")
    def _known_metric(self) -> SweepConfig:
        if self.metric not in EVAL_METRICS:
            raise ValueError(f"metric '{self.metric}' is not one of {', '.join(EVAL_METRICS)}")
        both = set(self.grid) & set(self.sample)
        if both:
            raise ValueError(f"{sorted(both)[0]} is both in grid and in sample")
        empty = next((key for key, values in self.grid.items() if not values), None)
        if empty is not None:
            raise ValueError(f"grid {empty}: no values")
        return self


def _number_if_one(value: Any) -> Any:
    """YAML 1.1 reads `1e-5` (no dot) as text; on the command line it means the number."""
    if isinstance(value, str) and any(c.isdigit() for c in value):
        with contextlib.suppress(ValueError):
            return float(value)
    return value


def load_sweep(
    path: str | Path | None, grid: list[str] | tuple[str, ...] = (), sample: list[str] | tuple[str, ...] = ()
) -> SweepConfig:
    """The sweep file (or the defaults) with the command line's `--grid K=V1,V2,...` and
    `--sample K=DIST:LOW:HIGH` added (they replace the file's entry for the same key)."""
    tree: dict[str, Any] = {}
    source = "sweep" if path is None else str(path)
    if path is not None:
        if not Path(path).is_file():
            raise UserError(f"sweep file not found: {path}")
        try:
            tree = yaml.safe_load(Path(path).read_text()) or {}
        except yaml.YAMLError as err:
            raise UserError(f"{path}: invalid YAML: {str(err).splitlines()[0]}") from None
        if not isinstance(tree, dict):
            raise UserError(f"{path}: the top level must be a mapping")
    for item in grid:
        key, _ = parse_override(item)
        raw = item.partition("=")[2]
        values = [_number_if_one(parse_override(f"{key}={part}")[1]) for part in raw.split(",")]
        tree.setdefault("grid", {})[key] = values
        tree.get("sample", {}).pop(key, None)
    for item in sample:
        key, _ = parse_override(item)
        parts = item.partition("=")[2].split(":")
        if len(parts) != 3:
            raise UserError(
                f"--sample {key}: expected DIST:LOW:HIGH (uniform, loguniform, int), got '{item}'"
            )
        tree.setdefault("sample", {})[key] = {"dist": parts[0], "low": parts[1], "high": parts[2]}
        tree.get("grid", {}).pop(key, None)
    try:
        return SweepConfig.model_validate(tree)
    except ValidationError as err:
        raise UserError(describe_invalid(err, source)) from None


def _swept_key_refused(key: str) -> str | None:
    section = key.split(".", 1)[0]
    if section in STORE_SECTIONS or key in STORE_KEYS:
        return "a sweep trains every trial on one store, so it cannot sweep what the store is built from"
    if key in LAYOUT_KEYS:
        return "the sweep names the trials' run dirs itself (<run.dir>/<sweep name>/<trial>)"
    if key == RANKING_KEY:
        return "the sweep evaluates every trial after its last step, to rank it"
    return None


def trial_overrides(sweep: SweepConfig) -> list[dict[str, Any]]:
    """Each trial's swept values, in trial order: the grid's product, `samples` draws per grid point."""
    for key in [*sweep.grid, *sweep.sample]:
        why = _swept_key_refused(key)
        if why is not None:
            raise UserError(f"sweep key {key}: {why}")
    rng = np.random.default_rng(sweep.seed)
    trials = []
    for point in itertools.product(*sweep.grid.values()):
        for _ in range(sweep.samples if sweep.sample else 1):
            values = dict(zip(sweep.grid, point))
            values.update({key: dist.draw(rng) for key, dist in sweep.sample.items()})
            trials.append(values)
    return trials


def sweep_name(cfg: KTOConfig, sweep: SweepConfig) -> str:
    return sweep.name or f"{cfg.run.name}-sweep"


def trial_configs(cfg: KTOConfig, sweep: SweepConfig) -> dict[str, tuple[dict[str, Any], KTOConfig]]:
    """Every trial's (swept values, whole config), validated: the first bad one exits 2 naming the
    trial and the key. The run dirs are `<run.dir>/<sweep name>/<trial>`; every trial evaluates after its
    last step (train.eval_at_end), with or without train.eval_every, so the table ranks it."""
    base = cfg.model_dump(mode="json")
    out = {}
    for index, values in enumerate(trial_overrides(sweep)):
        name = f"trial-{index:03d}"
        tree = yaml.safe_load(yaml.safe_dump(base))  # a deep copy
        for key, value in values.items():
            node = tree
            *sections, last = key.split(".")
            for part in sections:
                node = node.get(part) if isinstance(node, dict) else None
                if not isinstance(node, dict):
                    raise UserError(f"sweep key {key}: unknown key '{part}'")
            node[last] = value
        tree["run"]["dir"] = f"{cfg.run.dir.rstrip('/')}/{sweep_name(cfg, sweep)}"
        tree["run"]["name"] = name
        tree["train"]["eval_at_end"] = True
        shown = ", ".join(f"{key}={value!r}" for key, value in values.items())
        trial_cfg = config_from_dict(tree, f"sweep {name} ({shown})")
        out[name] = (values, trial_cfg)
    return out


def check_scheduler(sweep: SweepConfig, trials: dict[str, tuple[dict[str, Any], KTOConfig]]) -> None:
    """Early stopping needs eval during training: every trial must set train.eval_every."""
    if sweep.scheduler == "none":
        return
    missing = next((name for name, (_, cfg) in trials.items() if not cfg.train.eval_every), None)
    if missing is not None:
        raise UserError(
            f"sweep scheduler {sweep.scheduler} stops trials on {sweep.metric}, which needs "
            f"train.eval_every (unset in {missing})"
        )
