"""DeepSpeed's communication backend on CPU workers: made without building or loading the
shared-memory all-reduce op that only DeepSpeed's inference kernels use, and DeepSpeed imported without
mlflow (its autotuner's optional import), which stays importable."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.helpers import REPO

pytestmark = pytest.mark.slow  # imports DeepSpeed in a fresh process

_CHILD = """
import os
import torch
import torch.distributed as dist

dist.init_process_group("gloo", init_method="tcp://127.0.0.1:0", rank=0, world_size=1)
from kto_ray.training.distributed import init_deepspeed_comm
init_deepspeed_comm(use_gpu=False)
import deepspeed.comm.comm as ds_comm
assert ds_comm.cdb.shm_comm_op is None
ones = torch.ones(3)
ds_comm.all_reduce(ones)  # the backend ZeRO uses works
assert ones.tolist() == [1.0, 1.0, 1.0]
import importlib.util
import sys
assert "mlflow" not in sys.modules
if importlib.util.find_spec("mlflow") is not None:  # installed: still importable
    import mlflow
print("ok")
"""


def test_cpu_comm_backend_builds_no_op(tmp_path):
    extensions = tmp_path / "torch_extensions"
    env = os.environ | {
        "TORCH_EXTENSIONS_DIR": str(extensions),
        "DS_ACCELERATOR": "cpu",
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }
    done = subprocess.run(
        [sys.executable, "-c", _CHILD], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().endswith("ok")
    # Nothing JIT-built: DeepSpeed would have compiled deepspeed_shm_comm here (seconds to minutes).
    assert not extensions.exists() or not any(extensions.rglob("*.so"))
