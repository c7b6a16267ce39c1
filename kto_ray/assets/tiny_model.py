"""Embedded defaults for the demo and tests: arithmetic feedback data, a local tokenizer, a tiny Llama.

Everything here is built offline and deterministically, so the demo never touches the network:

    python -m kto_ray.assets data                              # data/arithmetic*.jsonl, byte-identical
    python -m kto_ray.assets model --out artifacts/tiny-llama  # tokenizer + warmed-up LlamaForCausalLM
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import string
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from kto_ray.assets.arithmetic import DATA_FILES, generate_arithmetic, write_default_data

if TYPE_CHECKING:  # heavy imports stay lazy: `data` needs neither torch nor transformers
    from transformers import PreTrainedModel, PreTrainedTokenizerFast

DEFAULT_DATA = Path("data/arithmetic.jsonl")
DEFAULT_MODEL_DIR = Path("artifacts/tiny-llama")
# ~40 s of one CPU core: learns the ~70 facts of the data (0.89 greedy accuracy when warmed up on
# desirable rows only), so the reference knows the answers and only its mixed behaviour is wrong.
DEFAULT_WARMUP_STEPS = 1200
WARMUP_BATCH, WARMUP_LR = 16, 3e-3  # batch 32 costs twice the CPU for the same reference quality

SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<pad>")  # ids 0..3, Llama order plus a real pad token
ALPHABET = " \n" + string.digits + string.ascii_letters + ".,?!:;'\"-+*=()/%$&"
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}{{ 'System: ' + message['content'] + '\\n' }}"
    "{%- elif message['role'] == 'user' -%}{{ 'User: ' + message['content'] + '\\n' }}"
    "{%- elif message['role'] == 'assistant' -%}{{ 'Assistant: ' + message['content'] + eos_token }}"
    "{%- else -%}{{ raise_exception('unknown role: ' + message['role']) }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    # The generation prompt is exactly the prefix an assistant turn starts with.
    "{%- if add_generation_prompt -%}{{ 'Assistant: ' }}{%- endif -%}"
)


def build_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level fast tokenizer over ALPHABET: tiny vocabulary, exact round-trip, no training."""
    from tokenizers import Tokenizer, decoders, models, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate([*SPECIAL_TOKENS, *ALPHABET])}
    # BPE without merges = one token per character; unknown characters become <unk>.
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>", fuse_unk=True))
    backend.add_special_tokens(list(SPECIAL_TOKENS))
    backend.decoder = decoders.Fuse()  # concatenate characters back, no spaces inserted
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s>:1 $B:1", special_tokens=[("<s>", vocab["<s>"])]
    )
    # Not passing add_bos_token: transformers 5 would rebuild the post-processor from it, and it does not
    # save it either; tokenizer.json's post-processor is what survives a save/load round-trip.
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        clean_up_tokenization_spaces=False,  # would turn "95 ." into "95." and break round-trips
        model_max_length=512,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def _is_complete(model_dir: Path) -> bool:
    return (model_dir / "config.json").is_file() and (model_dir / "model.safetensors").is_file()


def _free_cores() -> int:
    """Cores not already busy: on a shared box, more threads than idle cores makes each step far slower."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(cores, cores - round(os.getloadavg()[0])))


def _warmup_rows(data_path: str | Path) -> list[dict]:
    """Every row, desirable or not: the reference imitates the data, mistakes included; the labels,
    which the warm-up ignores, are what KTO learns from."""
    path = Path(data_path)
    if path.is_file():
        with open(path, encoding="utf-8") as f:
            rows = [json.loads(line) for line in f if line.strip()]
    elif path == DEFAULT_DATA:  # same rows as the committed file, so a fresh checkout works from anywhere
        _, n, seed, fraction = DATA_FILES[0]
        rows = generate_arithmetic(n, seed, fraction)
    else:
        raise FileNotFoundError(f"warm-up data not found: {path}")
    if not rows:
        raise ValueError(f"no rows to warm up on in {path}")
    return rows


def _sft_batches(
    examples: list[tuple[list[int], list[int]]], batch_size: int, pad_id: int, rng: random.Random
) -> Iterator[dict]:
    """Endless right-padded batches of similar lengths (sorted, then chunked): far less padding."""
    import torch

    ordered = sorted(examples, key=lambda e: len(e[0]))
    chunks = [ordered[i : i + batch_size] for i in range(0, len(ordered), batch_size)]
    while True:
        rng.shuffle(chunks)
        for chunk in chunks:
            width = max(len(ids) for ids, _ in chunk)
            yield {
                "input_ids": torch.tensor([ids + [pad_id] * (width - len(ids)) for ids, _ in chunk]),
                "attention_mask": torch.tensor([[1] * len(i) + [0] * (width - len(i)) for i, _ in chunk]),
                "labels": torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in chunk]),
            }


def _warm_up(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast, rows: list[dict], steps: int, seed: int
) -> list[float]:
    """Supervised warm-up (AdamW, loss on completion tokens); returns the loss of every step."""
    import torch

    optimizer = torch.optim.AdamW(model.parameters(), lr=WARMUP_LR, weight_decay=0.0)
    ramp = max(1, steps // 10)  # linear warmup, then linear decay to 10%: stable at a high peak lr
    sched = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min((s + 1) / ramp, 1 - 0.9 * s / max(1, steps))
    )
    examples = []  # ids of <s> prompt completion </s>, and labels: -100 on BOS and prompt, loss on the answer
    for row in rows:
        prompt = tokenizer(row["prompt"])["input_ids"]  # the post-processor prepends <s>
        completion = [
            *tokenizer(row["completion"], add_special_tokens=False)["input_ids"],
            tokenizer.eos_token_id,
        ]
        examples.append((prompt + completion, [-100] * len(prompt) + completion))
    batches = _sft_batches(examples, WARMUP_BATCH, tokenizer.pad_token_id, random.Random(seed))
    losses: list[float] = []
    model.train()
    for _ in range(steps):
        loss = model(**next(batches)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        sched.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    model.eval()
    return losses


def _save_atomically(model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast, out: Path) -> None:
    """save_pretrained into a temp sibling, then rename: a crash never leaves a complete-looking folder."""
    from transformers.utils import logging as hf_logging

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # transformers 5 prints a shard-writing bar even for one tiny file
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        for path in (tmp, *tmp.iterdir()):  # mkdtemp (and the safetensors writer) leave owner-only modes
            path.chmod(0o755 if path.is_dir() else 0o644)
        if out.exists():  # force, or a folder left half-written by something else
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            out.rename(old)
            shutil.rmtree(old)
        try:
            os.replace(tmp, out)
        except OSError:
            if not _is_complete(out):  # otherwise a concurrent builder won the race: keep theirs
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if bars:
            hf_logging.enable_progress_bar()


def llama_config(
    tokenizer: PreTrainedTokenizerFast,
    *,
    hidden: int,
    intermediate: int,
    layers: int,
    heads: int,
    kv_heads: int,
    max_positions: int,
):
    """An fp32 Llama config (untied embeddings) sized to `tokenizer`'s vocabulary and special ids."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=max_positions,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        dtype="float32",
    )


def build_tiny_model(
    out_dir: str | Path,
    data_path: str | Path = DEFAULT_DATA,
    *,
    warmup_steps: int = DEFAULT_WARMUP_STEPS,
    seed: int = 0,
    force: bool = False,
) -> Path:
    """Build a ~100k-parameter LlamaForCausalLM with a short SFT warm-up on all rows of the data.

    The warm-up teaches the facts and both answer styles, right and mistaken: an improvable reference.
    Written atomically; a no-op when `out_dir` already holds config.json and model.safetensors.
    """
    out = Path(out_dir)
    if _is_complete(out) and not force:
        return out

    import torch
    from transformers import LlamaForCausalLM

    start = time.perf_counter()
    tokenizer = build_tokenizer()
    config = llama_config(
        tokenizer, hidden=64, intermediate=176, layers=2, heads=4, kv_heads=2, max_positions=512
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(_free_cores())
    try:
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
        losses = _warm_up(model, tokenizer, _warmup_rows(data_path), warmup_steps, seed)
    finally:
        torch.set_num_threads(threads)  # leave the caller's process (pytest, a Ray worker) as it was
    _save_atomically(model, tokenizer, out)

    final = sum(losses[-10:]) / len(losses[-10:]) if losses else float("nan")
    print(
        f"tiny-llama: {sum(p.numel() for p in model.parameters()):,} parameters, {warmup_steps} warm-up "
        f"steps, final loss {final:.3f}, {time.perf_counter() - start:.1f} s -> {out}"
    )
    return out


def ensure_tiny_model(out_dir: str | Path = DEFAULT_MODEL_DIR) -> Path:
    """The demo's default model folder, built on first use."""
    return build_tiny_model(out_dir)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kto_ray.assets", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    data = sub.add_parser("data", help="regenerate the arithmetic .jsonl files")
    data.add_argument("--out-dir", default="data")
    model = sub.add_parser("model", help="build the tiny Llama reference model and its tokenizer")
    model.add_argument("--out", default=str(DEFAULT_MODEL_DIR))
    model.add_argument("--data", default=str(DEFAULT_DATA), help="warm-up data (all rows, labels ignored)")
    model.add_argument("--steps", type=int, default=DEFAULT_WARMUP_STEPS, help="warm-up optimizer steps")
    model.add_argument("--seed", type=int, default=0)
    model.add_argument("--force", action="store_true", help="rebuild even if the folder is complete")
    args = parser.parse_args(argv)

    if args.command == "data":
        for path in write_default_data(args.out_dir):
            print(f"wrote {path}")
    else:
        build_tiny_model(args.out, args.data, warmup_steps=args.steps, seed=args.seed, force=args.force)
    return 0
