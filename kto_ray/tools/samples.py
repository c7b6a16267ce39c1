"""`kto-ray evaluate --generate N`: the trained model's and the reference's completions of eval prompts,
side by side, in `samples.jsonl` and `samples.md` of the run dir. Generation runs in the calling process,
batched, on its GPU when it has one (bf16), else on its CPU; not on the training workers.

The prompts are the store's eval-split token ids, so they are rendered (chat template with the
generation prompt) and truncated (the last `data.max_prompt_length` tokens) exactly as in training;
generation stops at `data.max_length` tokens in all, the longest sequence training saw.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from kto_ray.config import KTOConfig, with_absolute_paths
from kto_ray.rundir import RunDir


@dataclass(frozen=True)
class Sample:
    id: int
    prompt: str
    label: bool  # the feedback on the store's own completion of this prompt
    reference: str
    trained: str


@dataclass(frozen=True)
class GenerationSettings:
    max_new_tokens: int
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int = 0
    batch_size: int = 32


def generate_from_ids(
    model, tokenizer, prompts: Sequence[Sequence[int]], settings: GenerationSettings
) -> list[str]:
    """Completions (decoded, special tokens dropped) of tokenized prompts, batched with left padding so
    every row continues from its own last prompt token; seeded when sampling."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    sampling = settings.temperature > 0
    options = {"do_sample": sampling}
    if sampling:
        options |= {"temperature": settings.temperature, "top_p": settings.top_p}
    if sampling:
        torch.manual_seed(settings.seed)
    out: list[str] = []
    with torch.inference_mode():
        for start in range(0, len(prompts), settings.batch_size):
            rows = [list(p) for p in prompts[start : start + settings.batch_size]]
            width = max(len(r) for r in rows)
            device = model.get_input_embeddings().weight.device
            input_ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], device=device)
            mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=device)
            new = model.generate(
                input_ids=input_ids,
                attention_mask=mask,
                max_new_tokens=settings.max_new_tokens,
                pad_token_id=pad,
                eos_token_id=tokenizer.eos_token_id,
                **options,
            )[:, width:]
            out.extend(tokenizer.decode(tokens, skip_special_tokens=True) for tokens in new)
    return out


def write_samples(
    cfg: KTOConfig,
    n: int,
    model_path: str | None = None,
    temperature: float = 0.0,
    seed: int = 0,
    out_dir: Path | None = None,
) -> tuple[Path, Path]:
    """Generate for the first `n` eval prompts (by id) with the trained model (`model_path`, default the
    run's final/ export, else the policy) and the reference; returns the JSONL and Markdown paths."""
    from kto_ray.models.loading import load_causal_lm, load_tokenizer, resolve_dtype
    from kto_ray.reference.check import checked_store

    cfg = with_absolute_paths(cfg)
    tokenizer = load_tokenizer(cfg.model)
    part = checked_store(cfg, tokenizer).read_split("eval", columns=["id", "prompt_ids", "label"])
    part = part.slice(0, n).to_pydict()
    run_dir = RunDir.of(cfg)
    trained_path = model_path or (run_dir.child("final") if run_dir.exists("final") else cfg.model.path)
    longest_prompt = max((len(p) for p in part["prompt_ids"]), default=0)
    settings = GenerationSettings(
        max_new_tokens=max(1, cfg.data.max_length - longest_prompt), temperature=temperature, seed=seed
    )
    completions = {}
    on_gpu = torch.cuda.is_available()  # one GPU when the calling machine has one, else this CPU
    for role, path in (("reference", cfg.reference_path), ("trained", trained_path)):
        model = load_causal_lm(cfg.model, resolve_dtype("auto", on_gpu), path)
        model = model.to("cuda" if on_gpu else "cpu").eval()
        completions[role] = generate_from_ids(model, tokenizer, part["prompt_ids"], settings)
        del model
    samples = [
        Sample(
            id=int(row_id),
            prompt=tokenizer.decode(ids, skip_special_tokens=False),
            label=bool(label),
            reference=completions["reference"][i],
            trained=completions["trained"][i],
        )
        for i, (row_id, ids, label) in enumerate(zip(part["id"], part["prompt_ids"], part["label"]))
    ]
    # A run on object storage: the samples are written here, in ./<run name>-samples.
    out_dir = out_dir or run_dir.folder or Path(f"{cfg.run.name}-samples").absolute()
    out_dir.mkdir(parents=True, exist_ok=True)
    jsonl, markdown = out_dir / "samples.jsonl", out_dir / "samples.md"
    jsonl.write_text("".join(json.dumps(asdict(s)) + "\n" for s in samples))
    how = "greedy" if temperature <= 0 else f"sampled (temperature {temperature}, seed {seed})"
    markdown.write_text(_markdown(samples, reference=cfg.reference_path, trained=trained_path, how=how))
    return jsonl, markdown


def _markdown(samples: Sequence[Sample], *, reference: str, trained: str, how: str) -> str:
    lines = [
        f"# Samples: {len(samples)} eval prompts, {how}",
        "",
        f"- reference: `{reference}`",
        f"- trained: `{trained}`",
        "",
    ]
    for s in samples:
        lines += [
            f"## eval row {s.id}",
            "",
            "**prompt**",
            "",
            _fence(s.prompt),
            "**reference**",
            "",
            _fence(s.reference),
            "**trained**",
            "",
            _fence(s.trained),
        ]
    return "\n".join(lines)


def _fence(text: str) -> str:
    fence = "````" if "```" in text else "```"
    return f"{fence}\n{text}\n{fence}\n"
