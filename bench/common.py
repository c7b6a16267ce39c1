"""Shared pieces of the benchmarks: models and data built locally, configs, timing, memory, tables.

Everything is deterministic and offline: models are random-initialised Llamas built from a config with
the project's character tokenizer, data is generated arithmetic. Models and data are cached under
artifacts/bench/ (git-ignored); stores and run dirs go to a temporary folder per invocation.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

REPO = Path(__file__).resolve().parents[1]
# The helpers the tests share with the benchmarks (tests/helpers.py). Appended, not prepended: kto_ray
# still comes from PYTHONPATH or the installed package.
if str(REPO) not in sys.path:
    sys.path.append(str(REPO))
from tests.helpers import PlainEngine, make_config, write_store  # noqa: E402

__all__ = ["PlainEngine", "make_config", "write_store"]  # re-exported: the benchmarks use common.X
# Ray's raylet starts its worker processes at nice 15 (its `worker_niceness` default). A loop that is
# compared with Ray workers runs at the same niceness, or on a shared machine the CPU scheduler would
# favour it over them (and over the neighbours they share the cores with).
RAY_WORKER_NICENESS = 15
CACHE = REPO / "artifacts" / "bench"
Skew = Literal["uniform", "skewed"]


# ---------------------------------------------------------------------------------------------- models


@dataclass(frozen=True)
class ModelSpec:
    """A Llama shape; the vocabulary is the character tokenizer's (~90 tokens)."""

    name: str
    hidden: int
    layers: int
    intermediate: int
    heads: int
    kv_heads: int

    def parameters(self, vocab: int) -> int:
        head_dim = self.hidden // self.heads
        attention = 2 * self.hidden * self.hidden + 2 * self.hidden * self.kv_heads * head_dim
        mlp = 3 * self.hidden * self.intermediate
        norms = 2 * self.hidden
        return self.layers * (attention + mlp + norms) + 2 * vocab * self.hidden + self.hidden


# ~7M parameters: big enough that matmuls dominate a step on 2 cores, small enough for many steps.
SMALL = ModelSpec("llama-7m", hidden=320, layers=6, intermediate=864, heads=5, kv_heads=5)
# ~21M parameters: the TRL comparison's larger option (--model medium).
MEDIUM = ModelSpec("llama-21m", hidden=512, layers=7, intermediate=1376, heads=8, kv_heads=8)
# ~60k parameters: the smoke runs (`--smoke`), which check a benchmark's code path, not its figures.
TINY = ModelSpec("llama-tiny", hidden=32, layers=1, intermediate=64, heads=2, kv_heads=2)
SPECS = {"tiny": TINY, "small": SMALL, "medium": MEDIUM}


def build_model(spec: ModelSpec, seed: int = 0, noise: float = 0.0, tag: str = "") -> Path:
    """A random-initialised LlamaForCausalLM of `spec` with the char tokenizer, saved once (cached).

    `noise` > 0 adds seeded Gaussian noise (relative to each tensor's std) to every weight: a policy
    that differs from the reference, for loss-equivalence checks.
    """
    out = CACHE / f"{spec.name}-s{seed}{tag}"
    if (out / "model.safetensors").is_file():
        return out
    import torch
    from transformers import LlamaForCausalLM

    from kto_ray.assets.tiny_model import build_tokenizer, llama_config

    tokenizer = build_tokenizer()
    config = llama_config(
        tokenizer,
        hidden=spec.hidden,
        intermediate=spec.intermediate,
        layers=spec.layers,
        heads=spec.heads,
        kv_heads=spec.kv_heads,
        max_positions=1024,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    if noise > 0:
        generator = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for param in model.parameters():
                scale = noise * float(param.std()) if param.numel() > 1 else noise
                param.add_(torch.randn(param.shape, generator=generator) * scale)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(tmp, out)
    except OSError:  # another benchmark built it meanwhile (a folder is not replaced when not empty)
        if not (out / "model.safetensors").is_file():
            raise
        import shutil

        shutil.rmtree(tmp)
    return out


def count_parameters(model_dir: Path) -> int:
    from safetensors import safe_open

    with safe_open(str(model_dir / "model.safetensors"), "pt") as f:
        return sum(int(_numel(f.get_slice(k).get_shape())) for k in f.keys())  # noqa: SIM118


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


# ------------------------------------------------------------------------------------------------ data


def _terms(rng: random.Random, skew: Skew) -> int:
    """How many numbers a problem adds: fixed (uniform) or long-tailed (most short, a few very long)."""
    if skew == "uniform":
        return 7
    # Pareto(alpha=1.3): most problems have 2-3 numbers, a few close to the cap (26 numbers, ~480
    # characters: prompt + completion stay under max_length 512, so nothing is truncated).
    return min(2 + int(rng.paretovariate(1.3) - 1) * 2, 26)


def arithmetic_rows(n: int, seed: int, skew: Skew) -> list[dict[str, Any]]:
    """`n` rows with distinct prompts: "add these numbers" and a worked running sum, right or wrong.

    Completion length grows with the number of terms: ~100 characters each at 7 terms (uniform); the
    skewed set has a mean of the same order but a long tail (p50 ~50, max ~480 characters).
    Half the rows are desirable (right final sum), half not (off by a small amount).
    """
    rng = random.Random(seed)
    rows, seen = [], set()
    while len(rows) < n:
        k = _terms(rng, skew)
        numbers = [rng.randint(2, 99) for _ in range(k)]
        prompt = "Add these numbers: " + " + ".join(map(str, numbers)) + "?\n"
        if prompt in seen:
            continue
        seen.add(prompt)
        total, steps = numbers[0], []
        for x in numbers[1:]:
            steps.append(f"{total}+{x}={total + x}")
            total += x
        label = len(rows) % 2 == 0
        answer = total if label else total + rng.choice((-1, 1)) * rng.randint(1, 9)
        work = ", ".join(steps) if steps else str(total)
        rows.append({"prompt": prompt, "completion": f"{work}. Answer: {answer}.", "label": label})
    rng.shuffle(rows)
    return rows


def write_dataset(skew: Skew, n: int, seed: int = 0) -> Path:
    path = CACHE / f"data-{skew}-{n}-s{seed}.jsonl"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in arithmetic_rows(n, seed, skew)))
        os.replace(tmp, path)
    return path


def length_summary(path: Path) -> str:
    """Characters of prompt + completion (= tokens - 2 with the char tokenizer): p50 / mean / p99 / max."""
    lengths = sorted(
        len(r["prompt"]) + len(r["completion"]) for r in map(json.loads, path.read_text().splitlines())
    )
    p = lengths[len(lengths) // 2], lengths[min(len(lengths) - 1, int(0.99 * len(lengths)))]
    return f"p50 {p[0]}, mean {statistics.mean(lengths):.0f}, p99 {p[1]}, max {lengths[-1]} chars"


# --------------------------------------------------------------------------------------------- configs


def scratch_dir(prefix: str) -> Path:
    """A temporary folder for stores and run dirs, removed when the benchmark exits (kept when the
    environment sets KTO_BENCH_KEEP=1, to look at metrics.jsonl and checkpoints afterwards)."""
    import atexit
    import shutil
    import tempfile

    path = Path(tempfile.mkdtemp(prefix=prefix))
    if os.environ.get("KTO_BENCH_KEEP") != "1":
        atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


# What every benchmark run sets on top of configs/demo.yaml: room for the longest generated rows, no eval
# split, no checkpoint but the final one (not part of the figures), no export, no step logs, a constant lr,
# and the settings the recorded figures ran under before the defaults changed (2026-12-03): uniformly
# drawn steps and padded batches; a bench that measures length grouping or packing sets its own.
BENCH_DEFAULTS: dict[str, dict[str, Any]] = {
    "model": {"packed_batches": False},
    "data": {"max_length": 512, "max_prompt_length": 256, "eval_fraction": 0.0},
    "run": {"checkpoint_every": 10**6, "export": False},
    "train": {"log_every": 10**6, "warmup_ratio": 0.0, "schedule": "constant", "group_by_length": False},
}


def bench_config(model: Path, data: Path, root: Path, /, **sections: dict[str, Any]):
    """tests.helpers.make_config (configs/demo.yaml with the model, data and paths replaced) with the
    benchmarks' defaults instead of the tests'; `sections` override them key by key."""
    return make_config(model, data, root, defaults=BENCH_DEFAULTS, **sections)


_smoke = False  # set by parse_args: this process is a --smoke run


def shared_store(model: Path, data: Path) -> dict[str, str]:
    """A store section under artifacts/bench/stores/: benchmarks that only train reuse one store
    (precompute reuses a store whose fingerprint matches and rebuilds nothing). Smoke runs start several
    benches at once (tests/test_bench.py), and a store has one writer at a time (its lease): each
    bench's smoke run has its own."""
    folder = CACHE / "stores" / (f"smoke-{Path(sys.argv[0]).stem}" if _smoke else "")
    return {"path": str(folder / f"{model.name}-{data.stem}")}


def alternating_runs(
    model: Path,
    data: Path,
    root: Path,
    variants: dict[str, dict[str, Any]],
    rounds: int,
    skip: int,
    **sections,
) -> tuple[list[list[Any]], dict[str, list[float]]]:
    """Train each variant (config sections over `sections`) in turn, `rounds` times, in this process's
    Ray: on a shared machine, alternating keeps the load they meet alike. Returns the table rows (run,
    samples/s, median s/step) and each variant's steady-state samples/s per round."""
    from kto_ray.reference.precompute import precompute
    from kto_ray.training.launch.driver import train

    table, rates = [], {name: [] for name in variants}
    for r in range(rounds):
        for name, overrides in variants.items():
            merged = {key: sections.get(key, {}) | overrides.get(key, {}) for key in {*sections, *overrides}}
            merged["run"] = merged.get("run", {}) | {"name": f"{name}-{r}".replace(" ", "_")}
            cfg = bench_config(model, data, root, store=shared_store(model, data), **merged)
            precompute(cfg)
            steady = steady_state(read_metrics(train(cfg).run_dir.local_path), skip)
            rates[name].append(steady.samples_per_s)
            table.append([f"{name} #{r + 1}", steady.samples_per_s, statistics.median(steady.step_times)])
    return table, rates


def two_variant_bench(
    args: argparse.Namespace, prefix: str, label: str, variants: dict[str, dict[str, Any]]
) -> None:
    """The body of a two-setting benchmark (zero_stage, loss_kind): `args.model`, uniform data, 2
    workers x 0.5 CPU, global batch `args.batch`; `args.rounds` alternations of the two variants, a table
    and the second's samples/s over the first's."""
    spec = SPECS[args.model]
    model = build_model(spec)
    data = write_dataset("uniform", args.steps * args.batch + args.batch)
    root = scratch_dir(prefix)
    print(f"machine: {machine_line()}")
    print(f"model {spec.name}: {count_parameters(model):,} parameters")
    ray_init()
    table, rates = alternating_runs(
        model,
        data,
        root,
        variants,
        args.rounds,
        args.skip,
        cluster={"workers": 2, "cpus_per_worker": 0.5},
        train={"max_steps": args.steps, "micro_batch_size": args.batch // 2},
    )
    print_table(
        [label, "samples/s", "median s/step"],
        table,
        title=f"2 workers, {spec.name}, global batch {args.batch}, steps {args.skip + 1}-{args.steps}",
    )
    first, second = variants
    ratio = statistics.mean(rates[second]) / statistics.mean(rates[first])
    print(f"{second} / {first} samples/s: {ratio:.2f}x")


def at_worker_niceness() -> None:
    """Lower this process's priority to that of Ray's workers (call before torch starts threads)."""
    os.nice(RAY_WORKER_NICENESS - os.nice(0))


def run_like_a_worker(fn: Any, *args: Any) -> Any:
    """fn(*args) in a fresh (spawned) process at Ray's worker niceness; returns its result. `fn` must be
    importable (module level in a script file); a child that cannot start raises, it is not retried."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(1, mp_context=context, initializer=at_worker_niceness) as pool:
        return pool.submit(fn, *args).result()


def ray_init(**options: Any) -> None:
    """One local Ray per benchmark process: 2 CPUs, no dashboard, workers' logs kept off the table.
    Started as kto_ray.raycluster starts one: Ray Train's placement-group cleaner must not find another
    Ray on this host (tests or benchmarks running beside us) and remove our group."""
    import ray

    from kto_ray.raycluster import no_state_api_lookup

    if not ray.is_initialized():
        with no_state_api_lookup():
            ray.init(
                **{"address": "local", "num_cpus": 2, "include_dashboard": False, "log_to_driver": False}
                | options
            )


def parse_args(parser: argparse.ArgumentParser, smoke: dict[str, Any]) -> argparse.Namespace:
    """`parser`'s arguments and `--smoke`, whose `smoke` values replace the parsed ones: the smallest run
    through the benchmark's real code path, seconds long, that prints its tables (tests/test_bench.py
    runs it). Its figures mean nothing."""
    parser.add_argument("--smoke", action="store_true", help="a few seconds through the real code path")
    global _smoke
    args = parser.parse_args()
    if args.smoke:
        vars(args).update(smoke)
        _smoke = True
    return args


# -------------------------------------------------------------------------------------- metrics/timing


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """The run's metrics records through kto-ray's own reader."""
    from kto_ray.rundir.metrics import read_metrics as read

    return read(run_dir)


@dataclass(frozen=True)
class Steady:
    """Steady-state throughput: totals over the steps after the first `skip` (warm-up) ones."""

    steps: int
    rows: int
    tokens: int
    seconds: float
    step_times: tuple[float, ...] = ()

    @property
    def samples_per_s(self) -> float:
        return self.rows / self.seconds

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds


def steady_state(metrics: list[dict[str, Any]], skip: int) -> Steady:
    kept = metrics[skip:] if len(metrics) > skip else metrics[-1:]
    return Steady(
        steps=len(kept),
        rows=sum(int(m["rows"]) for m in kept),
        tokens=sum(int(m["tokens"]) for m in kept),
        seconds=sum(float(m["step_time"]) for m in kept),
        step_times=tuple(float(m["step_time"]) for m in kept),
    )


@contextmanager
def timed() -> Iterator[list[float]]:
    """`with timed() as t: ...` then t[0] is the wall time in seconds."""
    out: list[float] = []
    start = time.perf_counter()
    try:
        yield out
    finally:
        out.append(time.perf_counter() - start)


def status_kib(pid: int | str, keys: tuple[str, ...]) -> dict[str, int]:
    """Fields of /proc/<pid>/status (VmRSS, VmHWM, RssAnon, ...) in KiB; 0 for those not found."""
    found = dict.fromkeys(keys, 0)
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key = line.split(":", 1)[0]
            if key in found:
                found[key] = int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return found


def marked_descendants(marker: str):
    """This process's descendants whose command line holds `marker` (Ray titles an actor's process
    "ray::RayTrainWorker..."); ones that exit meanwhile are skipped."""
    import psutil

    try:
        children = psutil.Process().children(recursive=True)
    except psutil.Error:
        return
    for child in children:
        try:
            title = " ".join(child.cmdline())
        except psutil.Error:
            continue
        if marker in title:
            yield child


@dataclass
class PeakMemory:
    """Samples VmRSS of this process's descendants whose title contains `marker` (Ray sets
    "ray::RayTrainWorker") every `interval` seconds and keeps the highest value per process.

    Sampled current RSS, not VmHWM: Ray may start an actor in a pooled worker process that ran other
    work before, whose high-water mark is not this run's. Only descendants count: other Ray clusters
    on the machine (tests running beside us) are ignored.
    """

    marker: str = "RayTrainWorker"
    interval: float = 0.25
    peaks: dict[int, Any] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)

    def _poll(self) -> None:
        while not self._stop.is_set():
            for child in marked_descendants(self.marker):
                self._sample(child)
            self._stop.wait(self.interval)

    def _sample(self, child) -> None:
        rss = status_kib(child.pid, ("VmRSS",))["VmRSS"]
        self.peaks[child.pid] = max(self.peaks.get(child.pid, 0), rss)

    def __enter__(self) -> PeakMemory:
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def max_mib(self) -> float:
        return max(self.peaks.values(), default=0) / 1024


def self_peak_mib() -> float:
    """Peak RSS of this process so far (VmHWM), MiB."""
    return status_kib(os.getpid(), ("VmHWM",))["VmHWM"] / 1024


# ----------------------------------------------------------------------------------------------- output


def print_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], title: str = "") -> None:
    """A Markdown table (pastes straight into BENCHMARKS.md)."""
    cells = [[_fmt(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    if title:
        print(f"\n{title}\n")
    print("| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in cells:
        print("| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |")
    print(flush=True)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:,.3g}" if abs(value) < 100 else f"{value:,.0f}"
    return str(value)


def cpu_model() -> str:
    """The CPU's model name (its cost for subnormal floats, among others, differs by vendor and part)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


def machine_line() -> str:
    import torch

    load = os.getloadavg()[0]
    return (
        f"{os.cpu_count()} cores ({cpu_model()}), torch {torch.__version__}, {torch.get_num_threads()} "
        f"threads here, load average {load:.1f} at start"
    )


VERSIONED = ("python", "torch", "ray", "deepspeed", "transformers", "trl", "accelerate", "pyarrow")


def versions_line() -> str:
    """The versions of the packages a figure depends on, as installed (BENCHMARKS.md records them)."""
    from importlib.metadata import PackageNotFoundError, version

    found = []
    for name in VERSIONED:
        if name == "python":
            found.append(f"python {sys.version.split()[0]}")
            continue
        try:
            found.append(f"{name} {version(name)}")
        except PackageNotFoundError:
            continue
    return ", ".join(found)
