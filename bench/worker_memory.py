"""Peak RSS of the training workers, measured from outside, against what `kto-ray plan` predicts.

A random-initialised Qwen2-shaped model (untied head, 151,936-token vocabulary by default; the embedded
character tokenizer's ids are far below it) is saved once under artifacts/bench/, then trained for
`--steps` steps on 2 CPU workers under ZeRO-3 (fp32, as on CPU), in full fine-tuning and with LoRA, on a
synthetic store of rows that fill max_length (8 prompt + 120 completion tokens: near the planner's worst
case, max_length x micro-batch tokens, all of them scored). Every RayTrainWorker process's VmRSS and
RssAnon are sampled every 0.1 s (a descendant of this process: other helpers' Rays are not seen); "load"
is the peak before rank 0's first step record appears in metrics.jsonl (loading, zero.Init, DeepSpeed's
optimizer set-up and the first step, which allocates Adam's moments), "steady" the peak after it. The
plan column is `kto-ray plan`'s per-worker total for the same config (CPU workers: no GPU allowance).

    .venv/bin/python bench/worker_memory.py [--hidden 896 --layers 24 --intermediate 4864] [--modes full lora]
    .venv/bin/python bench/worker_memory.py --smoke
"""

from __future__ import annotations

import argparse
import os
import threading
import time
from pathlib import Path
from typing import Any

import common

WORKERS, MICRO_BATCH, ROWS = 2, 4, 512
# Rows of max_length with short prompts: the micro-batch's tokens and its completion tokens (the
# log-prob chunk's) both near the planner's worst case (max_length x micro-batch).
MAX_LENGTH, PROMPT = 128, 8
# The machine is shared: below this much MemAvailable the guard kills the workers (the run then fails
# with Ray's actor-died error) before the kernel's OOM killer picks a neighbour's process instead.
GUARD_MIB = 2048


def available_mib() -> float:
    """MemAvailable of /proc/meminfo, MiB."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 1024
    return float("inf")


def build_qwen2(hidden: int, layers: int, intermediate: int, heads: int, kv_heads: int, vocab: int) -> Path:
    """A random Qwen2ForCausalLM with an untied head and the character tokenizer, saved once (fp32)."""
    out = common.CACHE / f"qwen2-h{hidden}-l{layers}-i{intermediate}-v{vocab}"
    if (out / "config.json").is_file():
        return out
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from kto_ray.assets.tiny_model import build_tokenizer

    tokenizer = build_tokenizer()
    config = Qwen2Config(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    del model
    os.replace(tmp, out)
    return out


class Timeline:
    """Samples VmRSS / RssAnon of every RayTrainWorker descendant and when metrics.jsonl gets its first
    record; peaks before ("load") and after ("steady") that moment, per worker, in MiB."""

    def __init__(self, metrics: Path, interval: float = 0.1):
        self.metrics, self.interval = metrics, interval
        self.samples: list[tuple[float, int, int, int]] = []  # (t, pid, VmRSS KiB, RssAnon KiB)
        self.first_step: float | None = None
        self.guard_tripped = False
        self._stop = threading.Event()

    def _poll(self) -> None:
        while not self._stop.is_set():
            now = time.perf_counter()
            if self.first_step is None and self.metrics.is_file() and self.metrics.stat().st_size > 0:
                self.first_step = now
            workers = list(common.marked_descendants("RayTrainWorker"))
            for child in workers:
                kib = common.status_kib(child.pid, ("VmRSS", "RssAnon"))
                self.samples.append((now, child.pid, kib["VmRSS"], kib["RssAnon"]))
            if available_mib() < GUARD_MIB:
                self.guard_tripped = True
                for child in workers:  # our own workers only (descendants of this process)
                    child.kill()
            self._stop.wait(self.interval)

    def __enter__(self) -> Timeline:
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def peaks(self) -> dict[str, float]:
        """Max over workers of each phase's peak VmRSS and RssAnon, MiB."""
        split = self.first_step if self.first_step is not None else float("inf")
        out = {}
        for phase, keep in (("load", lambda t: t < split), ("steady", lambda t: t >= split)):
            rss = [r for t, _p, r, _a in self.samples if keep(t)]
            anon = [a for t, _p, _r, a in self.samples if keep(t)]
            out[f"{phase}_rss"] = max(rss, default=0) / 1024
            out[f"{phase}_anon"] = max(anon, default=0) / 1024
        return out


def run(model: Path, root: Path, mode: str, steps: int, release: bool) -> dict[str, Any]:
    from kto_ray.assets.tiny_model import ALPHABET, SPECIAL_TOKENS
    from kto_ray.objective import desirable_weight
    from kto_ray.planning.plan import GIB, plan
    from kto_ray.rundir import RunDir
    from kto_ray.store.format import open_store
    from kto_ray.store.reader import SplitIndex
    from kto_ray.training.launch.driver import fit, row_labels

    store_path = root / "store"
    if not store_path.exists():
        characters = range(len(SPECIAL_TOKENS), len(SPECIAL_TOKENS) + len(ALPHABET))
        full = (PROMPT, PROMPT + 1), (MAX_LENGTH - PROMPT, MAX_LENGTH - PROMPT + 1)
        common.write_store(
            store_path, [256], ROWS, seed=ROWS, lengths=(*full, full[1]), vocab=characters, train_fraction=0.9
        )
    cfg = common.bench_config(
        model,
        common.REPO / "data" / "arithmetic.jsonl",
        root,
        store={"path": str(store_path)},
        data={"max_length": MAX_LENGTH, "max_prompt_length": 64, "eval_fraction": 0.0},
        run={"dir": str(root / "runs"), "name": mode},
        cluster={"workers": WORKERS, "address": None, "release_host_memory": release},
        train={"micro_batch_size": MICRO_BATCH, "max_steps": steps},
        lora={"enabled": mode == "lora"},
        deepspeed={"stage": 3},
    )
    predicted = plan(cfg)
    rows = SplitIndex.build(open_store(store_path), "train")
    lam_d = desirable_weight(cfg, row_labels(rows), warn=False)
    with Timeline(RunDir.of(cfg).local_path / "metrics.jsonl") as timeline:
        try:
            fit(cfg, rows, steps, lam_d)
        except Exception:
            if timeline.guard_tripped:
                raise SystemExit(f"{mode}: stopped, MemAvailable fell under {GUARD_MIB} MiB") from None
            raise
    return timeline.peaks() | {
        "plan": predicted.setting(predicted.configured).gpu_total / GIB * 1024,
        "params": predicted.arch.total_params,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--hidden", type=int, default=896)
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--intermediate", type=int, default=4864)
    parser.add_argument("--heads", type=int, default=14)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--modes", nargs="+", default=["full", "lora"], choices=["full", "lora"])
    parser.add_argument(
        "--release-host-memory", action="store_true", help="cluster.release_host_memory on (as in section 12)"
    )
    # One mode: LoRA runs the same measuring code, and tests/training/test_lora.py trains it.
    smoke = dict(
        hidden=64, layers=2, intermediate=128, heads=2, kv_heads=1, vocab=4096, steps=2, modes=["full"]
    )
    args = common.parse_args(parser, smoke)
    model = build_qwen2(args.hidden, args.layers, args.intermediate, args.heads, args.kv_heads, args.vocab)
    root = common.scratch_dir("worker-memory-")
    results = {mode: run(model, root, mode, args.steps, args.release_host_memory) for mode in args.modes}
    params = next(iter(results.values()))["params"]
    rows = [
        [
            mode,
            f"{r['load_rss']:.0f} / {r['load_anon']:.0f}",
            f"{r['steady_rss']:.0f} / {r['steady_anon']:.0f}",
            f"{r['plan']:.0f}",
            f"{r['plan'] / max(r['load_rss'], r['steady_rss']):.2f}",
        ]
        for mode, r in results.items()
    ]
    common.print_table(
        ["mode", "load peak MiB (RSS / anon)", "steady peak MiB (RSS / anon)", "plan MiB", "plan / peak"],
        rows,
        f"worker memory: Qwen2-shaped {params / 1e6:.0f}M params (hidden {args.hidden}, {args.layers} "
        f"layers, vocab {args.vocab}, untied), {WORKERS} CPU workers, ZeRO-3 fp32, micro-batch "
        f"{MICRO_BATCH}, {args.steps} steps; {common.machine_line()}",
    )


if __name__ == "__main__":
    main()
