"""The references in docs/ that are generated from the code: `python -m scripts.reference_docs` rewrites them.

- docs/reference/config.md: every field of the config (kto_ray/config/) and of the sweep file
  (kto_ray/sweep/config.py), with its type, default and description, walked from the pydantic models.
- docs/reference/resume.md: what a rerun on a checkpoint refuses or applies, found by asking the code that
  decides it (training/resume/resume_check.py's `compare`) about a change of every key, one key at a time.

tests/test_docs.py regenerates both in memory and fails when a file differs from what the code says.
"""

from __future__ import annotations

import argparse
import copy
import json
import re
import sys
import types
import typing
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from kto_ray.config import KTOConfig, WorkerRange
from kto_ray.errors import UserError
from kto_ray.sweep.config import Distribution, SweepConfig
from kto_ray.training.resume import resume_check

CONFIG_DOC = Path("docs/reference/config.md")
RESUME_DOC = Path("docs/reference/resume.md")
REGENERATE = "python -m scripts.reference_docs"
_HEADER = f"<!-- Generated from the code by `{REGENERATE}`; do not edit by hand. -->\n"


# --- the configuration reference -------------------------------------------------------------------


def _type_name(annotation: Any) -> str:
    """A field's type as a user writes it in YAML: `int or null`, `auto, float32 or bfloat16`."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Annotated:
        return _type_name(args[0])
    if origin is typing.Literal:
        return " or ".join(json.dumps(a) if isinstance(a, str) else str(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        named = [_type_name(a) for a in args if a is not type(None)]
        return " or ".join([*named, "null"] if type(None) in args else named)
    if origin in (list, tuple, dict):
        inner = ", ".join(_type_name(a) for a in args if a is not Ellipsis)
        return f"{origin.__name__}[{inner}]"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return f"{{{', '.join(annotation.model_fields)}}}"
    return getattr(annotation, "__name__", str(annotation))


def _default(field: Any) -> str:
    if field.default_factory is not None:
        value = field.default_factory()
    elif field.default is PydanticUndefined:
        return "(required)"
    else:
        value = field.default
    if isinstance(value, BaseModel):
        value = value.model_dump(mode="json")
    if isinstance(value, str):
        return value
    return json.dumps(value)


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def _table(model: type[BaseModel], prefix: str) -> list[str]:
    lines = ["| key | type | default | meaning |", "|---|---|---|---|"]
    for name, field in model.model_fields.items():
        lines.append(
            f"| `{prefix}{name}` | {_cell(_type_name(field.annotation))} | `{_cell(_default(field))}` "
            f"| {_cell(field.description or '')} |"
        )
    return lines


def config_reference() -> str:
    out = [
        _HEADER,
        "# Configuration reference",
        "",
        "Every key of a kto-ray config (`--config FILE`, `--set section.key=value`) and of a sweep file",
        "(`kto-ray sweep --sweep FILE`). Unknown keys are refused. Types are as written in YAML; `null` is",
        "YAML's null. Cross-field rules: `data.max_prompt_length < data.max_length`;",
        "`precompute.gpus_per_actor` above 1 is whole; `deepspeed.stage: auto` leaves both offloads at",
        "`none`; `run.report_to: [tensorboard]` needs a local `run.dir`.",
    ]
    for name, field in KTOConfig.model_fields.items():
        section = field.annotation
        assert isinstance(section, type) and issubclass(section, BaseModel)
        out += ["", f"## `{name}`", "", *_table(section, f"{name}.")]
        if section.model_fields.get("workers") is not None:
            out += ["", "A worker range (`cluster.workers: {min: .., max: ..}` or `[min, max]`):", ""]
            out += _table(WorkerRange, "cluster.workers.")
    out += ["", "## The sweep file (`kto-ray sweep --sweep FILE`)", "", *_table(SweepConfig, "")]
    out += ["", "Each entry of `sample` (`--sample KEY=DIST:LOW:HIGH`):", "", *_table(Distribution, "")]
    return "\n".join(out) + "\n"


# --- what a resume refuses or applies --------------------------------------------------------------


def _other(value: Any) -> Any:
    """A value that differs from `value`, of the same kind."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    if isinstance(value, float):
        return value + 0.5
    if isinstance(value, str):
        return value + "-changed"
    if isinstance(value, list):
        return [*value, "changed"]
    if isinstance(value, dict):
        return {**value, "changed": 1}
    return "changed"


def _base_state() -> dict[str, Any]:
    config = KTOConfig(cluster={"workers": 2}, train={"micro_batch_size": 4}).model_dump(mode="json")
    return {
        "train_rows": "rows",
        "model": "weights",
        "desirable_weight": 1.0,
        "global_batch": 8,
        "total_steps": 100,
        "config": config,
    }


def _set(state: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    state = copy.deepcopy(state)
    node = state
    *parents, last = path.split(".")
    for part in parents:
        node = node[part]
    node[last] = value
    return state


def _get(state: dict[str, Any], path: str) -> Any:
    node: Any = state
    for part in path.split("."):
        node = node[part]
    return node


def _flat_keys(tree: dict[str, Any], prefix: str = "") -> list[str]:
    keys = []
    for key, value in tree.items():
        if isinstance(value, dict) and value and key != "workers":
            keys += _flat_keys(value, f"{prefix}{key}.")
        else:
            keys.append(f"{prefix}{key}")
    return keys


def _outcome(new: dict[str, Any]) -> tuple[str, str]:
    """("refused", why) or ("applied", how) for a rerun whose state is `new`, as compare decides it."""
    try:
        line = resume_check.compare("step_00000010", _base_state(), new)
    except UserError as err:
        why = str(err).split("which changes ", 1)[1].split("; set it back", 1)[0]
        return "refused", re.sub(r"\d+", "N", why)
    if line is None:
        return "applied", "not named (where the run lives)"
    hows = re.findall(r"\((.*?)\)(?:;|$)", line)
    how = hows[0] if hows else "named in the resume line"
    return "applied", re.sub(r"global batch \d+", "the global batch", how)


def _key_name(name: str) -> str:
    """`train.beta`, or `model.path` (its weights): the key in code type, what follows it not."""
    key, _, rest = name.partition(" ")
    return f"`{key}` {rest}".strip() if "." in key else name


def resume_table() -> str:
    base = _base_state()
    rows: list[tuple[str, str, str]] = []
    refused_paths = set()
    for key in resume_check.REFUSED:
        refused_paths.add(key.path)
        verdict, why = _outcome(_set(base, key.path, _other(_get(base, key.path))))
        rows.append((_key_name(key.name), verdict, why))
    verdict, why = _outcome(_set(base, "config.train.global_batch_size", 2 * base["global_batch"]))
    rows.append(("`train.global_batch_size` asking for another global batch", verdict, why))
    verdict, why = _outcome(_set(base, "total_steps", 50))
    rows.append(("a shorter run (`train.max_steps`, `train.epochs`)", verdict, why))
    verdict, why = _outcome(_set(base, "total_steps", 200))
    rows.append(("a longer run (`train.max_steps`, `train.epochs`)", verdict, why))

    groups: dict[tuple[str, str], list[str]] = {}
    skip = {p.removeprefix("config.") for p in refused_paths} | {"train.max_steps", "train.epochs"}
    for name in _flat_keys(base["config"]):
        if name in skip:
            continue
        path = f"config.{name}"
        if name == "train.global_batch_size":  # another global batch is refused (above)
            new = _set(base, path, base["global_batch"])
            label = "`train.global_batch_size` (null -> the run's global batch)"
        else:
            new, label = _set(base, path, _other(_get(base, path))), f"`{name}`"
        groups.setdefault(_outcome(new), []).append(label)
    for (verdict, how), names in sorted(groups.items(), key=lambda item: len(item[1])):
        rows.append((", ".join(names), verdict, how))

    out = [
        _HEADER,
        "# What a resume refuses or applies",
        "",
        "A rerun with the same `run.name` compares its run state with the `run_state.json` of the checkpoint",
        "it resumes (`kto_ray/training/resume/resume_check.py`, before anything is launched or written). The",
        "first refused change found, in this order, exits 2 in one line naming the key, both values and the",
        "way out (set it back, or start a new run with another `run.name`); every applied change is named in",
        "one line (`resuming from step_... with changes: ...`). The table is what `compare` answers for a",
        "change of each key alone. Derived identities: `train.desirable_weight` is compared as resolved",
        "(`auto` gives a number), `model.path` by the hash of its weights (a moved folder is no change), the",
        "train split by the store's fingerprint and row count (online: the tokenized rows).",
        "",
        "| change | on resume | because, or how it is applied |",
        "|---|---|---|",
        *(f"| {change} | {verdict} | {_cell(why)} |" for change, verdict, why in rows),
    ]
    return "\n".join(out) + "\n"


# --- the entry point --------------------------------------------------------------------------------


def generated() -> dict[Path, str]:
    """Each generated file (relative to the repository root) and the text the code gives it."""
    return {CONFIG_DOC: config_reference(), RESUME_DOC: resume_table()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m scripts.reference_docs", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--root", default=".", help="the repository root (default: the current folder)")
    parser.add_argument("--check", action="store_true", help="exit 1 when a file differs; write nothing")
    args = parser.parse_args(argv)
    stale = []
    for path, text in generated().items():
        target = Path(args.root) / path
        if target.is_file() and target.read_text() == text:
            continue
        stale.append(str(path))
        if not args.check:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(text)
    verb = "out of date" if args.check else "written"
    for path in stale:
        print(f"{path}: {verb}", file=sys.stderr if args.check else sys.stdout)
    return 1 if args.check and stale else 0


if __name__ == "__main__":
    raise SystemExit(main())
