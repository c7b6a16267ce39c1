"""The embedded feedback data: single-digit arithmetic questions with right and wrong answers.

Prompts end with a newline so that prompt + completion, concatenated as KTO trainers do, reads naturally.
Labels are objectively checkable: a desirable completion states the right result, an undesirable one a
wrong result (off by a little, off by one group for products, or two digits swapped). Regenerate with
`python -m kto_ray.assets.tiny_model data` (deterministic: the files come out byte-identical).
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Iterable
from pathlib import Path

# (file name, n_prompts, seed, desirable fraction); n_prompts chosen so each file holds ~3000 rows.
DATA_FILES = (("arithmetic.jsonl", 2400, 0, 0.5), ("arithmetic_imbalanced.jsonl", 2727, 1, 0.2))

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
    # Single-digit facts (about 250 of them): few enough for a 100k-parameter model to learn from
    # feedback within the demo, so held-out prompts (new phrasings of known facts) can show learning.
    op = rng.choices("+-*", weights=(4, 4, 2))[0]
    if op == "+":
        a, b = rng.randint(1, 9), rng.randint(1, 9)
        return a, op, b, a + b
    if op == "-":  # results stay non-negative: simpler to check and to phrase as word problems
        b, right = rng.randint(1, 9), rng.randint(0, 9)
        return b + right, op, b, right
    a, b = rng.randint(2, 9), rng.randint(2, 9)
    return a, op, b, a * b


def _wrong(rng: random.Random, a: int, op: str, b: int, right: int) -> int:
    """A plausible mistake: off by a little, off by one group (products), or two digits swapped."""
    while True:
        kind = rng.random()
        if kind < 0.3 and right >= 10:
            digits = list(str(right))
            i, j = rng.sample(range(len(digits)), 2)
            digits[i], digits[j] = digits[j], digits[i]
            wrong = int("".join(digits)) if digits[0] != "0" else right
        elif kind < 0.45 and op == "*":
            wrong = right + rng.choice((-1, 1)) * rng.choice((a, b))
        else:
            wrong = right + rng.choice((-1, 1)) * rng.randint(1, 10)
        if wrong >= 0 and wrong != right:
            return wrong


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
            result = right if label else _wrong(rng, a, op, b, right)
            completion = rng.choice(_ANSWERS).format(a=a, op=op, b=b, r=result)
            rows.append({"prompt": prompt, "completion": completion, "label": label})
    rng.shuffle(rows)
    return rows


def write_jsonl(rows: Iterable[dict], path: str | Path) -> Path:
    """Write one JSON object per line, atomically (a reader never sees half a file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
    return path


def write_default_data(out_dir: str | Path = "data") -> list[Path]:
    """(Re)generate the embedded data files; deterministic, so reruns are byte-identical."""
    return [
        write_jsonl(generate_arithmetic(n, seed, fraction), Path(out_dir) / name)
        for name, n, seed, fraction in DATA_FILES
    ]


def heldout_problems(n: int, seed: int, exclude: Iterable[str]) -> list[dict]:
    """`n` distinct prompts {"prompt", "answer"} that are not in `exclude` (the training prompts).

    Same facts and phrasings as the training data, new prompt texts: the answer-accuracy evaluation
    never sees a prompt the policy was trained on.
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
