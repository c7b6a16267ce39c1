"""Every benchmark in bench/ still runs: its `--smoke` mode (the smallest model, data and steps through the
script's real code path) as a subprocess exits 0 and prints its table.

The smoke runs mostly wait on process and Ray start-up, not on the CPU, so they run a few at a time: the
first test of the module starts every selected bench (slowest first, `SMOKE_PARALLEL` at once) and each
test waits for its own (KTO_BENCH_SMOKE_PARALLEL sets how many at once). All but the two shortest are in
the second tier (`extended`, `make test-extended`): each starts at least one local Ray and takes ~7 minutes
in all; the code paths they print tables for are the first tier's own tests.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import pytest

from tests.helpers import REPO

SMOKE_PARALLEL = int(os.environ.get("KTO_BENCH_SMOKE_PARALLEL", "3"))
SMOKE_TIMEOUT_S = 600


@dataclass(frozen=True)
class Smoke:
    expected: tuple[str, ...]  # lines of its table (a title, a header or a row label) it must print
    needs: str = ""  # "cuda" or a module to import; skipped without it


# In the order they start: the longest first.
BENCHES: dict[str, Smoke] = {
    "trl_compare": Smoke(
        (
            "same computation on one batch",
            "| kto-ray, 2 worker(s)",
            "| TRL, 2 thread(s)",
        ),
        "trl",
    ),
    "roofline": Smoke(("| kto-ray, 1 worker(s)", "| same step, plain torch")),
    "zero_stage": Smoke(("| ZeRO-3 #1", "| ZeRO-2 #1", "ZeRO-2 / ZeRO-3 samples/s")),
    "loss_kind": Smoke(("| kto #1", "| apo_zero_unpaired #1", "apo_zero_unpaired / kto samples/s")),
    "offline_vs_online": Smoke(("| offline #1", "| online #1", "offline/online samples/s")),
    "lora_vs_full": Smoke(("| full #1", "| lora #1", "lora/full samples/s")),
    "worker_memory": Smoke(("| mode ", "| full ")),
    "profile_train": Smoke(("| function (inclusive)", "| function (leaf)")),
    "precompute_throughput": Smoke(("| kto-ray precompute #1", "| naive loop #1")),
    "append_cost": Smoke(("| full precompute #1", "| append of the new rows #1", "append / full precompute")),
    "fixed_costs": Smoke(
        ("kto-ray precompute", "| Ray Data pass: tokenize, score, write", "| rank 0: first step")
    ),
    "engine_overhead": Smoke(("| engine", "| 3  ")),
    "reshape": Smoke(("reshape 2 -> 1 ranks, ZeRO-3", "| checkpoint GiB")),
    "gpu_mfu": Smoke(("| parameters", "precompute: 1 actor"), "cuda"),
    "logprob_memory": Smoke(
        ("| full logits", "| chunked, 64 tokens", "soft-capped head (Gemma 3, cap 30): policy")
    ),
    "packing": Smoke(("| reference pass (precompute's batches)", "| training, random micro-batches")),
    "integrity": Smoke(("| verified |", "| unverified |", "| verified columns |", "| file list |")),
    "token_budget": Smoke(("| fixed, 2 rows x 2", "| budget, 128 tokens", "budget / fixed samples/s")),
    "evaluate_memory": Smoke(("| code ", "| this checkout")),
}
# Run in full by another test, which checks its table too: a smoke run would only repeat it.
RUN_ELSEWHERE = {"long_rows": "tests/models/test_denormals.py (the long-row step guard)"}
FAST = {"logprob_memory", "integrity"}  # well under 20 s alone; every other one is `extended`


def missing(need: str) -> str | None:
    if need == "cuda":
        import torch

        return None if torch.cuda.is_available() else "needs CUDA"
    if need and importlib.util.find_spec(need) is None:
        return f"needs {need} (`pip install -e '.[dev]'` installs it)"
    return None


@dataclass(frozen=True)
class Ran:
    code: int
    output: str
    seconds: float


def run_smoke(name: str) -> Ran:
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    )
    env.pop("KTO_BENCH_KEEP", None)
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, f"bench/{name}.py", "--smoke"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=SMOKE_TIMEOUT_S,
    )
    return Ran(done.returncode, done.stdout + done.stderr, time.perf_counter() - started)


@pytest.fixture(scope="module")
def smoke_runs(request):
    """The selected benches' smoke runs, started together (a few at a time) on first use."""
    selected = {
        item.callspec.params["bench"]
        for item in request.session.items
        if item.module is request.module and hasattr(item, "callspec")
    }
    runnable = [name for name in BENCHES if name in selected and not missing(BENCHES[name].needs)]
    pool = ThreadPoolExecutor(max(1, SMOKE_PARALLEL))
    futures: dict[str, Future[Ran]] = {name: pool.submit(run_smoke, name) for name in runnable}
    yield futures
    pool.shutdown(wait=True, cancel_futures=True)
    timings = ", ".join(
        f"{n} {f.result().seconds:.0f}s" for n, f in futures.items() if f.done() and not f.exception()
    )
    print(f"\nbench smoke runs ({SMOKE_PARALLEL} at a time): {timings}")


def _param(name: str):
    marks = [] if name in FAST else [pytest.mark.extended]
    if BENCHES[name].needs == "cuda":
        marks.append(pytest.mark.gpu)
    return pytest.param(name, marks=marks, id=name)


@pytest.mark.parametrize("bench", [_param(name) for name in BENCHES])
def test_bench_smoke_runs_and_prints_its_table(bench, smoke_runs):
    if reason := missing(BENCHES[bench].needs):
        pytest.skip(reason)
    ran = smoke_runs[bench].result()
    assert ran.code == 0, f"bench/{bench}.py --smoke exited {ran.code}:\n{ran.output[-4000:]}"
    absent = [line for line in BENCHES[bench].expected if line not in ran.output]
    assert not absent, f"bench/{bench}.py --smoke did not print {absent}:\n{ran.output[-4000:]}"


def test_every_bench_script_has_a_smoke_test():
    scripts = {p.stem for p in (REPO / "bench").glob("*.py")} - {"common", *RUN_ELSEWHERE}
    assert scripts <= set(BENCHES), f"bench scripts without a smoke test: {sorted(scripts - set(BENCHES))}"
