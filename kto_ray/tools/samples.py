"""`kto-ray evaluate --generate N`: the trained model's and the reference's completions of eval prompts,
side by side, in `samples.jsonl` and `samples.md` of the run dir, generated on precompute's actors
(`kto_ray/reference/scoring.py`). The prompts are the store's eval-split token ids, so they are rendered
and truncated exactly as in training; generation stops at `data.max_length` tokens in all.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from kto_ray.config import KTOConfig, with_absolute_paths
from kto_ray.reference.scoring import GenerationSettings, generate_on_actors
from kto_ray.rundir import RunDir


@dataclass(frozen=True)
class Sample:
    id: int
    prompt: str
    label: bool  # the feedback on the store's own completion of this prompt
    reference: str
    trained: str


def write_samples(
    cfg: KTOConfig,
    n: int,
    model_path: str | None = None,
    temperature: float = 0.0,
    seed: int = 0,
) -> tuple[Path, Path]:
    """Generate for the first `n` eval prompts (by id) with the trained model (`model_path`, default the
    run's final/ export, else the policy) and the reference; returns the JSONL and Markdown paths."""
    from kto_ray.models.loading import load_tokenizer
    from kto_ray.store.check import checked_store
    from kto_ray.tools.evaluate import on_the_cluster

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
    with on_the_cluster(cfg):
        completions = {
            role: generate_on_actors(cfg, str(path), part["prompt_ids"], settings)
            for role, path in (("reference", cfg.reference_path), ("trained", trained_path))
        }
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
    out_dir = run_dir.folder or Path(f"{cfg.run.name}-samples").absolute()
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
        lines += [f"## eval row {s.id}", ""]
        for title, text in (("prompt", s.prompt), ("reference", s.reference), ("trained", s.trained)):
            fence = "````" if "```" in text else "```"
            lines += [f"**{title}**", "", f"{fence}\n{text}\n{fence}\n"]
    return "\n".join(lines)
