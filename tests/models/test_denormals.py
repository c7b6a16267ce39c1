"""Subnormal floats are flushed on the threads that run model math (kto_ray/models/denormals.py).

Each check runs in a fresh interpreter: the x86 control register is per thread and inherited, so the
test process's own state (whatever earlier tests set) must not decide the outcome."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.helpers import REPO


def _run(code: str) -> str:
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120, check=True
    )
    return proc.stdout.strip()


def test_flushing_covers_the_intra_op_threads_the_thread_starts():
    out = _run(
        "import torch\n"
        "from kto_ray.models.denormals import denormals_flushed, flush_denormals\n"
        "torch.set_num_threads(2)\n"
        "before = denormals_flushed()\n"
        "import threading\n"
        "seen = []\n"
        "def compute():\n"
        "    flush_denormals()\n"
        "    seen.append(denormals_flushed())\n"
        "t = threading.Thread(target=compute); t.start(); t.join()\n"
        "print(before, seen[0])\n"
    )
    assert out == "False True"


def test_loading_a_model_flushes_on_the_loading_thread(tiny_model):
    out = _run(
        "import torch\n"
        "from kto_ray.config import ModelConfig\n"
        "from kto_ray.models.denormals import denormals_flushed\n"
        "from kto_ray.models.loading import load_causal_lm\n"
        "torch.set_num_threads(2)\n"
        f"load_causal_lm(ModelConfig(path={str(tiny_model)!r}), torch.float32)\n"
        "print(denormals_flushed())\n"
    )
    assert out == "True"


@pytest.mark.extended
def test_long_row_steps_cost_what_their_shape_costs():
    """The bench's skewed run: every kto-ray step within 3x the same batches through plain transformers
    (the long steps were 6-12x with subnormal gradients on the CPU they were found on), and every rank
    flushing. A ratio measured in one run: the machine's speed and load cancel out. It is also the bench
    script's run in the suite (tests/test_bench.py runs no smoke of it): its table must print."""
    proc = subprocess.run(
        [sys.executable, "bench/long_rows.py", "--steps", "8", "--check", "3"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "| step | rows | tokens" in proc.stdout
    assert "denormals flushed on the ranks: [True]" in proc.stdout
