"""cluster.yaml is a valid Ray launcher config whose GPU nodes can hold every real-model config."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml

from kto_ray.config import load_config

REPO = Path(__file__).resolve().parents[1]
REAL_CONFIGS = ["llama3-8b.yaml", "qwen2.5-32b.yaml"]


@pytest.fixture(scope="module")
def cluster() -> dict:
    return yaml.safe_load((REPO / "cluster.yaml").read_text())


def gpu_node_type(cluster: dict) -> dict:
    types = cluster["available_node_types"]
    gpu = [t for name, t in types.items() if name != cluster["head_node_type"] and t["resources"].get("GPU")]
    assert len(gpu) == 1, "one GPU worker node type"
    return gpu[0]


def test_launcher_keys(cluster):
    for key in ("cluster_name", "provider", "available_node_types", "head_node_type", "max_workers"):
        assert key in cluster, key
    assert cluster["head_node_type"] in cluster["available_node_types"]
    assert cluster["provider"]["type"]
    assert cluster["setup_commands"], "nodes must install kto-ray"
    assert any("pip install" in cmd and "kto-ray" in cmd for cmd in cluster["setup_commands"])
    assert any("/mnt/shared" in cmd for cmd in cluster["setup_commands"]), "shared storage mount"


def test_matches_rays_launcher_schema(cluster):
    import jsonschema
    import ray.autoscaler

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(cluster, schema)


def test_head_takes_no_training_work(cluster):
    head = cluster["available_node_types"][cluster["head_node_type"]]
    assert head["resources"].get("CPU") == 0 and not head["resources"].get("GPU")


def pack(count: int, per_unit: dict[str, float], node: dict[str, float]) -> int:
    """Nodes needed for `count` identical resource requests, packed per node."""
    per_node = min(math.floor(node.get(k, 0) / v) for k, v in per_unit.items() if v > 0)
    assert per_node >= 1, f"one request {per_unit} does not fit a node {node}"
    return math.ceil(count / per_node)


@pytest.mark.parametrize("name", REAL_CONFIGS)
def test_gpu_nodes_hold_the_config(cluster, name):
    cfg = load_config(REPO / "configs" / name)
    gpu_type = gpu_node_type(cluster)
    node = gpu_type["resources"]
    limit = min(cluster["max_workers"], gpu_type.get("max_workers", cluster["max_workers"]))
    train_nodes = pack(cfg.cluster.workers, {"CPU": cfg.cluster.cpus_per_worker, "GPU": 1}, node)
    assert train_nodes <= limit, f"{name}: training needs {train_nodes} GPU nodes, cluster allows {limit}"
    # Ray Train's trainer actor and Ray Data tasks need a CPU left beside the workers on some node.
    per_node = min(node["GPU"], node["CPU"] // cfg.cluster.cpus_per_worker)
    assert node["CPU"] - min(per_node, cfg.cluster.workers) * cfg.cluster.cpus_per_worker >= 1
    pre = {"CPU": cfg.precompute.cpus_per_actor, "GPU": cfg.precompute.gpus_per_actor}
    assert pack(cfg.precompute.actors, pre, node) <= limit, f"{name}: precompute actors do not fit"
