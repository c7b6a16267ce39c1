"""torch's private names that kto-ray relies on. Written against torch 2.13.0.

- `LRScheduler._last_lr`: what `get_last_lr()` reports until the scheduler's next step; set when a
  resumed run changes its learning-rate settings (the rates are recomputed, not stepped).
"""

from __future__ import annotations

WRITTEN_AGAINST = "2.13.0"


def set_reported_lr(scheduler, rates: list[float]) -> None:
    """Make `scheduler.get_last_lr()` report `rates` until its next step."""
    scheduler._last_lr = rates
