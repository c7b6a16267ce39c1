"""Training progress on the driver, drawn from what rank 0 writes to metrics.jsonl: a tqdm bar on a
terminal, a plain line every `train.log_every` steps otherwise (CI, `ray job logs`)."""

from __future__ import annotations

import sys
import threading
import time
from typing import Any, TextIO

from kto_ray.console import is_interactive
from kto_ray.rundir import RunDir
from kto_ray.rundir.metrics import MetricsFollower


class TrainingProgress:
    """Follows `metrics.jsonl` in a thread while training runs and shows each new step once.

    A resume drops the steps past the restored checkpoint and redoes them; steps already shown are
    not shown again.
    """

    def __init__(
        self,
        run_dir: RunDir,
        total_steps: int,
        log_every: int,
        *,
        interactive: bool | None = None,
        stream: TextIO | None = None,
        poll_s: float | None = None,
    ):
        self.run_dir, self.total, self.log_every = run_dir, total_steps, log_every
        # Object storage: two or three requests per poll (what is new, whether a next segment exists).
        self.poll_s = poll_s if poll_s is not None else (1.0 if run_dir.is_remote else 0.5)
        self.stream = stream or sys.stdout
        self.interactive = is_interactive(self.stream) if interactive is None else interactive
        self.shown = 0  # highest step shown
        self.first: tuple[int, float] | None = None  # (first step seen, when)
        self._follower = MetricsFollower(run_dir)
        self._stop = threading.Event()
        self._lock = threading.Lock()  # poll() runs in the thread and once more at exit
        self._bar = None

    def __enter__(self) -> TrainingProgress:
        if self.interactive:
            from tqdm import tqdm

            self._bar = tqdm(
                total=self.total, desc="train", unit="step", file=self.stream, dynamic_ncols=True, leave=True
            )
        self._thread = threading.Thread(target=self._follow, name="kto-ray-progress", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.poll()  # the last steps written before fit returned
        if self._bar is not None:
            self._bar.close()

    def _follow(self) -> None:
        while not self._stop.wait(self.poll_s):
            self.poll()

    def poll(self) -> None:
        """Read what was appended since the last call and show the new steps."""
        with self._lock:
            try:
                records = self._follower.poll()
            except OSError:  # storage unreachable for a moment: the next poll goes on from where this stopped
                return
            for record in records:
                if (step := int(record.get("step", 0))) > self.shown:
                    self._show(step, record)
                    self.shown = step

    def _show(self, step: int, metrics: dict[str, Any]) -> None:
        now = time.monotonic()
        if self.first is None:
            self.first = (step, now)
        if self._bar is not None:
            self._bar.set_postfix(
                loss=f"{metrics['loss']:.4f}",
                kl=f"{metrics['kl']:.4f}",
                kl_raw=f"{metrics['kl/raw']:.4f}",
                margin=f"{metrics['rewards/margins']:.3f}",
                samples_s=f"{metrics['samples/s']:.1f}",
                refresh=False,
            )
            self._bar.update(step - self._bar.n)
            return
        if step % self.log_every and step != self.total:
            return
        # Seconds per step since the first step seen (setup excluded); the step's own time before that.
        done, started = step - self.first[0], self.first[1]
        per_step = (now - started) / done if done else float(metrics.get("step_time", 0.0))
        eta = per_step * (self.total - step)
        print(
            f"step {step}/{self.total} loss {metrics['loss']:.4f} kl {metrics['kl']:.4f} "
            f"(raw {metrics['kl/raw']:.4f}) margin {metrics['rewards/margins']:.4f} "
            f"{metrics['samples/s']:.1f} samples/s eta {eta:.0f}s",
            file=self.stream,
            flush=True,
        )
