"""`kto-ray demo`: the whole pipeline on the embedded default, then what changed, measured two ways.

1. Implied-reward metrics on the store's eval split (how the policy ranks the given completions).
2. Answer accuracy: greedy answers to held-out arithmetic prompts, checked (what the policy writes).
The reference is the initial model, so "before" is the reference and "after" is <run dir>/final.
"""

from __future__ import annotations

import time

from kto_ray.assets.arithmetic import heldout_problems
from kto_ray.assets.tiny_model import ensure_tiny_model
from kto_ray.config import KTOConfig
from kto_ray.rundir import RunDir
from kto_ray.storage import remove_tree
from kto_ray.tools.answers import Answer, AnswerScore, arithmetic_checker, score_answers

HELDOUT_PROMPTS = 300  # ~3 points of standard error on an accuracy near 0.5
HELDOUT_SEED = 20240214  # differs from the data files' seeds; overlap is excluded anyway
SAMPLES = 3
# Rows of the before/after table: (key in the metrics, label).
TABLE_ROWS = (
    ("reward_accuracy", "implied-reward accuracy"),
    ("rewards/chosen", "rewards/chosen"),
    ("rewards/rejected", "rewards/rejected"),
    ("rewards/margins", "rewards/margins"),
    ("logps/margin", "logps/margin"),
    ("loss", "KTO loss"),
    ("kl", "kl (z0)"),
    ("kl/raw", "kl before the clamp"),
    ("answer_accuracy", "answer accuracy"),
)


def format_report(table: dict[str, dict[str, float]], before: AnswerScore, after: AnswerScore) -> str:
    """The before/after table and a few sample answers: short enough to read at a glance."""
    lines = [f"{'held-out metric':<24}{'before':>9}{'after':>9}"]
    for key, label in TABLE_ROWS:
        lines.append(f"{label:<24}{table['before'][key]:>9.3f}{table['after'][key]:>9.3f}")
    lines.append("sample answers (reference -> trained):")
    for ref, new in zip(before.answers[:SAMPLES], after.answers[:SAMPLES], strict=True):
        prompt = ref.prompt.strip()
        lines.append(f"  {prompt if len(prompt) <= 64 else '...' + prompt[-61:]}")
        lines.append(f"    {_mark(ref)} -> {_mark(new)}")
    return "\n".join(lines)


def _mark(answer: Answer) -> str:
    return f"{answer.completion.strip()[:60]!r} {'right' if answer.correct else 'wrong'}"


def run_demo(cfg: KTOConfig) -> dict[str, dict[str, float]]:
    """Build, precompute, train, evaluate; returns the metrics of "before" and "after"."""
    from kto_ray.data.sources import read_examples
    from kto_ray.models.loading import load_tokenizer
    from kto_ray.raycluster import ray_session
    from kto_ray.reference.precompute import precompute
    from kto_ray.tools.evaluate import evaluate
    from kto_ray.training.launch.driver import train

    start = time.perf_counter()
    model_dir = ensure_tiny_model(cfg.model.path)
    print(f"embedded model and tokenizer: {model_dir}; data: {', '.join(cfg.data.paths)}", flush=True)
    run_dir = RunDir.of(cfg)
    if run_dir.exists():
        # The demo always trains from the start; real runs resume instead (same run.name).
        remove_tree(run_dir.location)
    # New prompts only: the answer check never sees a prompt of the training data (or its eval split),
    # rendered as training renders it.
    examples, _ = read_examples(
        cfg.data.paths, tokenizer=load_tokenizer(cfg.model), hf_split=cfg.data.hf_split
    )
    heldout = heldout_problems(HELDOUT_PROMPTS, HELDOUT_SEED, {e.prompt for e in examples})
    table: dict[str, dict[str, float]] = {}
    with ray_session(cfg.cluster.address):
        # A matching store is reused; one left by older embedded data or model is the demo's own: rebuild.
        precompute(cfg, overwrite=True)
        table["before"] = evaluate(cfg)
        result = train(cfg)
        final = result.run_dir.child("final")
        table["after"] = evaluate(cfg, final)  # on the same actors as precompute, like the answers
        # Greedy answers (on the actors) within the completion budget training allows, so a right answer
        # is never cut short.
        budget = {"max_prompt_length": cfg.data.max_prompt_length}
        budget["max_new_tokens"] = cfg.data.max_length - cfg.data.max_prompt_length
        before, after = (
            score_answers(cfg, path, heldout, arithmetic_checker, **budget)
            for path in (cfg.reference_path, final)
        )
    table["before"]["answer_accuracy"], table["after"]["answer_accuracy"] = before.accuracy, after.accuracy
    print(
        f"\nimplied rewards: {int(table['before']['rows'])} eval rows of the store; answers: greedy, "
        f"{len(heldout)} new prompts"
    )
    print(format_report(table, before, after))
    took = time.perf_counter() - start
    print(f"trained {result.steps} steps in {result.run_dir}; demo finished in {took:.0f}s")
    return table
