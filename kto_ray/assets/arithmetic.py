"""The embedded feedback data: small-number arithmetic questions with right and wrong answers.

Prompts end with a newline so that prompt + completion, concatenated as KTO trainers do, reads naturally.
Labels are objectively checkable. A desirable completion states the right result in digits; an
undesirable one makes one systematic mistake: it spells the result out in words ("= seven."), which
the answer checker (kto_ray.tools.answers) rejects. Why this mistake: KTO shifts probability between
behaviours the reference already has, conditioned on the prompt; it cannot teach facts the reference
lacks. So the reference knows the facts (few, small operands) and mixes a right and a wrong behaviour,
and the feedback labels which is which. Regenerate with `python -m kto_ray.assets data`.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable
from pathlib import Path

from kto_ray.storage import resolve, write_text_atomically

# (file name, n_prompts, seed, desirable fraction); n_prompts chosen so each file holds ~3000 rows.
DATA_FILES = (("arithmetic.jsonl", 2400, 0, 0.5), ("arithmetic_imbalanced.jsonl", 2727, 1, 0.2))

MAX_OPERAND = 5
# Spelled-out results, 0 to MAX_OPERAND ** 2 (the largest product): the systematic mistake. A categorical
# one on purpose: with an off-by-one mistake, KTO, pushed away from r + 1 and towards r along the same
# numeric direction, overshot to r - 1 (one-process prototype: held-out answer accuracy 0.50 -> 0.19).
_TO_NINETEEN = (  # noqa: SIM905 (one line of words reads better than 20 quoted ones)
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
    "sixteen seventeen eighteen nineteen"
).split()
NUMBER_WORDS = (*_TO_NINETEEN, "twenty", *(f"twenty-{w}" for w in _TO_NINETEEN[1:6]))

_NAMES = ("Sam", "Ana", "Lee", "Maya", "Omar", "Jo", "Priya", "Tom")
_ITEMS = ("apples", "stamps", "marbles", "books", "coins", "shells", "cards")
_PLAIN = (
    "What is {a} {op} {b}?",
    "Compute {a} {op} {b}.",
    "Quick question: what is {a} {op} {b}?",
    "Please solve this arithmetic problem and reply with the result. What is {a} {op} {b}?",
    "I am checking my homework and want to be sure. Can you tell me what {a} {op} {b} is?",
)
# Word problems name the operation by a keyword only: "more" (+), "away" (-), "each" (*).
_WORDS = {
    "+": (
        "{name} has {a} {item} and gets {b} more. How many {item} does {name} have now?",
        "A shelf holds {a} {item}. Then {b} more {item} are put on it. How many {item} are on the shelf?",
    ),
    "-": (
        "{name} had {a} {item} and gave {b} of them away. How many {item} does {name} have left?",
        "There were {a} {item} in a box, and {b} were carried away. How many {item} are in the box now?",
    ),
    "*": (
        "{name} buys {a} bags with {b} {item} in each bag. How many {item} does {name} have?",
        "There are {a} rows of chairs with {b} chairs in each row. How many chairs are there?",
    ),
}
_ANSWERS = (
    "The answer is {r}.",
    "{a} {op} {b} = {r}.",
    "{a} {op} {b} = {r}. The answer is {r}.",
    "Let me work it out: {a} {op} {b} = {r}. So the answer is {r}.",
)


def _operands(rng: random.Random) -> tuple[int, str, int, int]:
    op = rng.choices("+-*", weights=(4, 4, 2))[0]
    if op == "+":
        a, b = rng.randint(1, MAX_OPERAND), rng.randint(1, MAX_OPERAND)
        return a, op, b, a + b
    if op == "-":  # results stay non-negative: simpler to check and to phrase as word problems
        b, right = rng.randint(1, MAX_OPERAND), rng.randint(0, MAX_OPERAND)
        return b + right, op, b, right
    a, b = rng.randint(2, MAX_OPERAND), rng.randint(2, MAX_OPERAND)
    return a, op, b, a * b


def _prompt(rng: random.Random, a: int, op: str, b: int) -> str:
    if rng.random() < 0.35:
        text = rng.choice(_WORDS[op]).format(a=a, b=b, name=rng.choice(_NAMES), item=rng.choice(_ITEMS))
    else:
        text = rng.choice(_PLAIN).format(a=a, op=op, b=b)
    return text + "\n"


def generate_arithmetic(n_prompts: int, seed: int, desirable_fraction: float = 0.5) -> list[dict]:
    """Rows {"prompt", "completion", "label"} over `n_prompts` distinct prompts, shuffled.

    A fraction of prompts gets both a right and a wrong completion (KTO's unpaired data still often
    shares prompts); the rest get one. The counts are exact, so the desirable share of the rows is
    `desirable_fraction` up to rounding.
    """
    if n_prompts < 0 or not 0.0 <= desirable_fraction <= 1.0:
        raise ValueError("need n_prompts >= 0 and 0 <= desirable_fraction <= 1")
    rng = random.Random(seed)
    problems: dict[str, tuple[int, str, int, int]] = {}
    while len(problems) < n_prompts:
        a, op, b, right = _operands(rng)
        problems.setdefault(_prompt(rng, a, op, b), (a, op, b, right))

    # Prompts with both labels must not exceed the minority class, or the fraction is unreachable.
    n_both = round(0.5 * min(desirable_fraction, 1.0 - desirable_fraction) * n_prompts)
    n_rows = n_prompts + n_both
    n_single_good = min(max(round(desirable_fraction * n_rows) - n_both, 0), n_prompts - n_both)
    roles = ["both"] * n_both + ["good"] * n_single_good + ["bad"] * (n_prompts - n_both - n_single_good)
    rng.shuffle(roles)

    rows: list[dict] = []
    for (prompt, (a, op, b, right)), role in zip(problems.items(), roles, strict=True):
        for label in {"both": (True, False), "good": (True,), "bad": (False,)}[role]:
            result = right if label else NUMBER_WORDS[right]
            completion = rng.choice(_ANSWERS).format(a=a, op=op, b=b, r=result)
            rows.append({"prompt": prompt, "completion": completion, "label": label})
    rng.shuffle(rows)
    return rows


def write_default_data(out_dir: str | Path = "data") -> list[Path]:
    """(Re)generate the embedded data files, atomically; deterministic, so reruns are byte-identical."""
    paths = []
    for name, n, seed, fraction in DATA_FILES:
        rows = generate_arithmetic(n, seed, fraction)
        paths.append(Path(out_dir) / name)
        write_text_atomically(
            resolve(paths[-1]), "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        )
    return paths


def heldout_problems(n: int, seed: int, exclude: Iterable[str]) -> list[dict]:
    """`n` distinct prompts {"prompt", "answer"} that are not in `exclude` (the training prompts).

    Same facts and phrasings as the training data, new prompt texts: the answer-accuracy evaluation
    never sees a prompt the policy was trained on. With the default data's 2,400 prompts the few
    plain-template prompts of ~70 facts are all taken, so held-out prompts are word problems with a new
    combination of name, item, template and numbers.
    """
    rng = random.Random(seed)
    seen = set(exclude)
    rows: list[dict] = []
    for _ in range(1000 * max(n, 1)):  # bounded: a tiny phrasing space could run out of new prompts
        if len(rows) == n:
            return rows
        a, op, b, right = _operands(rng)
        prompt = _prompt(rng, a, op, b)
        if prompt not in seen:
            seen.add(prompt)
            rows.append({"prompt": prompt, "answer": right})
    raise ValueError(f"could not find {n} prompts outside the {len(set(exclude))} excluded ones")
