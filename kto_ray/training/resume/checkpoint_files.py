"""Checkpoint folder names and their order, and the line that says one is damaged (the file lists that
find the damage are kto_ray/integrity.py's). No Ray import here: the driver and `kto-ray verify` use it.
"""

from __future__ import annotations

import re

from kto_ray.integrity import Problem


def checkpoint_order(name: str) -> tuple[int, int] | None:
    """(step, redo) of a checkpoint folder's name (`step_<n>`, `step_<n>-<k>` for the k-th redo of a
    step whose checkpoint was damaged), the order of checkpoints; None if not one."""
    found = re.match(r"^step_(\d+)(?:-(\d+))?$", name)
    return (int(found.group(1)), int(found.group(2) or 0)) if found else None


def checkpoint_step(name: str) -> int | None:
    """The step in a checkpoint folder's name, None if not one."""
    order = checkpoint_order(name)
    return order[0] if order else None


def older_than(name: str, names: list[str]) -> list[str]:
    """The checkpoints in `names` before `name`, newest first."""
    mine = checkpoint_order(name)
    found = [(order, n) for n in names if (order := checkpoint_order(n)) is not None]
    return [n for order, n in sorted(found, reverse=True) if mine is not None and order < mine]


def damage_line(name: str, problem: Problem) -> str:
    """`checkpoint step 4 is damaged (file ..., size ...)`: the words the fallback and the errors use."""
    step = checkpoint_step(name)
    what = f"step {step}" if step is not None else name
    return f"checkpoint {what} is damaged (file {problem.path}, {problem.what})"
