"""DeepSpeed's private names that kto-ray relies on. Written against deepspeed 0.19.8.

- `engine._config.load_universal_checkpoint`: read by `load_checkpoint` only; set for one load of a
  converted (universal) checkpoint, since the engine is built before the checkpoint is seen.
- `optimizer.clear_backward_seen_flag()`: what `engine.forward` runs first, so ZeRO counts a
  micro-step when the module is called directly (the chunked log-probs need the decoder's output).
- `deepspeed.ops.__compatible_ops__`: marks the CPU shared-memory all-reduce op unavailable, so it is
  never JIT-built; only DeepSpeed's inference kernels (`inference_all_reduce`, tensor-parallel layers)
  call it, never ZeRO training.
- `ds_to_universal.main(argparse.Namespace)`: the checkpoint converter has no function API.
- mlflow hidden from `import deepspeed`: its autotuner imports mlflow when installed (~1 s per worker).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
from collections.abc import Iterator
from pathlib import Path

WRITTEN_AGAINST = "0.19.8"
SHM_COMM_OP = "deepspeed_shm_comm"


def import_deepspeed():
    """DeepSpeed, imported without mlflow; mlflow stays importable afterwards (the mlflow tracker
    imports it when asked for)."""
    if "mlflow" in sys.modules:
        import deepspeed

        return deepspeed
    sys.modules["mlflow"] = None  # an import of it fails fast: DeepSpeed's optional import gives up
    try:
        import deepspeed
    finally:
        del sys.modules["mlflow"]
    return deepspeed


def skip_shm_comm_op(deepspeed) -> None:
    """Mark the CPU shared-memory all-reduce op unavailable (no JIT build, no load on every start)."""
    deepspeed.ops.__compatible_ops__[SHM_COMM_OP] = False


@contextlib.contextmanager
def universal_load(engine, universal: bool) -> Iterator[None]:
    """Within: `engine.load_checkpoint` reads a universal checkpoint when `universal`; put back after."""
    engine._config.load_universal_checkpoint = universal
    try:
        yield
    finally:
        engine._config.load_universal_checkpoint = False


def begin_micro_step(engine) -> None:
    """The first thing `engine.forward` does: the ZeRO optimizer starts counting a micro-step."""
    begin = getattr(getattr(engine, "optimizer", None), "clear_backward_seen_flag", None)
    if begin is not None:
        begin()


def convert_to_universal(source: Path, target: Path, extract_workers: int, merge_workers: int) -> None:
    """DeepSpeed's converter from a ZeRO-2/3 checkpoint folder `source` to a universal one at `target`,
    its prints and progress bars kept out of the caller's log. `inject_missing_state`: Hugging Face
    models carry no `universal_checkpoint_info` (Megatron's tensor-parallel patterns), none needed here."""
    from deepspeed.checkpoint import ds_to_universal

    args = argparse.Namespace(
        input_folder=str(source),
        output_folder=str(target),
        num_extract_workers=extract_workers,
        num_merge_workers=merge_workers,
        keep_temp_folder=False,
        strict=True,
        inject_missing_state=True,
    )
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        ds_to_universal.main(args)
