"""Reference pass throughput: `kto_ray.reference.precompute.precompute` vs a naive single-process loop.

Both score the same sequences, (x, y) and the KL pairs (x, y_kl), of a length-skewed dataset with the
same model and model batch size. The naive loop is what one writes first: file order, batches of
`--batch` rows padded to their longest row, a plain transformers forward; it tokenizes with kto-ray's
tokenizer code so both see identical ids. Tokens/s counts real (non-pad) tokens over the end-to-end
wall time of each (reading, tokenizing, model load, forwards, writing; the local Ray is started
beforehand and not counted). Compute is matched: 1 precompute actor with 1 CPU (Ray gives it one
torch thread) vs the naive loop on 1 thread (`--actors 2` compares 2 actors with 2 threads). The naive
loop runs in its own process at the niceness Ray gives its workers (15), like the precompute actors.

    .venv/bin/python bench/precompute_throughput.py [--rows 512] [--batch 16] [--rounds 1] [--smoke]
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import common


def naive_pass(cfg, threads: int) -> tuple[int, int, float]:
    """Real tokens, padded tokens and seconds of a file-order, fixed-batch reference pass (run it in a
    process of its own: it sets the torch thread count)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kto_ray.data.prepare import prepare_text, tokenize_rows

    torch.set_num_threads(threads)
    with common.timed() as wall:
        tokenizer = AutoTokenizer.from_pretrained(cfg.model.path)
        model = AutoModelForCausalLM.from_pretrained(cfg.model.path, dtype=torch.float32).eval()
        text = prepare_text(cfg, tokenizer)
        rows = tokenize_rows(
            text.table.to_pydict(), tokenizer, cfg.data.max_length, cfg.data.max_prompt_length
        )
        batch, real, padded = cfg.precompute.batch_rows, 0, 0
        scores: list[torch.Tensor] = []
        with torch.inference_mode():
            for start in range(0, len(rows["id"]), batch):
                prompts = rows["prompt_ids"][start : start + batch]
                for key in ("completion_ids", "kl_completion_ids"):
                    completions = rows[key][start : start + batch]
                    logps, n_real, n_padded = _score(model, prompts, completions, tokenizer.pad_token_id)
                    scores.append(logps)
                    real, padded = real + n_real, padded + n_padded
    return real, padded, wall[0]


def _score(model, prompts: list[list[int]], completions: list[list[int]], pad_id: int):
    """Summed completion log-probs of one right-padded batch (plain torch), with its token counts."""
    import torch

    width = max(len(p) + len(c) for p, c in zip(prompts, completions))
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attention = torch.zeros_like(ids)
    target = torch.zeros_like(ids, dtype=torch.bool)
    for i, (p, c) in enumerate(zip(prompts, completions)):
        ids[i, : len(p) + len(c)] = torch.tensor(p + c)
        attention[i, : len(p) + len(c)] = 1
        target[i, len(p) : len(p) + len(c)] = True
    logits = model(input_ids=ids, attention_mask=attention).logits[:, :-1].float()
    token_logps = logits.log_softmax(-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    logps = (token_logps * target[:, 1:]).sum(-1)
    return logps, int(attention.sum()), ids.numel()


def kto_ray_pass(cfg, name: str) -> tuple[int, float]:
    from kto_ray.reference.precompute import precompute

    cfg = cfg.model_copy(deep=True)
    cfg.store.path = str(Path(cfg.store.path).with_name(name))
    with common.timed() as wall:
        store = precompute(cfg).store
    return store.manifest.tokens, wall[0]


def main() -> None:
    spec = common.SPECS[args.model]
    model = common.build_model(spec)
    data = common.write_dataset("skewed", args.rows)
    root = common.scratch_dir("bench-pre-")
    cfg = common.bench_config(
        model,
        data,
        root,
        precompute={
            "actors": args.actors,
            "cpus_per_actor": 1.0,
            "batch_rows": args.batch,
            "bucket_rows": args.bucket_rows,
        },
    )
    print(f"machine: {common.machine_line()}")
    print(f"model {spec.name}: {common.count_parameters(model):,} parameters")
    print(f"skewed data: {common.length_summary(data)}")
    common.ray_init()
    table, ours, naive = [], [], []
    for r in range(args.rounds):
        tokens, seconds = kto_ray_pass(cfg, f"store-{r}")
        ours.append(tokens / seconds)
        table.append(
            [f"kto-ray precompute #{r + 1}", f"{args.actors} actor(s) x 1 CPU", tokens, seconds, ours[-1], ""]
        )
        real, padded, seconds = common.run_like_a_worker(naive_pass, cfg, args.actors)
        naive.append(real / seconds)
        table.append(
            [
                f"naive loop #{r + 1}",
                f"{args.actors} thread(s)",
                real,
                seconds,
                naive[-1],
                f"{padded / real:.2f}",
            ]
        )
    common.print_table(
        ["run", "compute", "real tokens", "wall s", "tokens/s", "padded/real"],
        table,
        title=(
            f"reference pass over {args.rows} skewed rows ((x, y) and (x, y_kl) each), "
            f"model batch {args.batch} rows, precompute bucket_rows {args.bucket_rows}"
        ),
    )
    ratio = statistics.mean(ours) / statistics.mean(naive)
    print(f"kto-ray precompute / naive loop tokens/s: {ratio:.2f}x (target >= 1.3x)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=512)
    parser.add_argument("--batch", type=int, default=16, help="model batch rows (precompute.batch_rows)")
    parser.add_argument("--bucket-rows", type=int, default=512, help="precompute.bucket_rows")
    parser.add_argument("--actors", type=int, default=1, choices=(1, 2))
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--model", default="small", choices=sorted(common.SPECS))
    smoke = {"rows": 64, "batch": 8, "bucket_rows": 64, "rounds": 1, "model": "tiny"}
    args = common.parse_args(parser, smoke)
    main()
