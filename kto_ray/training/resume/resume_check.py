"""A rerun against the checkpoint it resumes: refuse what would break the data position or the
weights, apply (and name) what is safe. The key table is README's "A resume checks what changed".

`compare(saved, new)` takes two run states (training/resume/run_state.py) and returns the one line that names
what the resume applies, or raises a UserError naming the key, both values and the way out.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kto_ray.errors import UserError


@dataclass(frozen=True)
class Key:
    """A refused key: `path` in the run state ("config.train.seed" or a top-level name), the name a
    user knows it by, and what a change would break."""

    path: str
    name: str
    breaks: str


# In the order a refusal reports: the user's own keys first, the derived identities after.
_STEP = "the meaning of a step"
_ORDER = "the data order (the step index would point at other rows)"
_WEIGHTS = "the weights the checkpoint holds"
_LOSS = "the loss every logged step was trained with"
REFUSED = (
    Key("config.data.seed", "data.seed", "the KL pairing and the eval split, so the data order"),
    Key("config.data.max_length", "data.max_length", _STEP),
    Key("config.data.max_prompt_length", "data.max_prompt_length", _STEP),
    Key("config.data.eval_fraction", "data.eval_fraction", "the train split, so the data order"),
    Key("config.train.seed", "train.seed", _ORDER),
    Key("config.train.group_by_length", "train.group_by_length", _ORDER),
    Key("config.reference.mode", "reference.mode", _LOSS),
    Key("config.reference.path", "reference.path", _LOSS),
    Key("config.train.beta", "train.beta", _LOSS),
    Key("config.train.loss", "train.loss", _LOSS),
    Key("desirable_weight", "train.desirable_weight (lambda_D, resolved)", _LOSS),
    Key("config.train.undesirable_weight", "train.undesirable_weight", _LOSS),
    Key("config.lora.enabled", "lora.enabled", _WEIGHTS),
    Key("config.lora.r", "lora.r", _WEIGHTS),
    Key("config.lora.alpha", "lora.alpha", _WEIGHTS),
    Key("config.lora.dropout", "lora.dropout", _LOSS),
    Key("config.lora.target_modules", "lora.target_modules", _WEIGHTS),
    Key("config.lora.modules_to_save", "lora.modules_to_save", _WEIGHTS),
    Key("config.deepspeed.stage", "deepspeed.stage", "the checkpoint's shard layout"),
    Key("model", "model.path (its weights)", _WEIGHTS),
    Key("train_rows", "the train split (store fingerprint, or online the tokenized rows)", _ORDER),
)
# Applied without a word beyond naming them: they change neither a step nor the weights' meaning.
# The global batch's parts and the step count are compared on their own (see compare).
_QUIET = {"config.run.name", "config.run.dir"}
# Optimizer settings restored with the checkpoint's optimizer state and set again from the config after
# the restore (engine.refresh_optimizer_settings), so a change to them takes effect.
_OPTIMIZER = {"lr", "schedule", "warmup_ratio", "weight_decay", "adam_betas"}


def _get(state: dict[str, Any], path: str) -> Any:
    value: Any = state
    for part in path.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


def _flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and key != "workers":  # a worker range reads as one value
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _text(value: Any) -> str:
    text = str(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _refuse(checkpoint: str, name: str, old: Any, new: Any, why: str) -> UserError:
    return UserError(
        f"cannot resume from {checkpoint}: {name} is {_text(old)} there and {_text(new)} now, which changes "
        f"{why}; set it back, or start a new run with another run.name"
    )


def _global_batch(checkpoint: str, saved: dict[str, Any], new: dict[str, Any]) -> None:
    """The global batch is the run's contract: a worker count or micro-batch change re-splits it (the
    driver checks it still splits), a train.global_batch_size asking for another one is refused; null
    keeps the run's."""
    asked = _get(new, "config.train.global_batch_size")
    if asked is not None and asked != saved["global_batch"]:
        raise _refuse(
            checkpoint,
            "train.global_batch_size",
            saved["global_batch"],
            asked,
            "the global batch (rows per optimizer step, fixed at the run's first start; accumulation is "
            "derived from it)",
        )


def _steps_key(new: dict[str, Any]) -> str:
    return "train.max_steps" if _get(new, "config.train.max_steps") is not None else "train.epochs"


def compare(checkpoint: str, saved: dict[str, Any], new: dict[str, Any]) -> str | None:
    """Refuse (UserError) a change that breaks the data position or the weights; otherwise the line
    naming what changed and how it is applied (None when nothing did)."""
    for key in REFUSED:
        if _get(saved, key.path) != _get(new, key.path):
            raise _refuse(checkpoint, key.name, _get(saved, key.path), _get(new, key.path), key.breaks)
    _global_batch(checkpoint, saved, new)
    if new["total_steps"] < saved["total_steps"]:
        raise _refuse(
            checkpoint,
            f"the run's length ({_steps_key(new)})",
            f"{saved['total_steps']} steps",
            f"{new['total_steps']} steps",
            "the learning-rate schedule the steps so far followed (a run may only get longer)",
        )
    notes = []
    if new["total_steps"] > saved["total_steps"]:
        notes.append(
            f"{_steps_key(new)}: {saved['total_steps']} -> {new['total_steps']} steps "
            "(learning-rate schedule recomputed for the new total)"
        )
    compared = {key.path.removeprefix("config.") for key in REFUSED} | {"train.max_steps", "train.epochs"}
    old_flat, new_flat = _flat(saved["config"]), _flat(new["config"])
    for name in sorted(old_flat.keys() | new_flat.keys()):
        if name in compared or f"config.{name}" in _QUIET or old_flat.get(name) == new_flat.get(name):
            continue
        how = ""
        if name in ("cluster.workers", "train.micro_batch_size", "train.global_batch_size"):
            how = f" (global batch {new['global_batch']} kept, accumulation derived per worker count)"
        elif name.startswith("train.") and name.split(".")[1] in _OPTIMIZER:
            how = " (applied to the restored optimizer)"
        notes.append(f"{name}: {_text(old_flat.get(name))} -> {_text(new_flat.get(name))}{how}")
    if not notes:
        return None
    return f"resuming from {checkpoint} with changes: " + "; ".join(notes)
