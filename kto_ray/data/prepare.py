"""A config's rows, read, validated, KL-paired and split on the driver, then tokenized by `tokenize_rows`
(in Ray Data tasks by precompute, or on the driver online)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from kto_ray.config import KTOConfig
from kto_ray.data.pairing import kl_partners, row_digest, split_assignment
from kto_ray.data.sources import Example, IngestReport, content_fingerprint, read_examples
from kto_ray.data.tokenize import tokenize_batch


@dataclass(frozen=True)
class PreparedText:
    """One row per example: id, prompt, completion, kl_completion (text), kl_id, label, split."""

    table: pa.Table
    report: IngestReport
    data_digest: str
    examples: list[Example]  # in id order: where each row came from, for one-line errors
    row_digests: list[bytes]  # each row's identity (row_digest): what an append checks the data against


def prepare_text(cfg: KTOConfig, tokenizer) -> PreparedText:
    examples, report = read_examples(cfg.data.paths, tokenizer=tokenizer, hf_split=cfg.data.hf_split)
    prompts = [e.prompt for e in examples]
    digests = [row_digest(e.prompt, e.completion, e.label) for e in examples]
    partners = kl_partners(prompts, cfg.data.seed)
    splits = split_assignment(digests, cfg.data.eval_fraction, cfg.data.seed)
    table = pa.table(
        {
            "id": pa.array(range(len(examples)), pa.int64()),
            "prompt": prompts,
            "completion": [e.completion for e in examples],
            "kl_completion": [examples[j].completion for j in partners],
            "kl_id": pa.array(partners, pa.int64()),
            "label": pa.array([e.label for e in examples], pa.bool_()),
            "split": splits,
        }
    )
    return PreparedText(table, report, content_fingerprint(examples), examples, digests)


def tokenize_rows(
    batch: dict[str, Any], tokenizer, max_length: int, max_prompt_length: int
) -> dict[str, Any]:
    """Tokenize a batch of text rows; rows whose completion has no token left are dropped."""
    limits = {"max_length": max_length, "max_prompt_length": max_prompt_length}
    own = tokenize_batch(tokenizer, list(batch["prompt"]), list(batch["completion"]), **limits)
    kl = tokenize_batch(tokenizer, list(batch["prompt"]), list(batch["kl_completion"]), **limits)
    keep = [i for i, tok in enumerate(own) if tok is not None]
    return {
        "id": [batch["id"][i] for i in keep],
        "prompt_ids": [own[i].prompt_ids for i in keep],
        "completion_ids": [own[i].completion_ids for i in keep],
        "kl_completion_ids": [kl[i].completion_ids if kl[i] is not None else [] for i in keep],
        "kl_id": [batch["kl_id"][i] for i in keep],
        "label": [bool(batch["label"][i]) for i in keep],
        "split": [batch["split"][i] for i in keep],
    }
