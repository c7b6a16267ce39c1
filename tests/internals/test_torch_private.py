"""What kto_ray/internals/torch_private.py relies on in torch (written against 2.13.0)."""

from __future__ import annotations

import torch

from kto_ray.internals import torch_private


def test_a_set_rate_is_what_the_scheduler_reports_until_it_steps():
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5**step)
    torch_private.set_reported_lr(scheduler, [0.25])
    assert scheduler.get_last_lr() == [0.25], f"torch {torch.__version__}"
    optimizer.step()
    scheduler.step()
    assert scheduler.get_last_lr() == [0.5]
