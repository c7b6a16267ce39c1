"""Checkpoint folder names and their order, and the line that says one is damaged. The file lists
themselves are kto_ray/integrity.py's:

Every rank lists the files it wrote for step N (`files_rank<r>.json`: its shards, its RNG state, rank
0's step and run state) with their sizes and checksums, hashed in its own local folder before it
reports the checkpoint, so the lists travel in the same upload and are there before Ray Train
registers the folder. A checkpoint is whole when rank 0's list is there, the lists of all the
`world_size` ranks it names are there, and every listed file has its size (a LIST: `check_sizes`)
and, read whole, its checksum (`check_local`, where a restore reads the files anyway, and `kto-ray
verify`). No Ray import here: the driver and `kto-ray verify` use it too.
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
