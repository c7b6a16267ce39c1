"""Shared fixtures: the embedded tiny model (built once per checkout), a local Ray, small configs.

`make_config` lives in tests/helpers.py (shared with bench/); it is imported here so that
`from tests.conftest import make_config` keeps working."""

from __future__ import annotations

import contextlib
import json
import os
import re
from pathlib import Path

import pytest

from tests.helpers import make_config

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no test may reach a hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_model() -> Path:
    from kto_ray.assets.tiny_model import ensure_tiny_model

    return ensure_tiny_model(REPO / "artifacts" / "tiny-llama")


@pytest.fixture(scope="session")
def real_model() -> Path:
    """SmolLM2-135M-Instruct as a Hugging Face folder (`make real-model`; built here when missing)."""
    from kto_ray.assets.smollm2 import build_smollm2

    return build_smollm2(REPO / "artifacts" / "smollm2-135m-instruct")


@pytest.fixture(scope="module")
def ray_local():
    """A fresh local Ray per test module: no actor, placement group or Ray Data state leaks across."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    from kto_ray.raycluster import no_state_api_lookup

    # As kto_ray.raycluster does for a local Ray: Ray Train's placement-group cleaner would otherwise ask
    # the Ray started last on this host (another test run's) about our controller, and remove our group.
    with no_state_api_lookup():
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=True)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def ray_local_gpu():
    """A fresh local Ray that sees this machine's GPUs (the `gpu` tests)."""
    import ray
    import torch

    if ray.is_initialized():
        ray.shutdown()
    from kto_ray.raycluster import no_state_api_lookup

    with no_state_api_lookup():
        ray.init(address="local", num_cpus=4, num_gpus=torch.cuda.device_count(), include_dashboard=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def small_data(tmp_path_factory) -> Path:
    """The first 240 rows of the shipped data: enough rows for pairing, fast to score and train on."""
    out = tmp_path_factory.mktemp("data") / "small.jsonl"
    lines = (REPO / "data" / "arithmetic.jsonl").read_text().splitlines()[:240]
    out.write_text("\n".join(lines) + "\n")
    return out


def kill_process_tree(pid: int) -> None:
    """SIGKILL a process and everything it started, as when its node or job goes away. Killing its
    process group is not enough: Ray's processes (and Ray Train's controller actor) would live on."""
    import psutil

    root = psutil.Process(pid)
    for proc in [root, *root.children(recursive=True)]:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()
    psutil.wait_procs([root], timeout=30)


def registered_steps(run_dir) -> list[int]:
    """Checkpoints Ray Train has registered (its snapshot file), not folders that merely appeared;
    `run_dir` a local folder or a URI."""
    from kto_ray.rundir import RunDir

    text = RunDir(run_dir).read_text("checkpoints/checkpoint_manager_snapshot.json")  # None: no file
    try:
        results = json.loads(text or "{}")["checkpoint_results"]
    except (ValueError, KeyError):  # not written yet, or caught mid-write on local disk
        return []
    return [int(r["checkpoint_dir_name"].removeprefix("step_")) for r in results]


def assert_same_tensors(left: dict, right: dict) -> None:
    """Two state dicts hold the same tensors (1e-5)."""
    import torch

    assert left.keys() == right.keys()
    for key in left:
        torch.testing.assert_close(left[key], right[key], atol=1e-5, rtol=1e-4)


def assert_same_weights(final: Path, expected: Path) -> None:
    """Two exported model folders hold the same weights (1e-5)."""
    from safetensors.torch import load_file

    assert_same_tensors(load_file(final / "model.safetensors"), load_file(expected / "model.safetensors"))


def wait_for(condition, alive, timeout: float = 300, interval: float = 0.05) -> None:
    """Poll `condition` while `alive()`; fail when the run ends or the time is up first."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and alive():
        if condition():
            return
        time.sleep(interval)
    raise AssertionError("the run ended (or timed out) before the condition held")


# A line a Ray actor or the raylet logged to the driver ("(PlacementGroupCleaner pid=17898) ...",
# "(raylet) ..."), colour codes or not:
# the previous run's actors may still print while a CLI test reads its own stderr.
_RAY_ACTOR_LINE = re.compile(r"^(\x1b\[\d+m)?\((raylet|\w+ pid=\d+)")


def own_lines(text: str) -> list[str]:
    """`text`'s lines without those Ray actors logged to the driver."""
    return [line for line in text.strip().splitlines() if not _RAY_ACTOR_LINE.match(line)]


def read_metrics(run_dir) -> list[dict]:
    """The run's metrics records through the product's one reader (a local folder or a URI)."""
    from kto_ray.training.metrics import read_metrics as read

    return read(run_dir)


@pytest.fixture(scope="session")
def built_store(tiny_model, small_data, tmp_path_factory):
    """One reference store of the small data, shared by the precompute and training tests (read-only).
    Built on the module's Ray when one is up, else on a private one that precompute starts and stops."""
    from kto_ray.reference.precompute import precompute

    cfg = make_config(tiny_model, small_data, tmp_path_factory.mktemp("built"))
    result = precompute(cfg)
    assert not result.reused
    return cfg, result.store


@pytest.fixture(scope="module")
def s3():
    """A real S3 server (moto) on loopback for the module, its endpoint and fake credentials in the
    environment, with a bucket `kto`."""
    from tests.s3server import s3_server

    with s3_server() as server, pytest.MonkeyPatch.context() as patch:
        for key, value in server.environment().items():
            patch.setenv(key, value)
        server.create_bucket("kto")
        yield server


@pytest.fixture(scope="module")
def ray_with_s3(s3):
    """A local Ray started after the endpoint is in the environment, so its workers inherit it."""
    import ray

    from kto_ray.raycluster import no_state_api_lookup

    if ray.is_initialized():
        ray.shutdown()
    with no_state_api_lookup():
        ray.init(address="local", num_cpus=2, include_dashboard=False)
    yield ray
    ray.shutdown()
