"""Typed run configuration: one pydantic model per concern, loaded from YAML, unknown keys refused.

Every field carries its default and a description; `kto-ray <cmd> --config X --set a.b=v` applies
overrides parsed as YAML scalars, so `--set train.beta=0.2` is a float like it would be in the file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, ValidationError

from kto_ray.config.cluster import ClusterConfig, DeepSpeedConfig
from kto_ray.config.cluster import WorkerRange as WorkerRange
from kto_ray.config.data import DataConfig, ModelConfig, PrecomputeConfig, ReferenceConfig, StoreConfig
from kto_ray.config.section import Section
from kto_ray.config.training import LoraConfig, RunConfig, TrainConfig
from kto_ray.errors import UserError


class KTOConfig(Section):
    model: ModelConfig = Field(default_factory=ModelConfig)
    reference: ReferenceConfig = Field(default_factory=ReferenceConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    store: StoreConfig = Field(default_factory=StoreConfig)
    precompute: PrecomputeConfig = Field(default_factory=PrecomputeConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    lora: LoraConfig = Field(default_factory=LoraConfig)
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)
    deepspeed: DeepSpeedConfig = Field(default_factory=DeepSpeedConfig)
    run: RunConfig = Field(default_factory=RunConfig)

    @property
    def reference_path(self) -> str:
        return self.reference.path or self.model.path

    @property
    def first_global_batch(self) -> int:
        """The rows per optimizer step a run's first start fixes (kto_ray/training/resume/global_batch.py):
        train.global_batch_size, or with null the most workers x train.micro_batch_size."""
        return self.train.global_batch_size or self.cluster.worker_range[1] * self.train.micro_batch_size


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for key in keys[:-1]:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise UserError(f"--set {dotted}: '{key}' is not a section")
        node = child
    node[keys[-1]] = value


def parse_override(item: str) -> tuple[str, Any]:
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise UserError(f"--set expects key.sub=value, got '{item}'")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as err:
        raise UserError(f"--set {key}: cannot parse value '{raw}': {err}") from None
    return key.strip(), value


def describe_invalid(err: ValidationError, source: str) -> str:
    """A pydantic error as the one line a user reads: the first problem, where it is and what was given."""
    first = err.errors()[0]
    where = ".".join(str(p) for p in first["loc"]) or "(top level)"
    if first["type"] == "extra_forbidden":
        return f"{source}: unknown key '{where}'"
    return f"{source}: {where}: {first['msg']} (got {first.get('input')!r})"


def config_from_dict(tree: dict[str, Any], source: str = "config") -> KTOConfig:
    try:
        return KTOConfig.model_validate(tree)
    except ValidationError as err:
        raise UserError(describe_invalid(err, source)) from None


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> KTOConfig:
    """Read YAML (or the defaults when path is None), apply `key.sub=value` overrides, validate."""
    tree: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        path = Path(path)
        source = str(path)
        if not path.is_file():
            raise UserError(f"config file not found: {path}")
        try:
            loaded = yaml.safe_load(path.read_text())
        except yaml.YAMLError as err:
            raise UserError(f"{path}: invalid YAML: {str(err).splitlines()[0]}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise UserError(f"{path}: the top level must be a mapping of sections")
        tree = loaded or {}
    for item in overrides:
        key, value = parse_override(item)
        _set_dotted(tree, key, value)
    return config_from_dict(tree, source)


def dump_config(cfg: KTOConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def with_absolute_paths(cfg: KTOConfig) -> KTOConfig:
    """Copy of `cfg` whose existing local paths are absolute: Ray workers may not share our cwd."""

    def absolute(path: str | None) -> str | None:
        if path is None or "://" in path:
            return path
        return str(Path(path).expanduser().absolute()) if Path(path).expanduser().exists() else path

    out = cfg.model_copy(deep=True)
    out.model.path = absolute(cfg.model.path)
    out.reference.path = absolute(cfg.reference.path)
    out.data.paths = [absolute(p) for p in cfg.data.paths]
    out.store.path = str(Path(cfg.store.path).absolute()) if "://" not in cfg.store.path else cfg.store.path
    out.run.dir = str(Path(cfg.run.dir).absolute()) if "://" not in cfg.run.dir else cfg.run.dir
    return out
