"""The memory planner (`kto-ray plan`, `deepspeed.stage: auto`): architecture without weights, memory
formulas, per-GPU plans and the stage choice. Imports neither training nor tools, so both can use it."""
