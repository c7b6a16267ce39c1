"""A real two-node Ray cluster on this machine (tests/nodes.py), used as a cluster user does: jobs go
in through `ray job submit`, the reference store and the run dirs live on an S3 server (moto's, on
loopback), the two training workers are placed one per node (STRICT_SPREAD), and the second node is
lost mid-run."""

from __future__ import annotations

import json
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pyarrow.fs as pafs
import pytest
import torch
from safetensors.torch import load as load_safetensors

from kto_ray.storage import info, read_text, resolve
from kto_ray.tools.report import write_report
from tests.conftest import REPO, assert_same_tensors, read_metrics, registered_steps
from tests.nodes import BIN, Cluster, ray_cluster

pytestmark = pytest.mark.slow

BUCKET = "kto"
STORE = f"s3://{BUCKET}/stores/multinode"
STEPS = 12
CHECKPOINT_EVERY = 4


def run_root(tmp: Path) -> str:
    """Where a test's runs go (`run.dir`). Every read below goes through kto_ray.storage, so this may
    as well be a local folder: `str(tmp / "runs")`."""
    return f"s3://{BUCKET}/{tmp.name}/runs"


@pytest.fixture(scope="module")
def cluster(s3, tmp_path_factory):  # s3: tests/conftest.py, bucket `kto`
    """head (2 CPUs: the job driver, Ray Data, one training worker) + node2 (1 CPU: one worker). The
    nodes' Ray logs are kept in the pytest temp dir `ray-logs*`."""
    logs = tmp_path_factory.mktemp("ray-logs")
    with ray_cluster(head_cpus=2, extra_env=s3.environment(), logs_dir=logs) as cluster:
        cluster.add_node("node2", num_cpus=1)
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


def submit(cluster: Cluster, script: str, log: Path, **overrides) -> Job:
    sets = [arg for key, value in overrides.items() for arg in ("--set", f"{key}={value}")]
    submission_id = f"kto-{uuid.uuid4().hex[:8]}"
    with log.open("w") as out:
        process = subprocess.Popen(
            [BIN / "ray", "job", "submit", "--address", cluster.address, "--submission-id", submission_id,
             "--working-dir", str(REPO), "--", "python", f"jobs/{script}", "--config", "configs/demo.yaml",
             *sets],
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
    workers = json.loads(_read(run, "workers.json"))
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
        **overrides(tiny_model, small_data, run_root(tmp_path), "lost", **{"run.max_failures": 1}),
    )  # fmt: skip
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
    cluster.add_node("node2", num_cpus=1)  # a replacement joins
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
    workers = json.loads(_read(run, "workers.json"))  # the last attempt's
    assert sorted(names[w["node_id"]] for w in workers) == ["head", "node2"]
    assert lost_id not in {w["node_id"] for w in workers}
    assert_same_tensors(_weights(run), _weights(steady_run))
    print(
        f"node2 lost after step {resume_step}'s checkpoint; a new node2 joined {joined_in:.0f} s and the "
        f"job finished {finished_in:.0f} s later"
    )
