"""Model work on the cluster's actors: summed log-probs of (x, y) and (x, y_kl) pairs, and generation.

One Ray Data actor stage, sized by `precompute` (`actors`, `gpus_per_actor`, `cpus_per_actor`, `dtype`,
`batch_rows`, `batch_tokens`), runs every model pass outside training: the reference's log-probs into
the store (`ReferenceLogprobs`, precompute), a trained model's log-probs of the eval split
(`PolicyLogprobs`, `kto-ray evaluate`, the pipeline and the demo), and completions of prompts
(`Completions`, `evaluate --generate` and the demo's answer check). The calling process (a job's
driver) never loads model weights: a 32B evaluate needs what a 32B precompute needs, on the workers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from kto_ray.config import KTOConfig, ModelConfig
from kto_ray.console import configure_ray_data
from kto_ray.models.denormals import flush_denormals
from kto_ray.models.loading import load_causal_lm, load_tokenizer, resolve_dtype
from kto_ray.models.logprobs import length_buckets, pad_sequences, sequence_logps
from kto_ray.models.packing import pack_sequences
from kto_ray.store.format import SCHEMA

# Share of each GPU the spread model's weights may take: the rest holds one model batch's activations
# and logits (kto-ray plan sizes them) and the CUDA context.
SPREAD_WEIGHTS_SHARE = 0.8


def reference_placement(gpus_per_actor: float, gpu_bytes: list[int]) -> dict[str, Any]:
    """from_pretrained arguments that place an actor's model: nothing (one device, moved there after
    loading) for up to one GPU; above that, spread over the actor's GPUs (Ray makes exactly those
    visible) by accelerate's balanced device_map, each capped so a batch still fits beside it."""
    if gpus_per_actor <= 1:
        return {}
    gpus = int(gpus_per_actor)
    if len(gpu_bytes) < gpus:
        raise RuntimeError(f"precompute actor asked for {gpus} GPUs but sees {len(gpu_bytes)}")
    return {
        "device_map": "balanced",
        "max_memory": {i: int(gpu_bytes[i] * SPREAD_WEIGHTS_SHARE) for i in range(gpus)},
    }


@dataclass(frozen=True)
class ActorModel:
    """Which model an actor loads and how: everything its constructor needs, one small object."""

    model_cfg: ModelConfig
    path: str
    dtype: str
    gpus_per_actor: float
    batch_rows: int
    batch_tokens: int | None
    pad_id: int

    @classmethod
    def of(cls, cfg: KTOConfig, path: str, pad_id: int) -> ActorModel:
        p = cfg.precompute
        return cls(cfg.model, path, p.dtype, p.gpus_per_actor, p.batch_rows, p.batch_tokens, pad_id)


class _ActorWithModel:
    """Loads `spec`'s model once per actor, on the actor's GPUs (spread over several when it has them)
    or its CPU, in inference mode."""

    def __init__(self, spec: ActorModel):
        flush_denormals()  # kto_ray/models/denormals.py
        use_gpu = spec.gpus_per_actor > 0
        gpus = range(torch.cuda.device_count())
        gpu_bytes = [torch.cuda.get_device_properties(i).total_memory for i in gpus]
        placement = reference_placement(spec.gpus_per_actor if use_gpu else 0, gpu_bytes)
        model = load_causal_lm(spec.model_cfg, resolve_dtype(spec.dtype, use_gpu), spec.path, **placement)
        if not placement:
            model = model.to(torch.device("cuda" if use_gpu else "cpu"))
        self.model = model.eval()
        self.device = model.get_input_embeddings().weight.device  # where the input ids go
        self.spec = spec


class _PairScorer(_ActorWithModel):
    """Ray Data callable class: summed completion log-probs of each row's (x, y) and (x, y_kl). Within
    each Ray Data batch both sequences of every row are scored together, sorted by length into model
    batches so padding stays small."""

    def __init__(self, spec: ActorModel, progress=None):
        super().__init__(spec)
        self.layout = pack_sequences if spec.model_cfg.packs(mixed_lengths=False) else pad_sequences
        self.progress = progress  # a ProgressCounter actor for the driver's progress bar, or None

    def scores(self, batch: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
        flush_denormals()  # Ray may run this on another thread than __init__'s
        n = len(batch["id"])
        prompts = list(batch["prompt_ids"]) * 2
        completions = list(batch["completion_ids"]) + list(batch["kl_completion_ids"])
        lengths = [len(p) + len(c) for p, c in zip(prompts, completions)]
        scores = np.zeros(2 * n, dtype=np.float32)
        spec, chunk = self.spec, self.spec.model_cfg.logprob_chunk_tokens
        with torch.inference_mode():
            for rows in length_buckets(lengths, spec.batch_rows, spec.batch_tokens):
                model_batch = self.layout(
                    [prompts[i] for i in rows], [completions[i] for i in rows], spec.pad_id
                )
                logps = sequence_logps(self.model, model_batch.to(self.device), chunk)
                scores[rows] = logps.float().cpu().numpy()
        if self.progress is not None:
            self.progress.add.remote(n, sum(lengths))  # fire and forget: the bar is best effort
        return scores[:n], scores[n:]


class ReferenceLogprobs(_PairScorer):
    """Precompute's actor: the store's rows, with the reference's log-probs (`SCHEMA`)."""

    def __call__(self, batch: dict[str, Any]) -> pa.Table:
        columns = {name: batch[name] for name in ("id", "kl_id", "label", "split")}
        for name in ("prompt_ids", "completion_ids", "kl_completion_ids"):
            columns[name] = [np.asarray(ids, dtype=np.int32) for ids in batch[name]]
        columns["ref_logps"], columns["ref_kl_logps"] = self.scores(batch)
        return pa.table(
            {field.name: pa.array(columns[field.name], field.type) for field in SCHEMA}, schema=SCHEMA
        )


class PolicyLogprobs(_PairScorer):
    """Evaluate's actor: each row's id with the evaluated model's log-probs of (x, y) and (x, y_kl)."""

    def __call__(self, batch: dict[str, Any]) -> dict[str, np.ndarray]:
        logps, kl_logps = self.scores(batch)
        return {"id": np.asarray(batch["id"]), "logps": logps, "kl_logps": kl_logps}


class ProgressCounter:
    """Rows and tokens scored so far, summed over the actors (a Ray actor with no CPU of its own)."""

    def __init__(self) -> None:
        self.rows = self.tokens = 0

    def add(self, rows: int, tokens: int) -> None:
        self.rows, self.tokens = self.rows + rows, self.tokens + tokens

    def read(self) -> tuple[int, int]:
        return self.rows, self.tokens


def on_actors(ds, actor: type, cfg: KTOConfig, batch_size: int, **constructor: Any):
    """`ds` mapped through `actor` on precompute's actor pool: `actors` actors of `gpus_per_actor` GPUs
    and `cpus_per_actor` CPUs, `batch_size` rows per call."""
    import ray.data

    p = cfg.precompute
    return ds.map_batches(
        actor,
        fn_constructor_kwargs=constructor,
        batch_size=batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=p.actors),
        num_gpus=p.gpus_per_actor,
        num_cpus=p.cpus_per_actor,
    )


def score_on_actors(cfg: KTOConfig, path: str, rows: pa.Table) -> tuple[torch.Tensor, torch.Tensor]:
    """The model at `path` scores `rows` (a store split: id, prompt_ids, completion_ids,
    kl_completion_ids) on the actors; returns its log-probs of (x, y) and (x, y_kl), in `rows`' order."""
    import ray.data

    configure_ray_data()
    pad_id = load_tokenizer(cfg.model).pad_token_id
    columns = rows.select(["id", "prompt_ids", "completion_ids", "kl_completion_ids"])
    batch_size = max(1, min(cfg.precompute.bucket_rows, -(-len(rows) // cfg.precompute.actors)))
    ds = ray.data.from_arrow(columns).repartition(max(1, -(-len(rows) // batch_size)))
    ds = on_actors(ds, PolicyLogprobs, cfg, batch_size, spec=ActorModel.of(cfg, path, pad_id))
    by_id = {int(row["id"]): (float(row["logps"]), float(row["kl_logps"])) for row in ds.iter_rows()}
    order = [by_id[i] for i in rows["id"].to_pylist()]
    logps = torch.tensor([y for y, _ in order], dtype=torch.float32)
    kl_logps = torch.tensor([kl for _, kl in order], dtype=torch.float32)
    return logps, kl_logps


@dataclass(frozen=True)
class GenerationSettings:
    max_new_tokens: int
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int = 0
    batch_size: int = 32


def generate_from_ids(
    model, tokenizer, prompts: Sequence[Sequence[int]], settings: GenerationSettings, seed_offset: int = 0
) -> list[str]:
    """Completions (decoded, special tokens dropped) of tokenized prompts, batched with left padding so
    every row continues from its own last prompt token; sampling is seeded per batch (`seed` +
    `seed_offset` + the batch's first row), so a prompt's completion does not depend on which actor ran
    it or what it ran before."""
    pad = tokenizer.pad_token_id  # load_tokenizer pads with eos when the model names no pad token
    sampling = settings.temperature > 0
    options = {"do_sample": sampling}
    if sampling:
        options |= {"temperature": settings.temperature, "top_p": settings.top_p}
    out: list[str] = []
    device = model.get_input_embeddings().weight.device
    with torch.inference_mode():
        for start in range(0, len(prompts), settings.batch_size):
            if sampling:
                torch.manual_seed(settings.seed + seed_offset + start)
            rows = [list(p) for p in prompts[start : start + settings.batch_size]]
            width = max(len(r) for r in rows)
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


class Completions(_ActorWithModel):
    """Ray Data callable class: completions of a chunk of prompts (one dataset row: the chunk's index
    and its prompts' token ids) with the actor's model."""

    def __init__(self, spec: ActorModel, settings: dict[str, Any]):
        super().__init__(spec)
        self.tokenizer = load_tokenizer(spec.model_cfg, spec.path)
        self.settings = GenerationSettings(**settings)

    def __call__(self, batch: dict[str, Any]) -> dict[str, np.ndarray]:
        flush_denormals()
        texts = [
            generate_from_ids(self.model, self.tokenizer, prompts, self.settings, int(first))
            for first, prompts in zip(batch["first"], batch["prompts"])
        ]
        return {"first": np.asarray(batch["first"]), "texts": np.asarray(texts, dtype=object)}


def generate_on_actors(
    cfg: KTOConfig, path: str, prompts: Sequence[Sequence[int]], settings: GenerationSettings
) -> list[str]:
    """Completions of tokenized `prompts` by the model at `path`, generated on the actors in chunks of
    `settings.batch_size` prompts; in `prompts`' order."""
    import ray.data

    if not prompts:
        return []
    configure_ray_data()
    size = settings.batch_size
    chunks = [
        {"first": start, "prompts": [list(map(int, p)) for p in prompts[start : start + size]]}
        for start in range(0, len(prompts), size)
    ]
    ds = ray.data.from_items(chunks).repartition(len(chunks))
    spec = ActorModel.of(cfg, path, load_tokenizer(cfg.model, path).pad_token_id or 0)
    ds = on_actors(ds, Completions, cfg, 1, spec=spec, settings=asdict(settings))
    done = sorted((int(row["first"]), list(row["texts"])) for row in ds.iter_rows())
    return [text for _, texts in done for text in texts]
