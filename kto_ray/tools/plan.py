"""`kto-ray plan`: the planner lives in `kto_ray.planning` (training's `stage: auto` uses it too)."""

from kto_ray.planning.plan import (
    CPU_BASELINE_GIB,
    GIB,
    OVERHEAD_GIB,
    SETTINGS,
    Plan,
    Setting,
    StageChoice,
    choose_stage,
    format_plan,
    plan,
)

__all__ = [
    "CPU_BASELINE_GIB",
    "GIB",
    "OVERHEAD_GIB",
    "SETTINGS",
    "Plan",
    "Setting",
    "StageChoice",
    "choose_stage",
    "format_plan",
    "plan",
]
