"""What a person sees: our own progress and results; library chatter, switched off where it is made
(not filtered from the output), only with `-v/--verbose` or `KTO_RAY_VERBOSE=1` (under `ray job submit`)."""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
import warnings
from typing import Any, TextIO

VERBOSE_ENV = "KTO_RAY_VERBOSE"


def is_verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "").strip().lower() not in ("", "0", "false", "no")


def is_interactive(stream: TextIO) -> bool:
    return bool(getattr(stream, "isatty", lambda: False)())


def configure(verbose: bool | None = None) -> bool:
    """Set the libraries' verbosity for this process and the Ray processes it starts; returns whether
    the console is verbose. Call before transformers, DeepSpeed or Ray are imported where possible:
    some read their settings from the environment at import."""
    if verbose:
        os.environ[VERBOSE_ENV] = "1"
    if is_verbose():
        return True
    # Read at import by transformers / huggingface_hub, and inherited by Ray's workers.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    # Ray's C++ core logs at error level for conditions Ray handles by itself: every Ray Data actor
    # pool makes the driver log "constructor arguments in the object store and max_restarts > 0" for
    # Ray Data's own MapWorker arguments (ray-project/ray#57733; an actor class of ours without
    # constructor arguments still gets it, tried with ray 2.60). Real failures reach us as Python
    # exceptions. Ray announces the setting in one line, the price of the alarming one it removes;
    # `max_restarts: 0` would remove both, and with them the pool's restarts after a lost node.
    os.environ.setdefault("RAY_BACKEND_LOG_LEVEL", "fatal")
    # Without CUDA DeepSpeed falls back to its CPU accelerator with a warning that asks whether a GPU
    # went undetected; naming the accelerator (its documented DS_ACCELERATOR override) is the same
    # choice, made without the warning. Inherited by the Ray workers this process starts.
    if "DS_ACCELERATOR" not in os.environ:
        import torch

        if not (torch.cuda.device_count() > 0 and torch.cuda.is_available()):
            os.environ["DS_ACCELERATOR"] = "cpu"
    for name in ("ray", "ray.data", "ray.train", "ray.tune", "DeepSpeed", "torch.distributed"):
        logging.getLogger(name).setLevel(logging.ERROR)
    if "transformers" in sys.modules:  # already imported: its env settings were read before ours
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    # Deprecation notices about library internals are for their maintainers, not for our users.
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.formatwarning = lambda message, *_, **__: f"kto-ray: warning: {message}\n"
    return False


def ray_init_options() -> dict[str, Any]:
    """ray.init arguments: worker output reaches the driver only when verbose."""
    verbose = is_verbose()
    return {"log_to_driver": verbose, "logging_level": logging.INFO if verbose else logging.ERROR}


def configure_ray_data() -> None:
    """Ray Data on the driver: its bars, progress blocks and execution plan only when verbose."""
    from ray.data import DataContext

    context = DataContext.get_current()
    verbose = is_verbose()
    context.enable_progress_bars = verbose  # on a terminal, precompute draws its own (rows, tokens/s)
    context.enable_operator_progress_bars = verbose
    context.print_on_execution_start = verbose
    if not verbose:
        # Ray Data logs to its session file and, at INFO, to the console; keep the file complete.
        for handler in logging.getLogger("ray.data").handlers:
            if isinstance(handler, logging.StreamHandler):
                handler.setLevel(logging.ERROR)


class RowProgress:
    """A bar of rows done and tokens/s for work that runs elsewhere (Ray Data actors): `read` returns
    (rows, tokens) so far and is polled from a thread every `poll_s`. Nothing is drawn off a terminal
    (stderr), where the caller prints one summary line at the end instead."""

    poll_s = 0.5

    def __init__(self, read, total_rows: int, desc: str):
        self.read, self.total, self.desc, self.stream = read, total_rows, desc, sys.stderr
        self._stop = threading.Event()
        self._bar = None

    def __enter__(self) -> RowProgress:
        if is_interactive(self.stream):
            from tqdm import tqdm

            self._bar = tqdm(
                total=self.total, desc=self.desc, unit="row", file=self.stream, dynamic_ncols=True
            )
            self._started = time.monotonic()
            self._thread = threading.Thread(target=self._follow, name="kto-ray-rows", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bar is None:
            return
        self._stop.set()
        self._thread.join()
        if exc[0] is None:
            self._update()
        self._bar.close()

    def _follow(self) -> None:
        while not self._stop.wait(self.poll_s):
            self._update()

    def _update(self) -> None:
        try:
            rows, tokens = self.read()
        except Exception:  # the counter is best effort: the work itself reports real failures
            return
        elapsed = max(time.monotonic() - self._started, 1e-9)
        self._bar.set_postfix_str(f"{tokens / elapsed:,.0f} tokens/s", refresh=False)
        self._bar.update(min(rows, self.total) - self._bar.n)
