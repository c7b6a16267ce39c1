"""A real two-node Ray cluster on this machine (tests/nodes.py), used as a cluster user does: jobs go
in through `ray job submit`, the reference store and the run dirs live on an S3 server (moto's, on
loopback), the two training workers are placed one per node (STRICT_SPREAD), and the second node is
lost mid-run: replaced (a fixed group of 2 waits for it), or not (an elastic group of 1-2 goes on with
one worker, then grows to two when a node joins)."""

from __future__ import annotations

import contextlib
import json
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import psutil
import pyarrow.fs as pafs
import pytest
import torch
from safetensors.torch import load as load_safetensors

from kto_ray.rundir.worker_groups import parse_groups
from kto_ray.storage import info, read_text, resolve
from kto_ray.tools.report import write_report
from tests.conftest import REPO, assert_same_tensors, read_metrics, registered_steps
from tests.nodes import BIN, Cluster, ray_cluster

pytestmark = pytest.mark.extended  # the second tier: tests/test_tiers.py

BUCKET = "kto"
STORE = f"s3://{BUCKET}/stores/multinode"
STEPS = 12
CHECKPOINT_EVERY = 4
SLOT = {"slot": 1}  # one per node: an elastic group counts one worker per node by it
# Right after a loss Ray still counts the lost node, so the elastic group first tries its old size and
# gives up after this (60 s by default; Ray Train passes RAY_TRAIN_* from the driver to its controller).
QUICK_RETRY = {"RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "15"}


def run_root(tmp: Path) -> str:
    """Where a test's runs go (`run.dir`). Every read below goes through kto_ray.storage, so this may
    as well be a local folder: `str(tmp / "runs")`."""
    return f"s3://{BUCKET}/{tmp.name}/runs"


@pytest.fixture(scope="module")
def cluster(s3, tmp_path_factory):  # s3: tests/conftest.py, bucket `kto`
    """head (2 CPUs: the job driver, Ray Data, one training worker) + node2 (1 CPU: one worker). The
    nodes' Ray logs are kept in the pytest temp dir `ray-logs*`."""
    logs = tmp_path_factory.mktemp("ray-logs")
    with ray_cluster(head_cpus=2, extra_env=s3.environment(), logs_dir=logs, head_resources=SLOT) as cluster:
        cluster.add_node("node2", num_cpus=1, resources=SLOT)
        yield cluster


@dataclass
class Job:
    """A `ray job submit` running in the background, its client's output in a file."""

    cluster: Cluster
    submission_id: str
    process: subprocess.Popen
    log: Path

    def running(self) -> bool:
        return self.process.poll() is None

    def wait(self, timeout: float = 600) -> str:
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.cluster.ray("job", "stop", "--address", self.cluster.address, self.submission_id)
            raise
        output = self.log.read_text()
        assert self.process.returncode == 0, output[-6000:]
        assert "succeeded" in output, output[-6000:]
        return output

    def train_worker_nodes(self) -> list[str]:
        """The node ids the job's Ray Train workers ran on, dead ones included (state API)."""
        jobs = self.cluster.ray("list", "jobs", "--address", self.cluster.address, "--format", "json")
        assert jobs.returncode == 0, jobs.stderr
        job_id = next(
            j["job_id"] for j in json.loads(jobs.stdout) if j["submission_id"] == self.submission_id
        )
        return self.cluster.actor_nodes("RayTrainWorker", job_id)


def submit(cluster: Cluster, script: str, log: Path, env: dict[str, str] | None = None, **overrides) -> Job:
    """`ray job submit` of jobs/`script` with `--set` overrides; `env`: the job's extra environment."""
    sets = [arg for key, value in overrides.items() for arg in ("--set", f"{key}={value}")]
    runtime_env = ["--runtime-env-json", json.dumps({"env_vars": env})] if env else []
    submission_id = f"kto-{uuid.uuid4().hex[:8]}"
    with log.open("w") as out:
        process = subprocess.Popen(
            [BIN / "ray", "job", "submit", "--address", cluster.address, "--submission-id", submission_id,
             *runtime_env, "--working-dir", str(REPO), "--", "python", f"jobs/{script}", "--config",
             "configs/demo.yaml", *sets],
            env=cluster.env, stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    return Job(cluster, submission_id, process, log)


def overrides(tiny_model: Path, small_data: Path, root: str, name: str, **extra) -> dict:
    """The run both tests train: 2 workers of 1 CPU, one per node; store on S3."""
    return {
        "model.path": tiny_model,
        "data.paths": json.dumps([str(small_data)]),
        "store.path": STORE,
        "run.dir": root,
        "run.name": name,
        "train.max_steps": STEPS,
        "train.micro_batch_size": 4,
        "train.log_every": 1,
        "cluster.workers": 2,
        "cluster.cpus_per_worker": 1,
        "cluster.placement_strategy": "STRICT_SPREAD",
        "run.checkpoint_every": CHECKPOINT_EVERY,
    } | extra


def _read(uri: str, *parts: str) -> str | None:
    return read_text(resolve(uri).join(*parts))


def _steps(run: str) -> list[int]:
    return [record["step"] for record in read_metrics(run)]


def _weights(run: str) -> dict[str, torch.Tensor]:
    location = resolve(run).join("final", "model.safetensors")
    with location.fs.open_input_stream(location.path) as stream:
        return load_safetensors(stream.read())


def _wait_for(condition, job: Job, what: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert job.running(), f"the job ended before {what}: " + job.log.read_text()[-4000:]
        assert time.monotonic() < deadline, f"waited {timeout:.0f} s for {what}"
        time.sleep(0.2)


@pytest.fixture(scope="module")
def steady(cluster, tiny_model, small_data, tmp_path_factory):
    """The pipeline job (precompute to S3, train, evaluate), uninterrupted: test A checks it, test B
    compares its weights with a run that lost a node."""
    tmp = tmp_path_factory.mktemp("multinode")
    run = f"{run_root(tmp).rstrip('/')}/steady"
    job = submit(
        cluster,
        "pipeline.py",
        tmp / "steady.log",
        **overrides(tiny_model, small_data, run_root(tmp), "steady"),
    )
    return job, job.wait(), run


def test_pipeline_job_trains_one_worker_per_node(steady, cluster, tmp_path):
    job, output, run = steady
    assert "held-out eval split" in output  # the job's own output reached the submitter
    manifest = json.loads(_read(STORE, "manifest.json"))
    assert sum(manifest["counts"]["train"].values()) > 0
    assert _steps(run) == list(range(1, STEPS + 1))
    registered = registered_steps(run)
    assert (
        registered
        and registered[-1] == STEPS
        and set(registered) <= set(range(0, STEPS + 1, CHECKPOINT_EVERY))
    )
    assert info(resolve(run).join("final", "model.safetensors")).type == pafs.FileType.File
    # One worker per node: as Ray's state API saw them, as the run dir records them, as the report shows.
    names = cluster.node_ids()
    assert sorted(names[node] for node in job.train_worker_nodes()) == ["head", "node2"]
    (group,) = parse_groups(_read(run, "workers.json"))
    workers = group.workers
    assert (group.start_step, group.world_size) == (0, 2)
    assert sorted(w["rank"] for w in workers) == [0, 1]
    assert sorted(names[w["node_id"]] for w in workers) == ["head", "node2"]
    summary = write_report(run, tmp_path / "report").summary.read_text()
    assert "## Workers (2 ranks on 2 nodes)" in summary
    assert all(w["node_id"][:12] in summary for w in workers)


def test_lost_node_is_replaced_and_the_run_matches(steady, cluster, tiny_model, small_data, tmp_path):
    steady_run = steady[2]
    run = f"{run_root(tmp_path).rstrip('/')}/lost"
    job = submit(
        cluster, "train_kto.py", tmp_path / "lost.log",
        **overrides(tiny_model, small_data, run_root(tmp_path), "lost",
                    **{"run.max_failures": 1, "run.checkpoint_every": 2}),
    )  # fmt: skip
    # (Checkpoints every 2 steps: the first comes early, so the node is lost well before the run ends.)
    # Lose the node once Ray Train registered a checkpoint and a later step was logged: the work after
    # the checkpoint is lost with it and must be redone, once.
    _wait_for(
        lambda: registered_steps(run) and _steps(run)[-1:] > [max(registered_steps(run))],
        job,
        "a registered checkpoint and a step after it",
    )
    resume_step, before = max(registered_steps(run)), read_metrics(run)
    assert resume_step < STEPS, "the run finished before the node could be lost"
    assert cluster.nodes["node2"].processes_titled("RayTrainWorker"), "no training worker on node2"
    lost_id = next(i for i, name in cluster.alive_nodes().items() if name == "node2")
    killed_at = time.monotonic()
    cluster.kill_node("node2")
    cluster.add_node("node2", num_cpus=1, resources=SLOT)  # a replacement joins
    joined_in = time.monotonic() - killed_at
    job.wait()
    finished_in = time.monotonic() - killed_at

    # Recovered in the same job, from the checkpoint: the steps up to it were not redone, and every
    # step is logged exactly once.
    assert _steps(run) == list(range(1, STEPS + 1))
    assert read_metrics(run)[:resume_step] == before[:resume_step]
    # Two worker groups, one worker per node each: the second on the head and on the new node2.
    names, nodes = cluster.node_ids(), job.train_worker_nodes()
    assert sorted(names[node] for node in nodes) == ["head", "head", "node2", "node2"], nodes
    assert len(set(nodes)) == 3 and lost_id in nodes, nodes
    groups = parse_groups(_read(run, "workers.json"))
    # The second resumed from the last checkpoint registered: resume_step's, or one reported just
    # before the kill and registered after it.
    assert [g.world_size for g in groups] == [2, 2] and groups[0].start_step == 0
    assert resume_step <= groups[1].start_step < STEPS
    workers = groups[-1].workers  # the last attempt's
    assert sorted(names[w["node_id"]] for w in workers) == ["head", "node2"]
    assert lost_id not in {w["node_id"] for w in workers}
    assert_same_tensors(_weights(run), _weights(steady_run))
    print(
        f"node2 lost after step {resume_step}'s checkpoint; a new node2 joined {joined_in:.0f} s and the "
        f"job finished {finished_in:.0f} s later"
    )


def _elastic(tiny_model: Path, small_data: Path, root: str, name: str) -> dict:
    """The same run as an elastic group of 1-2 workers, one per node (each node has one `slot`)."""
    return overrides(
        tiny_model, small_data, root, name,
        **{"cluster.workers": "[1, 2]", "cluster.worker_resources": json.dumps(SLOT),
           "cluster.resize_interval_s": 2, "run.max_failures": 3, "run.checkpoint_every": 2},
    )  # fmt: skip


def _groups(run: str) -> list:
    return parse_groups(_read(run, "workers.json"))


def _step_times(records: list[dict], first: int, last: int) -> str:
    times = sorted(r["step_time"] for r in records if first <= r["step"] <= last)
    return f"{times[len(times) // 2]:.2f} s" if times else "-"


def test_elastic_group_goes_on_without_the_lost_node_then_grows(
    steady, cluster, tiny_model, small_data, tmp_path
):
    """cluster.workers [1, 2], one worker per node. node2's whole process tree is killed after a
    checkpoint and no node replaces it: the group goes on with the head's worker alone, from that
    checkpoint (reshaped from 2 workers to 1). Once that group has checkpointed, node2 joins again and
    the group grows back to two at the next resize check (every 2 s here), again from its checkpoint
    (reshaped from 1 to 2). Every step once, the same weights as the uninterrupted 2-worker run. The
    one worker is held (SIGSTOP) from the join until the grown group starts, so that the check comes
    before the run ends even on an idle machine; that is all the hold does."""
    if "node2" not in cluster.nodes:
        cluster.add_node("node2", num_cpus=1, resources=SLOT)
    run = f"{run_root(tmp_path).rstrip('/')}/elastic"
    job = submit(
        cluster, "train_kto.py", tmp_path / "elastic.log", env=QUICK_RETRY,
        **_elastic(tiny_model, small_data, run_root(tmp_path), "elastic"),
    )  # fmt: skip
    _wait_for(
        lambda: registered_steps(run) and _steps(run)[-1:] > [max(registered_steps(run))],
        job,
        "a registered checkpoint and a step after it",
    )
    lost_at, before = max(registered_steps(run)), read_metrics(run)
    assert lost_at <= STEPS - 4, "the run went too far before the node could be lost"
    assert [g.world_size for g in _groups(run)] == [2]
    killed_at = time.time()
    cluster.kill_node("node2")  # and not replaced
    # Training again: the step after the checkpoint logged anew, by the 1-worker group.
    _wait_for(
        lambda: len(m := read_metrics(run)) > lost_at and m[lost_at] != before[lost_at],
        job,
        "the first step on the remaining worker",
    )
    training_again = time.time() - killed_at
    _wait_for(lambda: max(registered_steps(run) or [0]) > lost_at, job, "a checkpoint of the 1-worker group")
    held = [psutil.Process(pid) for pid in cluster.head.processes_titled("RayTrainWorker")]
    assert held, "no training worker on the head"
    for proc in held:
        proc.suspend()
    try:
        joined_at = time.time()
        cluster.add_node("node2", num_cpus=1, resources=SLOT)
        _wait_for(lambda: len(_groups(run)) > 2, job, "the group to grow")
    finally:
        for proc in held:
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.resume()
    job.wait()

    assert _steps(run) == list(range(1, STEPS + 1))
    assert read_metrics(run)[:lost_at] == before[:lost_at]
    groups = _groups(run)
    grown_at = groups[-1].start_step
    assert [(g.start_step, g.world_size) for g in groups] == [(0, 2), (lost_at, 1), (grown_at, 2)]
    assert lost_at < grown_at < STEPS
    names = cluster.node_ids()
    assert [names[w["node_id"]] for w in groups[1].workers] == ["head"]
    assert sorted(names[w["node_id"]] for w in groups[2].workers) == ["head", "node2"]
    assert_same_tensors(_weights(run), _weights(steady[2]))
    summary = write_report(run, tmp_path / "report").summary.read_text()
    assert f"| 1 | 0 | 1-{lost_at} | 2 | 2 |" in summary
    assert f"| 2 | {lost_at} | {lost_at + 1}-{grown_at} | 1 | 1 |" in summary
    assert f"| 3 | {grown_at} | {grown_at + 1}-{STEPS} | 2 | 2 |" in summary
    records = read_metrics(run)
    print(
        f"elastic: node2 lost after step {lost_at}'s checkpoint; the 1-worker group started "
        f"{groups[1].started_at - killed_at:.1f} s and trained its first step {training_again:.1f} s after "
        f"the loss; node2 joined again after step {grown_at}'s checkpoint and the 2-worker group started "
        f"{groups[2].started_at - joined_at:.1f} s after the join began (the held worker's stop included); "
        f"median step time {_step_times(records, 2, lost_at)} on 2 workers, "
        f"{_step_times(records, lost_at + 2, grown_at)} on 1, "
        f"{_step_times(records, grown_at + 2, STEPS)} on 2"
    )
