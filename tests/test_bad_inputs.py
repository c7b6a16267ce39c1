"""Bad inputs through the real CLI: exit code 2, one line naming the file and row (or key), nothing written.

One fixture per class of mistake; each returns the CLI arguments and what the message must name.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from kto_ray.cli import main

from .conftest import make_config

GOOD = {"prompt": "1+2=", "completion": "3", "label": True}
ROWS = [
    {"prompt": f"{a}+{b}=", "completion": str(a + b + (i % 2)), "label": i % 2 == 0}
    for i, (a, b) in enumerate((a, b) for a in range(4) for b in range(4))
]


def _jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def _args(ctx, data_file: Path | None = None, command: str = "precompute", **sections) -> list[str]:
    cfg = make_config(ctx.tiny_model, data_file or ctx.good_data, ctx.root, **sections)
    config_file = ctx.root / "config.yaml"
    config_file.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    return [command, "--config", str(config_file)]


def malformed_json(ctx):
    data = _jsonl(ctx.root / "bad.jsonl", [*ROWS[:2], '{"prompt": "1+1=", "completion": "2", ', *ROWS[2:]])
    return _args(ctx, data), r"bad\.jsonl:3: invalid JSON"


def malformed_csv(ctx):
    data = ctx.root / "bad.csv"
    data.write_text('prompt,completion,label\n1+1=,2,true\n"1+2=,3,true\n2+2=,4,false\n')
    return _args(ctx, data), r"bad\.csv.*malformed CSV"


def malformed_parquet(ctx):
    data = ctx.root / "bad.parquet"
    data.write_bytes(b"PAR1 this is not really parquet")
    return _args(ctx, data), r"bad\.parquet: not a readable Parquet file"


def missing_column(ctx):
    data = _jsonl(ctx.root / "nocol.jsonl", [*ROWS[:3], {"prompt": "1+1=", "label": True}, *ROWS[3:]])
    return _args(ctx, data), r"nocol\.jsonl:4: .*completion"


def null_field(ctx):
    data = _jsonl(ctx.root / "null.jsonl", [*ROWS[:1], {**GOOD, "completion": None}, *ROWS[1:]])
    return _args(ctx, data), r"null\.jsonl:2: field completion is null"


def empty_field(ctx):
    data = _jsonl(ctx.root / "empty.jsonl", [*ROWS[:4], {**GOOD, "prompt": ""}, *ROWS[4:]])
    return _args(ctx, data), r"empty\.jsonl:5: field prompt is empty"


def non_boolean_label(ctx):
    data = _jsonl(ctx.root / "label.jsonl", [*ROWS[:5], {**GOOD, "label": "maybe"}, *ROWS[5:]])
    return _args(ctx, data), r"label\.jsonl:6: field label must be true/false"


def wrong_chat_role(ctx):
    prompt = [{"role": "user", "content": "1+1="}, {"role": "wizard", "content": "2"}]
    data = _jsonl(ctx.root / "chat.jsonl", [{"prompt": prompt, "completion": "2", "label": True}, *ROWS])
    return _args(ctx, data), r"chat\.jsonl:1: .*(role|user turn)"


def non_utf8_text(ctx):
    data = ctx.root / "latin1.jsonl"
    good = "".join(json.dumps(r) + "\n" for r in ROWS[:6]).encode()
    data.write_bytes(good + '{"prompt": "caf\u00e9", "completion": "x", "label": true}\n'.encode("latin-1"))
    return _args(ctx, data), r"latin1\.jsonl:7: not UTF-8 text"


def one_prompt_only(ctx):
    rows = [{"prompt": "1+1=", "completion": str(i), "label": i == 2} for i in range(10)]
    return _args(ctx, _jsonl(ctx.root / "one.jsonl", rows)), r"(KL|pair|prompt)"


def unknown_config_key(ctx):
    args = _args(ctx)
    return [*args, "--set", "train.betta=0.2"], r"unknown key 'train\.betta'"


def wrong_config_type(ctx):
    return [*_args(ctx), "--set", "train.beta=high"], r"train\.beta: .*(float|number)"


def missing_config_file(ctx):
    return ["precompute", "--config", str(ctx.root / "nope.yaml")], r"config file not found: .*nope\.yaml"


def missing_model_path(ctx):
    return _args(ctx, model={"path": str(ctx.root / "no-model")}), r"model path not found: .*no-model"


def store_path_is_a_file(ctx):
    (ctx.root / "store").write_text("not a folder")
    return _args(ctx), r"store path is a file, not a folder: .*store"


def store_from_another_max_length(ctx):
    # A complete store built for data.max_length=192; training asks for 160: refused, the component named.
    _cfg, store = ctx.built_store
    args = _args(ctx, ctx.small_data, command="train", store={"path": str(store.path)})
    return [*args, "--set", "data.max_length=160"], r"different truncation"


CASES: list[Callable] = [
    malformed_json,
    malformed_csv,
    malformed_parquet,
    missing_column,
    null_field,
    empty_field,
    non_boolean_label,
    wrong_chat_role,
    non_utf8_text,
    one_prompt_only,
    unknown_config_key,
    wrong_config_type,
    missing_config_file,
    missing_model_path,
    store_path_is_a_file,
    store_from_another_max_length,
]


class Context:
    def __init__(self, root: Path, tiny_model: Path, small_data: Path, request):
        self.root, self.tiny_model, self.small_data, self._request = root, tiny_model, small_data, request
        self.good_data = _jsonl(root / "good.jsonl", ROWS)

    @property
    def built_store(self):
        return self._request.getfixturevalue("built_store")


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.__name__)
def test_bad_input_exits_2_with_one_line_and_writes_nothing(
    case, tiny_model, small_data, tmp_path, request, capsys
):
    argv, message = case(Context(tmp_path, tiny_model, small_data, request))
    capsys.readouterr()  # drop what a fixture printed while the case was set up
    before = set(tmp_path.rglob("*"))
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("kto-ray: error: ") and "\n" not in err, err
    assert "Traceback" not in err
    assert re.search(message, err), err
    assert set(tmp_path.rglob("*")) == before  # no store, no run dir, no temporary left behind
