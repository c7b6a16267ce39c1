"""Reading, validating and rendering training rows: every accepted form and every user-fixable error."""

from __future__ import annotations

import csv
import json
import re
import sys
import types
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from tokenizers import Tokenizer, models, processors
from transformers import PreTrainedTokenizerFast

from kto_ray.data.sources import Example, IngestReport, content_fingerprint, read_examples
from kto_ray.errors import UserError

TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{{ '<|' + m['role'] + '|>\n' + m['content'] }}"
    "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


def _tokenizer(chat_template: str | None = TEMPLATE) -> PreTrainedTokenizerFast:
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, "\n": 10, **{chr(i): i for i in range(32, 127)}}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.add_special_tokens(["<pad>", "<s>", "</s>", "<unk>"])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        chat_template=chat_template,
    )


@pytest.fixture
def tokenizer() -> PreTrainedTokenizerFast:
    return _tokenizer()


def write_jsonl(path: Path, rows: list) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def write_csv(path: Path, header: list[str], rows: list[list]) -> str:
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return str(path)


def row(prompt="What is 2+2?", completion="4", label=True, **extra) -> dict:
    return {"prompt": prompt, "completion": completion, "label": label, **extra}


def user_error(paths, match: str, tokenizer=None) -> str:
    with pytest.raises(UserError, match=match) as info:
        read_examples(paths, tokenizer)
    message = str(info.value)
    assert "\n" not in message  # one line, always
    return message


# ---- accepted data -----------------------------------------------------------------------------------


def test_jsonl_unpaired_with_sources(tmp_path):
    path = write_jsonl(tmp_path / "x.jsonl", [row(), row("Capital of France?", "Paris", False, extra=1)])
    examples, report = read_examples([path])
    assert examples == [
        Example("What is 2+2?", "4", True, f"{path}:1"),
        Example("Capital of France?", "Paris", False, f"{path}:2"),
    ]
    assert (report.rows_read, report.examples, report.skipped) == (2, 2, {})
    assert report.summary() == "read 2 rows from 1 file -> 2 examples"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (True, True),
        (False, False),
        (1, True),
        (0, False),
        ("true", True),
        ("FALSE", False),
        (" True ", True),
        ("1", True),
        ("0", False),
        (" false\t", False),
    ],
)
def test_accepted_label_spellings(tmp_path, value, expected):
    examples, _ = read_examples([write_jsonl(tmp_path / "x.jsonl", [row(label=value)])])
    assert examples[0].label is expected


def test_lone_path_string_is_accepted(tmp_path):
    examples, _ = read_examples(write_jsonl(tmp_path / "x.jsonl", [row()]))  # type: ignore[arg-type]
    assert len(examples) == 1


def test_blank_lines_are_skipped_and_line_numbers_kept(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text(json.dumps(row()) + "\n\n   \n" + json.dumps(row("Q2")) + "\n", encoding="utf-8")
    examples, report = read_examples([str(path)])
    assert [e.source for e in examples] == [f"{path}:1", f"{path}:4"]
    assert report.rows_read == 2


def test_paired_rows_become_two_examples(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Q", "chosen": "good", "rejected": "bad", "id": 7}])
    examples, report = read_examples([path])
    assert examples == [Example("Q", "good", True, f"{path}:1"), Example("Q", "bad", False, f"{path}:1")]
    assert (report.rows_read, report.examples) == (1, 2)


def test_json_list_and_data_object(tmp_path):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps([row(), row("Q2")]), encoding="utf-8")
    b.write_text(json.dumps({"data": [row("Q3", label=0)]}), encoding="utf-8")
    examples, report = read_examples([str(a), str(b)])
    assert [(e.prompt, e.label) for e in examples] == [("What is 2+2?", True), ("Q2", True), ("Q3", False)]
    assert examples[1].source == f"{a}:row 2"
    assert report.summary() == "read 3 rows from 2 files -> 3 examples"


def test_csv_round_trip_with_quoted_newlines(tmp_path):
    path = write_csv(
        tmp_path / "x.csv",
        ["prompt", "completion", "label", "note"],
        [["Q1", "line one\nline two", "true", "x"], ["Q2, with comma", "A2", "0", ""]],
    )
    examples, _ = read_examples([path])
    assert [(e.prompt, e.completion, e.label) for e in examples] == [
        ("Q1", "line one\nline two", True),
        ("Q2, with comma", "A2", False),
    ]
    assert examples[1].source == f"{path}:4"  # header, then a record spanning lines 2-3


def test_parquet_round_trip_ignores_extra_columns(tmp_path):
    path = tmp_path / "x.parquet"
    table = pa.table(
        {"prompt": ["Q1", "Q2"], "completion": ["A1", "A2"], "label": [True, False], "score": [1, 2]}
    )
    pq.write_table(table, path)
    examples, _ = read_examples([str(path)])
    assert examples == [
        Example("Q1", "A1", True, f"{path}:row 1"),
        Example("Q2", "A2", False, f"{path}:row 2"),
    ]


def test_folder_is_read_recursively_in_sorted_order(tmp_path):
    write_jsonl(tmp_path / "d" / "b.jsonl", [row("B")])
    write_jsonl(tmp_path / "d" / "a" / "z.jsonl", [row("AZ")])
    write_csv(tmp_path / "d" / "c.csv", ["prompt", "completion", "label"], [["C", "x", "1"]])
    write_jsonl(tmp_path / "d" / ".hidden" / "h.jsonl", [row("HIDDEN")])
    (tmp_path / "d" / "README.md").write_text("not data")
    examples, report = read_examples([str(tmp_path / "d")])
    assert [e.prompt for e in examples] == ["AZ", "B", "C"]
    assert report.files == 3


def test_duplicates_are_skipped_and_counted(tmp_path):
    path = write_jsonl(tmp_path / "x.jsonl", [row(), row(), row(label=False), row("Q2")])
    examples, report = read_examples([path, path])
    assert [(e.prompt, e.label) for e in examples] == [
        ("What is 2+2?", True),
        ("What is 2+2?", False),
        ("Q2", True),
    ]
    assert report.skipped == {"duplicate": 5}
    assert report.summary() == "read 8 rows from 2 files -> 3 examples (skipped: 5 duplicate)"


def test_summary_lists_every_reason():
    report = IngestReport(rows_read=10, examples=7, skipped={"duplicate": 2, "too long": 1}, files=1)
    assert report.summary() == "read 10 rows from 1 file -> 7 examples (skipped: 2 duplicate, 1 too long)"


def test_content_fingerprint():
    a, b = Example("p", "c", True, "x:1"), Example("p", "c", False, "x:2")
    assert content_fingerprint([a, b]) == content_fingerprint([Example("p", "c", True, "elsewhere:9"), b])
    assert content_fingerprint([a, b]) != content_fingerprint([b, a])
    assert content_fingerprint([a]) != content_fingerprint([Example("p", "c", False, "x:1")])
    assert content_fingerprint([Example("ab", "c", True, "")]) != content_fingerprint(
        [Example("a", "bc", True, "")]
    )
    assert len(content_fingerprint([])) == 64


def test_hugging_face_dataset_name(tmp_path, monkeypatch):
    calls = []

    def load_dataset(name, split):
        calls.append((name, split))
        return [row("HF")]

    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    examples, _ = read_examples(["owner/name"], hf_split="test")
    assert calls == [("owner/name", "test")]
    assert examples == [Example("HF", "4", True, "owner/name[test]:row 1")]


# ---- chat --------------------------------------------------------------------------------------------


def test_chat_rendering(tmp_path, tokenizer):
    prompt = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}]
    path = write_jsonl(tmp_path / "c.jsonl", [row(prompt, [{"role": "assistant", "content": "4"}])])
    (example,), _ = read_examples([path], tokenizer)
    assert example.prompt == "<s><|system|>\nBe brief.\n<|user|>\n2+2?\n<|assistant|>\n"
    assert example.completion == "4</s>\n"
    full = tokenizer.apply_chat_template([*prompt, {"role": "assistant", "content": "4"}], tokenize=False)
    assert example.prompt + example.completion == full


def test_chat_prompt_with_text_completion_and_pairs(tmp_path, tokenizer):
    prompt = [
        {"role": "user", "content": "hi", "name": None}
    ]  # extra keys (as Parquet pads them) are dropped
    path = write_jsonl(tmp_path / "c.jsonl", [{"prompt": prompt, "chosen": "hello", "rejected": "go away"}])
    examples, _ = read_examples([path], tokenizer)
    assert [(e.prompt, e.completion, e.label) for e in examples] == [
        ("<s><|user|>\nhi\n<|assistant|>\n", "hello</s>\n", True),
        ("<s><|user|>\nhi\n<|assistant|>\n", "go away</s>\n", False),
    ]


def test_chat_in_parquet(tmp_path, tokenizer):
    path = tmp_path / "c.parquet"
    msgs = [[{"role": "user", "content": "hi"}]]
    pq.write_table(pa.table({"prompt": msgs, "completion": ["yo"], "label": [1]}), path)
    (example,), _ = read_examples([str(path)], tokenizer)
    assert (example.prompt, example.completion) == ("<s><|user|>\nhi\n<|assistant|>\n", "yo</s>\n")


# ---- errors ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "shown"), [("yes", "'yes'"), (2, "2"), (None, "None"), (1.0, "1.0"), ("", "''")]
)
def test_bad_labels(tmp_path, value, shown):
    path = write_jsonl(tmp_path / "x.jsonl", [row(), row(label=value)])
    message = user_error([path], "label")
    assert message.startswith(f"{path}:2: ") and shown in message


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ({"prompt": None}, "field prompt is null"),
        ({"prompt": "  \n"}, "field prompt is empty"),
        ({"completion": None}, "field completion is null"),
        ({"completion": ""}, "field completion is empty"),
        ({"prompt": 5}, "field prompt must be text or a list"),
        ({"prompt": []}, "field prompt is empty"),
    ],
)
def test_null_or_empty_fields(tmp_path, bad, message):
    path = write_jsonl(tmp_path / "x.jsonl", [row(), row(), {**row("Q3"), **bad}])
    assert user_error([path], message).startswith(f"{path}:3: ")


def jsonl(*rows) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


PAIR = {"prompt": "Q", "chosen": "x", "rejected": "y"}


@pytest.mark.parametrize(
    ("name", "content", "expected"),
    [
        ("x.jsonl", jsonl(row(), {"prompt": "Q", "completion": "A"}), r":2: missing column\(s\) label;"),
        ("x.jsonl", jsonl({"prompt": "Q", "chosen": "A"}), r":1: missing column\(s\) rejected;"),
        ("x.jsonl", jsonl({"text": "Q"}), r":1: missing column\(s\) prompt, completion, label;"),
        ("x.jsonl", jsonl(PAIR, row()), r":2: mixed schemas: .*missing column\(s\) chosen, rejected"),
        ("x.jsonl", jsonl(row(chosen="x", rejected="y")), ":1: row has both"),
        ("x.jsonl", jsonl(row(), row()) + b'{"prompt": "Q3",\n', ":3: invalid JSON: "),
        ("x.jsonl", jsonl(row(), ["a", "b"]), ":2: expected a JSON object"),
        ("x.json", b'[\n  {"prompt": "Q"},\n  oops\n]', ":3: invalid JSON: "),
        ("x.json", b'{"rows": []}', ": expected a JSON list"),
        ("x.csv", b"prompt,completion,label\nQ,A,1\nQ2,A2,0,surplus\n", ":3: malformed CSV"),
        ("x.csv", b"prompt,completion,label\nQ,A\n", ":2: malformed CSV"),
        ("x.parquet", b"this is not parquet at all", ": not a readable Parquet file"),
        ("x.jsonl", jsonl(row()) + b'{"prompt": "caf\xe9"}\n', ":2: not UTF-8 text"),
        ("x.json", b'[\n{"prompt": "caf\xe9"}]', ":2: not UTF-8 text"),
        ("x.csv", b"prompt,completion,label\ncaf\xe9,A,1\n", ":2: not UTF-8 text"),
    ],
)
def test_malformed_files(tmp_path, name, content, expected):
    path = tmp_path / name
    path.write_bytes(content)
    user_error([str(path)], f"^{re.escape(str(path))}{expected}")


def test_mixed_schemas_across_files(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [row()])
    b = write_jsonl(tmp_path / "b.jsonl", [PAIR])
    message = user_error([a, b], "mixed schemas")
    assert message.startswith(f"{b}:1: ") and "completion, label" in message and f"{a}:1" in message


def test_null_side_of_a_pair(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Q", "chosen": "a", "rejected": None}])
    user_error([path], f"^{path}:1: field rejected is null$")


def test_empty_dataset(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n", encoding="utf-8")
    (tmp_path / "folder").mkdir()
    user_error([str(tmp_path / "empty.jsonl"), str(tmp_path / "folder")], "^no rows in ")


def test_nonexistent_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    user_error([str(tmp_path / "missing.jsonl")], "^data path not found: ")
    user_error(["data/trian"], "^data path not found: data/trian$")  # a typo next to a real folder
    user_error(["not a dataset name"], "^data path not found: ")


def test_no_paths():
    user_error([], "^no data paths given")


def test_unsupported_file_type(tmp_path):
    path = tmp_path / "x.txt"
    path.write_text("hello")
    user_error([str(path)], "unsupported data file")


def test_hugging_face_without_datasets(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    user_error(["owner/name"], r"pip install kto-ray\[hf\]")


def test_hugging_face_load_failure(tmp_path, monkeypatch):
    def load_dataset(name, split):
        raise FileNotFoundError(f"Dataset '{name}' doesn't exist on the Hub\nmore detail")

    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    user_error(["owner/name"], "^data path not found: owner/name .*doesn't exist on the Hub")


@pytest.mark.parametrize(
    ("prompt", "completion", "message"),
    [
        (
            [{"role": "tool", "content": "x"}, {"role": "user", "content": "q"}],
            "a",
            "field prompt, message 1: role 'tool'",
        ),
        (
            [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
            "b",
            "must end with a user turn",
        ),
        (
            [{"role": "user", "content": "q"}],
            [{"role": "user", "content": "a"}],
            "field completion, message 1: role 'user'",
        ),
        ([{"role": "user"}], "a", "field prompt, message 1: expected"),
        (
            "text prompt",
            [{"role": "assistant", "content": "a"}],
            "field completion is chat messages but prompt is text",
        ),
    ],
)
def test_bad_chat(tmp_path, tokenizer, prompt, completion, message):
    path = write_jsonl(tmp_path / "c.jsonl", [row(prompt, completion)])
    assert user_error([path], message, tokenizer).startswith(f"{path}:1: ")


def test_chat_needs_a_tokenizer_with_a_template(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", [row([{"role": "user", "content": "q"}], "a")])
    user_error([path], f"^{path}:1: .*no tokenizer was given")
    user_error([path], f"^{path}:1: .*no chat_template", _tokenizer(chat_template=None))


def test_chat_template_that_does_not_continue_the_prompt(tmp_path):
    odd = "{% for m in messages %}{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}GO:{% endif %}"
    path = write_jsonl(tmp_path / "c.jsonl", [row([{"role": "user", "content": "q"}], "a")])
    user_error([path], f"^{path}:1: field completion: the chat template", _tokenizer(chat_template=odd))


def test_chat_template_that_renders_an_empty_completion(tmp_path):
    users_only = "{% for m in messages %}{% if m.role == 'user' %}{{ m.content }}{% endif %}{% endfor %}"
    path = write_jsonl(tmp_path / "c.jsonl", [row([{"role": "user", "content": "q"}], "a")])
    user_error(
        [path], f"^{path}:1: field completion renders to empty text", _tokenizer(chat_template=users_only)
    )


def test_chat_template_errors_become_user_errors(tmp_path):
    strict = (
        "{% if messages|length > 1 %}{{ raise_exception('only one turn') }}{% endif %}"
        "{{ messages[0].content }}"
    )
    path = write_jsonl(tmp_path / "c.jsonl", [row([{"role": "user", "content": "q"}], "a")])
    user_error([path], f"^{path}:1: chat template failed: .*only one turn", _tokenizer(chat_template=strict))
