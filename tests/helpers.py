"""Helpers shared by the tests and the benchmarks (bench/ imports them as `tests.helpers`): a config built
from configs/demo.yaml, a stand-in for the DeepSpeed engine, a synthetic reference store.

Nothing heavy is imported at module level: a benchmark that only needs a config must not pay for torch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]

# What the tests assume on top of configs/demo.yaml: small precompute buckets (the small data fills a few),
# lambda_D = 1 (the tests' numbers, step-0 loss 0.5 and equal weights across worker counts, assume it;
# the default `auto` would weigh each class by the small data's counts), uniformly drawn steps, padded
# batches (packing's `auto` would pack the ungrouped steps). The defaults (length grouping, packing
# `auto`) run in the demo's tests and in their own (test_batching, test_config, test_train's packed).
# The eval split is a hash per row (about data.eval_fraction: read sizes from the store), and a step of a
# few rows may hold one class only (its margins are then 0).
TEST_DEFAULTS: dict[str, dict[str, Any]] = {
    "model": {"packed_batches": False},
    "precompute": {"bucket_rows": 128},
    "train": {"desirable_weight": 1.0, "group_by_length": False},
}


def make_config(
    model: Path,
    data: Path,
    root: Path,
    /,
    defaults: Mapping[str, Mapping[str, Any]] = TEST_DEFAULTS,
    **sections: Mapping[str, Any],
):
    """configs/demo.yaml with `model`, `data`, and the store and run dir under `root`; then `defaults`
    and then `sections` update their sections key by key, e.g. train={"max_steps": 1}."""
    from kto_ray.config import config_from_dict, load_config

    tree = load_config(REPO / "configs" / "demo.yaml").model_dump(mode="json")
    tree["model"]["path"] = str(model)
    tree["data"]["paths"] = [str(data)]
    tree["store"]["path"] = str(root / "store")
    tree["run"]["dir"] = str(root / "runs")
    for overrides in (defaults, sections):
        for section, values in overrides.items():
            tree[section].update(values)
    return config_from_dict(tree)


class PlainEngine:
    """What kto_ray.training.step.train_step needs of a DeepSpeed engine, on a plain module in this
    process, doing what DeepSpeed does: backward (divided by `accumulation` unless told not to), and at
    every `accumulation`-th `step` (or the one `set_gradient_accumulation_boundary` marks) the gradients
    averaged over the ranks of the process group (when one is initialised), their norm taken (and
    clipped to `max_grad_norm` when given), then an optimizer step. Without an optimizer `step` does
    nothing: the gradients stay for the caller to read."""

    def __init__(
        self, module: Any, optimizer: Any = None, accumulation: int = 1, max_grad_norm: float | None = None
    ):
        self.module, self.optimizer = module, optimizer
        self.accumulation, self.max_grad_norm = accumulation, max_grad_norm
        self.micro_steps, self.norm = 0, None
        self.boundary: bool | None = None  # set_gradient_accumulation_boundary's, over the count

    def set_gradient_accumulation_boundary(self, is_boundary: bool) -> None:
        self.boundary = is_boundary

    def backward(self, loss: Any, scale_wrt_gas: bool = True) -> None:
        (loss / (self.accumulation if scale_wrt_gas else 1)).backward()

    def step(self) -> None:
        import torch
        import torch.distributed as dist

        self.micro_steps += 1
        at_boundary = self.micro_steps % self.accumulation == 0 if self.boundary is None else self.boundary
        if self.optimizer is None or not at_boundary:
            return
        grads = [p.grad for p in self.module.parameters() if p.grad is not None]
        world = dist.get_world_size() if dist.is_initialized() else 1
        for grad in grads:
            if world > 1:
                dist.all_reduce(grad)
            grad /= world
        if self.max_grad_norm is None:
            self.norm = torch.norm(torch.stack([g.norm() for g in grads])).item()
        else:  # the norm before clipping, as DeepSpeed reports it
            params = self.module.parameters()
            self.norm = float(torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def get_global_grad_norm(self) -> float | None:
        return self.norm


def plain_manifest(fingerprint: dict[str, str], counts: dict[str, dict[str, int]], tokens: int):
    """A store manifest of the first layout (no segments, its files listed at commit), as a test writes it."""
    import time

    from kto_ray import __version__
    from kto_ray.store.format import FORMAT_VERSION, Manifest

    return Manifest(
        format_version=FORMAT_VERSION,
        fingerprint=fingerprint,
        fingerprint_inputs={},
        counts=counts,
        tokens=tokens,
        seconds=0.0,
        created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        kto_ray_version=__version__,
    )


def write_store(
    path: str | Path,
    group_sizes: Sequence[int],
    rows_per_file: int,
    seed: int = 0,
    *,
    rows: int | None = None,
    lengths: tuple[tuple[int, int], tuple[int, int], tuple[int, int]] = ((3, 30), (1, 40), (1, 40)),
    vocab: range = range(500),
    train_fraction: float = 0.8,
):
    """A committed reference store of synthetic rows, laid out the way StoreWriter lays one out (files
    under data-<id>/, manifest.json naming it): one Parquet file per entry of `group_sizes` (its row-group
    size), `rows_per_file` rows each (`rows` in all when given: the last file holds what is left), ids
    drawn from three times as many and shuffled across files. Rows: prompt, completion and KL completion
    token lists with lengths in the half-open `lengths` ranges and ids in `vocab`, 60% desirable,
    `train_fraction` of them in the train split, random reference log-probs. Returns the opened Store."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from kto_ray.storage import resolve, write_text_atomically
    from kto_ray.store.format import (
        COMPONENTS,
        MANIFEST,
        SCHEMA,
        WRITE_OPTIONS,
        list_files,
        open_store,
    )

    total = len(group_sizes) * rows_per_file if rows is None else rows
    files = -(-total // rows_per_file)
    if files != len(group_sizes):
        raise ValueError(f"{total} rows make {files} files of {rows_per_file}, not {len(group_sizes)}")
    rng = np.random.default_rng(seed)
    ids = rng.permutation(total * 3)[:total]

    def tokens(n: int, span: tuple[int, int]) -> list[np.ndarray]:
        low, high = span
        return [
            rng.integers(vocab.start, vocab.stop, rng.integers(low, high)).astype(np.int32) for _ in range(n)
        ]

    def table(part: np.ndarray) -> pa.Table:
        n = len(part)
        columns = {
            "id": part,
            "prompt_ids": tokens(n, lengths[0]),
            "completion_ids": tokens(n, lengths[1]),
            "kl_completion_ids": tokens(n, lengths[2]),
            "kl_id": rng.permutation(part),
            "label": rng.random(n) < 0.6,
            "ref_logps": rng.normal(-30, 5, n).astype(np.float32),
            "ref_kl_logps": rng.normal(-40, 5, n).astype(np.float32),
            "split": np.where(rng.random(n) < train_fraction, "train", "eval"),
        }
        return pa.table({f.name: pa.array(columns[f.name], f.type) for f in SCHEMA}, schema=SCHEMA)

    location = resolve(str(path))
    data = location.join("data-test")
    location.fs.create_dir(data.path, recursive=True)
    counts = {split: {"desirable": 0, "undesirable": 0} for split in ("train", "eval")}
    token_count = 0
    for number, (part, group) in enumerate(
        zip(np.split(ids, range(rows_per_file, total, rows_per_file)), group_sizes)
    ):
        written = table(part)
        with location.fs.open_output_stream(data.join(f"part-{number}.parquet").path) as out:
            pq.write_table(written, out, row_group_size=group, **WRITE_OPTIONS)
        for split, label in zip(written["split"].to_pylist(), written["label"].to_pylist()):
            counts[split]["desirable" if label else "undesirable"] += 1
        for column in ("prompt_ids", "completion_ids"):
            token_count += int(pa.compute.sum(pa.compute.list_value_length(written[column])).as_py())
    manifest = plain_manifest({c: "test" for c in COMPONENTS}, counts, token_count)
    files = list_files(location, "data-test")
    text = manifest.model_copy(update={"data_dir": "data-test", "files": files}).model_dump_json()
    write_text_atomically(location.join(MANIFEST), text)
    return open_store(str(path))
