"""Every test is in exactly one tier, by marker, and the tier its rule below says.

The tiers (README, Makefile):
- `make test` (`-m "not extended and not gpu"`): what a developer runs before every commit, everything that
  guards correctness, exactness and the one-line errors (24 minutes on 2 idle cores; the target is 20).
- `make test-extended` (`-m "extended and not gpu"`): what is slow by nature. CI (.ci/run) runs both.
- `make test-gpu` (`-m gpu`): the CUDA tests, which skip elsewhere.

The rule (this file is where it lives; change it here, with the marks):
1. A test is `extended` exactly when it is in EXTENDED below: a whole module (the multi-node and elastic
   cluster, the sweep), a test id prefix (each bench smoke but the two shortest; a run that re-proves on a
   second configuration what a first-tier test proves on the same code path, named with that test; an
   end-to-end run whose value is its figures or its environment, with a shorter one in the first tier), or
   the model-zoo families beyond the one the first tier keeps. Both ways: a test matching EXTENDED without
   the marker fails, and so does an `extended` test that EXTENDED does not name, so nothing leaves `make
   test` unnoticed.
2. `slow` only splits the first tier (`make test-fast` skips it); on an `extended` test it changes nothing.
3. A first-tier test that uses the session's Ray (one of RAY_FIXTURES) is `slow` (or `gpu`): `make
   test-fast` never waits on a cluster.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from functools import cache
from pathlib import Path

from tests.conftest import REPO, TIERS_DUMP_ENV

EXTENDED_MODULES = {
    "tests/integration/test_multinode.py",  # real multi-node clusters: node loss, elastic, reshape
    "tests/sweep/test_run.py",  # a Ray Tune sweep of several trials
    # checkpoint damage: trained runs killed, damaged and rerun (test_verify.py covers the checks alone)
    "tests/training/resume/test_checkpoint_integrity.py",
    "tests/training/resume/test_checkpoint_integrity_s3.py",
}
EXTENDED_IDS = (
    # Each bench's --smoke run: prints its table; the figures are BENCHMARKS.md's, the code paths the
    # first tier's own tests. logprob_memory and integrity (well under 20 s, no Ray) stay in the first.
    *(
        f"tests/test_bench.py::test_bench_smoke_runs_and_prints_its_table[{name}]"
        for name in (
            "trl_compare",
            "roofline",
            "zero_stage",
            "loss_kind",
            "offline_vs_online",
            "lora_vs_full",
            "worker_memory",
            "profile_train",
            "precompute_throughput",
            "append_cost",
            "fixed_costs",
            "engine_overhead",
            "reshape",
            "gpu_mfu",
            "packing",
            "token_budget",
            "evaluate_memory",
        )
    ),
    # The long-row guard, bench/long_rows.py's one run in the suite: an 8-step training run on skewed data
    # timed against a plain replay of its batches (test_denormals.py's first-tier tests check the flushing).
    "tests/models/test_denormals.py::test_long_row_steps_cost_what_their_shape_costs",
    # An end-to-end product run whose value is its figures and its environment, each part run shorter in
    # the first tier: the demo's 168 steps, its learning figures and its console off a terminal (one run
    # of its 3,000 rows; in the first tier, test_console.py runs `kto-ray pipeline` on a terminal,
    # test_answers.py the answer scoring, test_eval_step.py and test_train.py the numbers).
    "tests/tools/test_demo.py::test_demo_learns_and_prints_plain_lines_off_a_terminal",
)
# The model zoo's families but the first tier's one (gemma3: a soft-capped head, sliding windows); MoE with
# its aux loss is the first tier's tests/training/test_moe_train.py.
ZOO_MODULE, ZOO_FIRST_TIER = "tests/integration/test_zoo.py", "[gemma3]"
RAY_FIXTURES = {"ray_local", "ray_with_s3", "ray_session", "ray_local_gpu", "built_store"}


@cache
def collected() -> list[dict]:
    """The whole suite's tests as collected (every tier, KTO_RAY_ZOO=all so every zoo family shows)."""
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "tests.json"
        env = dict(os.environ, **{TIERS_DUMP_ENV: str(out), "KTO_RAY_ZOO": "all"})
        done = subprocess.run(
            [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", "tests"],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        return json.loads(out.read_text())


def in_extended(test: dict) -> bool:
    if test["path"] == ZOO_MODULE:
        return not test["id"].endswith(ZOO_FIRST_TIER)
    return test["path"] in EXTENDED_MODULES or test["id"].startswith(EXTENDED_IDS)


def test_the_suite_is_collected_whole():
    paths = {t["path"] for t in collected()}
    assert len(collected()) > 500 and "tests/test_tiers.py" in paths and paths >= EXTENDED_MODULES


def test_extended_is_exactly_what_the_rule_names():
    unmarked = [t["id"] for t in collected() if in_extended(t) and "extended" not in t["markers"]]
    unnamed = [t["id"] for t in collected() if "extended" in t["markers"] and not in_extended(t)]
    assert not unmarked, f"the rule puts these in `extended`; mark them: {unmarked}"
    assert not unnamed, f"marked `extended` but not named in tests/test_tiers.py's rule: {unnamed}"


def test_every_name_in_the_rule_matches_a_test():
    ids = [t["id"] for t in collected()]
    stale = [prefix for prefix in EXTENDED_IDS if not any(i.startswith(prefix) for i in ids)]
    assert not stale, f"EXTENDED names tests that no longer exist: {stale}"


def test_first_tier_tests_that_start_ray_are_slow():
    unmarked = [
        t["id"]
        for t in collected()
        if not {"extended", "slow", "gpu"} & set(t["markers"]) and RAY_FIXTURES & set(t["fixtures"])
    ]
    assert not unmarked, f"these start Ray but are not `slow` (make test-fast would run them): {unmarked}"
