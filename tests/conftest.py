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
    from tests.smollm2 import build_smollm2

    return build_smollm2(REPO / "artifacts" / "smollm2-135m-instruct")


# Ray Train's controller polls its workers every 2 s (RAY_TRAIN_HEALTH_CHECK_INTERVAL_S, a public setting the
# driver propagates to the controller): every train() waited up to 2 s per poll for the last report and the
# workers' exit. 0.25 s here, for in-process runs and every CLI or bench subprocess the tests start.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")
# Ray Train's controller waits up to 30 s (TORCH_PROCESS_GROUP_SHUTDOWN_TIMEOUT_S) for a worker group's
# torch process group to shut down, which a group that lost a worker never does (the elastic test waited
# it out): 5 s here. Read where the controller runs, from its node's environment: every Ray the tests
# start (the session's, a CLI's `RAY_ADDRESS=local`, tests/nodes.py's nodes) inherits this process's.
os.environ.setdefault("TORCH_PROCESS_GROUP_SHUTDOWN_TIMEOUT_S", "5")
# Ray Train's controller starts a PreemptionWatcher actor per run (a process of its own, that imports Ray)
# to report cloud node preemptions; no test preempts a node, and every train() paid for the process.
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")


@contextlib.contextmanager
def _environment(values: dict[str, str]):
    """`values` in os.environ for the block (what a Ray started inside passes on to its processes)."""
    previous = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in previous.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture(scope="session")
def s3_session():
    """One S3 server (moto behind its relay) for the whole session; `s3` hands it to a module clean."""
    from tests.s3server import s3_server

    with s3_server() as server:
        yield server


def _start_session_ray(s3_server) -> None:
    import ray

    from kto_ray.raycluster import no_state_api_lookup

    # As kto_ray.raycluster does for a local Ray: Ray Train's placement-group cleaner would otherwise ask
    # the Ray started last on this host (another test run's) about our controller, and remove our group.
    # The S3 server's endpoint and fake credentials are in the environment Ray starts with, so its workers
    # (Ray Data's tasks, Ray Train's workers) find the server as a node's own environment would.
    with no_state_api_lookup(), _environment(s3_server.environment()):
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=True)


@pytest.fixture(scope="session")
def ray_session(s3_session):
    """One local Ray for the whole session (started on first use, shut down at the end). Each module
    that uses it gets it through `ray_local`, which checks the module left no actor or placement group."""
    import ray

    if not ray.is_initialized():
        _start_session_ray(s3_session)
    yield ray
    if ray.is_initialized():
        ray.shutdown()


# Ray's own detached actors that live as long as the cluster once something needs them (Ray Train's
# run-state actor; Ray Data's stats, autoscaling and actor-location ones): not a module's leftovers. Ray
# Train's detached PlacementGroupCleaner is not among them: a run's controller stops it on the way out.
RAY_SINGLETONS = {
    "TrainStateActor",
    "_StatsActor",
    "_StatsSummaryActor",
    "_AutoscalingCoordinatorActor",
    "ActorLocationTracker",
    "_UsageCollectionActor",
    "AutoscalingRequester",
}


def ray_leftovers() -> dict[str, str]:
    """What a module may not leave on the session's Ray: live actors and placement groups (id -> what).
    Actors through the GCS table (ray._private.state: the public state API needs the dashboard, which the
    tests' Ray runs without); placement groups through ray.util.placement_group_table."""
    import ray
    import ray._private.state as state

    left = {
        actor_id: f"actor {info.get('ActorClassName')} {info.get('Name') or ''}".strip()
        for actor_id, info in state.actors().items()
        if info["State"] != "DEAD"
        and not (info.get("IsDetached") and info.get("ActorClassName") in RAY_SINGLETONS)
    }
    for group_id, info in ray.util.placement_group_table().items():
        if info["state"] != "REMOVED":
            left[group_id] = f"placement group {info.get('name') or group_id} ({info['state']})"
    return left


def assert_nothing_left(before: dict[str, str], where: str, timeout: float = 60) -> None:
    """Nothing new in ray_leftovers() since `before`, given `timeout` for what is shutting down to go.
    A non-detached actor lives while a handle to it does: a finished run's handles (Ray Train's
    controller, precompute's progress counter) often sit in reference cycles (a trainer, a traceback)
    until the garbage collector runs, as it would in a long-lived driver; it is run first. And Ray Train's
    fit() leaves its SIGINT handler installed, holding the last run's controller (until the next fit()
    replaces it): the default handler is put back first."""
    import gc
    import signal
    import time

    if getattr(signal.getsignal(signal.SIGINT), "__module__", "").startswith("ray.train"):
        signal.signal(signal.SIGINT, signal.default_int_handler)
    deadline = time.monotonic() + timeout
    while True:
        gc.collect()
        new = {k: v for k, v in ray_leftovers().items() if k not in before}
        if not new or time.monotonic() > deadline:
            break
        time.sleep(0.25)
    assert not new, f"{where} left these on the session's Ray: {sorted(new.values())}"


@pytest.fixture(scope="module", autouse=True)
def _ray_left_clean(request):
    """After every module that ran on the session's Ray (through `ray_local`, `built_store`, or a train()
    or precompute() that found it up): no actor or placement group the module created is still there."""
    import sys

    ray = sys.modules.get("ray")  # a module that never imported Ray has nothing to check
    before = ray_leftovers() if ray is not None and ray.is_initialized() else {}
    yield
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        assert_nothing_left(before, request.module.__name__)


@pytest.fixture(scope="module")
def ray_local(request, ray_session):
    """The session's local Ray for a test module (started again if a module before shut it down)."""
    import ray

    if not ray.is_initialized():
        _start_session_ray(request.getfixturevalue("s3_session"))
    return ray


@pytest.fixture(scope="module")
def ray_local_gpu():
    """A fresh local Ray that sees this machine's GPUs (the `gpu` tests); the session's Ray, if up, is
    stopped for it and started again by the next module that asks for it."""
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
    from kto_ray.rundir.metrics import read_metrics as read

    return read(run_dir)


@pytest.fixture(scope="session")
def built_store(tiny_model, small_data, tmp_path_factory, ray_session):
    """One reference store of the small data, shared by the precompute and training tests (read-only).
    Built on the session's Ray, so its cost never depends on which module asks first."""
    from kto_ray.reference.precompute import precompute

    cfg = make_config(tiny_model, small_data, tmp_path_factory.mktemp("built"))
    result = precompute(cfg)
    assert not result.reused
    return cfg, result.store


@pytest.fixture(scope="module")
def s3(s3_session):
    """The session's S3 server (moto) on loopback for the module: its relay connected and forwarding
    everything, a bucket `kto` and nothing in it, its endpoint and fake credentials in the environment."""
    import pyarrow.fs as pafs

    from tests.s3server import ENV

    relay = s3_session.relay
    relay.hold_on, relay.ignore_conditions = None, False
    if relay._listener is None:  # a module before cut it
        relay.restore()
    fs = pafs.S3FileSystem(
        endpoint_override=s3_session.endpoint,
        scheme="http",
        access_key=ENV["AWS_ACCESS_KEY_ID"],
        secret_key=ENV["AWS_SECRET_ACCESS_KEY"],
        region=ENV["AWS_DEFAULT_REGION"],
    )
    s3_session.create_bucket("kto")
    fs.delete_dir_contents("kto", missing_dir_ok=True)
    with pytest.MonkeyPatch.context() as patch:
        for key, value in s3_session.environment().items():
            patch.setenv(key, value)
        yield s3_session
    relay.hold_on, relay.ignore_conditions = None, False
    if relay._listener is None:
        relay.restore()


@pytest.fixture(scope="module")
def ray_with_s3(s3, ray_local):
    """The session's Ray, whose workers were started with the S3 endpoint and credentials."""
    return ray_local


# tests/test_tiers.py collects the whole suite in a subprocess with this set: every test's id, markers
# and fixtures are written to the file it names.
TIERS_DUMP_ENV = "KTO_RAY_TIERS_DUMP"


def pytest_collection_finish(session) -> None:
    target = os.environ.get(TIERS_DUMP_ENV)
    if not target:
        return
    items = [
        {
            "id": item.nodeid,
            "path": Path(item.path).resolve().relative_to(REPO).as_posix(),
            "markers": sorted({mark.name for mark in item.iter_markers()}),
            "fixtures": sorted(getattr(item, "fixturenames", ())),
        }
        for item in session.items
    ]
    Path(target).write_text(json.dumps(items))
