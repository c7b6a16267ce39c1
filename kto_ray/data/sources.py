"""Read training rows from files, folders or a Hugging Face dataset into validated, rendered examples.

Accepted rows (extra columns are ignored; one schema for the whole dataset):
- unpaired: `prompt`, `completion`, `label` (bool, 1/0, or "true"/"false"/"1"/"0")
- paired: `prompt`, `chosen`, `rejected` -> two examples (chosen desirable, rejected undesirable)
Fields are text or chat messages (a list of {role, content}); chat is rendered here with the tokenizer's
chat template, so everything downstream only sees text. Any problem a user can fix raises UserError with
one line naming the file, the line or row (1-based) and the field. Exact duplicate examples are skipped
and counted in the report, never silently.
"""

from __future__ import annotations

import csv
import hashlib
import io
import itertools
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kto_ray.errors import UserError

SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")
UNPAIRED = ("prompt", "completion", "label")
PAIRED = ("prompt", "chosen", "rejected")
_UNPAIRED_SET, _PAIRED_SET = frozenset(UNPAIRED), frozenset(PAIRED)  # built once, checked per row
_COLUMNS = _UNPAIRED_SET | _PAIRED_SET
_HF_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_PROMPT_ROLES = {"system", "user", "assistant"}
_TRUE, _FALSE = {"true", "1"}, {"false", "0"}

Source = Path | str  # a local file, or a Hugging Face dataset name
Messages = list[dict[str, str]]


@dataclass(frozen=True)
class Example:
    prompt: str  # rendered text (chat prompts end with the template's generation prompt)
    completion: str  # rendered text: the continuation of the prompt
    label: bool  # True = desirable
    source: str  # "file:line" or "file:row N", for error messages


@dataclass
class IngestReport:
    rows_read: int
    examples: int
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> count
    files: int = 0  # files (or Hugging Face datasets) read

    def summary(self) -> str:
        files = f"{self.files} file{'' if self.files == 1 else 's'}"
        text = f"read {self.rows_read} rows from {files} -> {self.examples} examples"
        if self.skipped:
            text += " (skipped: " + ", ".join(f"{n} {why}" for why, n in sorted(self.skipped.items())) + ")"
        return text


def read_examples(
    paths: list[str], tokenizer: Any = None, hf_split: str = "train"
) -> tuple[list[Example], IngestReport]:
    """Read, validate and render every row of `paths`; see the module docstring for the rules."""
    sources = _sources(paths)
    report = IngestReport(rows_read=0, examples=0, files=len(sources))
    examples: list[Example] = []
    seen: set[tuple[str, str, bool]] = set()
    first: tuple[str, str] | None = None  # (schema, source) of the first row: it fixes the schema
    for source in sources:
        rows = (
            _hf_rows(source, hf_split) if isinstance(source, str) else _READERS[source.suffix.lower()](source)
        )
        for src, row in rows:
            report.rows_read += 1
            kind = _schema_of(src, row, first)
            first = first or (kind, src)
            for example in _to_examples(src, row, kind, tokenizer):
                key = (example.prompt, example.completion, example.label)
                if key in seen:
                    report.skipped["duplicate"] = report.skipped.get("duplicate", 0) + 1
                    continue
                seen.add(key)
                examples.append(example)
    if report.rows_read == 0:
        raise UserError(f"no rows in {', '.join(map(str, paths))} (looked for {', '.join(SUFFIXES)} files)")
    report.examples = len(examples)
    return examples, report


def content_fingerprint(examples: list[Example]) -> str:
    """sha256 over the examples' (prompt, completion, label) in order; `source` is not content."""
    digest = hashlib.sha256()
    for ex in examples:
        # JSON framing keeps the field boundaries unambiguous ("ab"+"c" != "a"+"bc")
        digest.update(json.dumps([ex.prompt, ex.completion, ex.label], ensure_ascii=False).encode())
        digest.update(b"\n")
    return digest.hexdigest()


def local_files(paths: list[str]) -> list[Path] | None:
    """The files `read_examples(paths)` reads, in its order, without reading them; None when a path is
    a Hugging Face dataset name, which has no file whose stat could stand for its content."""
    sources = _sources(paths)
    return None if any(isinstance(source, str) for source in sources) else sources


def _sources(paths: list[str]) -> list[Source]:
    if isinstance(paths, str):  # a lone path is an easy slip; it would otherwise be read char by char
        paths = [paths]
    if not paths:
        raise UserError("no data paths given (data.paths is empty)")
    return [source for path in paths for source in _expand(path)]


def _expand(path: str) -> list[Source]:
    p = Path(path)
    if p.is_dir():
        files = [f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in SUFFIXES]
        # hidden files and folders are editor/tool debris (.ipynb_checkpoints, .~lock), not data
        return sorted(f for f in files if not any(part.startswith(".") for part in f.relative_to(p).parts))
    if p.is_file():
        if p.suffix.lower() not in SUFFIXES:
            raise UserError(f"unsupported data file {path}: expected one of {', '.join(SUFFIXES)}")
        return [p]
    # "data/trian" next to an existing data/ folder is a typo, not a Hugging Face dataset
    if _HF_NAME.match(path) and p.suffix.lower() not in SUFFIXES and not p.parent.exists():
        return [path]
    raise UserError(f"data path not found: {path}")


def _jsonl_rows(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    with path.open("rb") as f:
        for n, raw in enumerate(f, 1):
            src = f"{path}:{n}"
            try:
                line = raw.decode("utf-8-sig" if n == 1 else "utf-8")  # tolerate a BOM, as editors add one
            except UnicodeDecodeError as e:
                raise UserError(f"{src}: not UTF-8 text ({e.reason} at byte {e.start})") from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{src}: invalid JSON: {e.msg} (column {e.colno})") from None
            yield src, _as_object(src, obj)


def _json_rows(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    try:
        obj = json.loads(_read_text(path))
    except json.JSONDecodeError as e:
        raise UserError(f"{path}:{e.lineno}: invalid JSON: {e.msg} (column {e.colno})") from None
    if isinstance(obj, dict) and isinstance(obj.get("data"), list):
        obj = obj["data"]
    if not isinstance(obj, list):
        raise UserError(f'{path}: expected a JSON list of objects, or {{"data": [...]}}')
    for i, row in enumerate(obj, 1):
        yield f"{path}:row {i}", _as_object(f"{path}:row {i}", row)


def _parquet_rows(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        names = pq.read_schema(path).names
        # read only the columns we use; with none of them, read all so the rows report what is missing
        table = pq.read_table(path, columns=[c for c in names if c in _COLUMNS] or None)
    except (pa.ArrowException, OSError) as e:
        raise UserError(f"{path}: not a readable Parquet file: {_one_line(e)}") from None
    for i, row in enumerate(itertools.chain.from_iterable(b.to_pylist() for b in table.to_batches()), 1):
        yield f"{path}:row {i}", row


def _csv_rows(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    csv.field_size_limit(2**31 - 1)  # long completions exceed the 128 KiB default field limit
    reader = csv.DictReader(io.StringIO(_read_text(path), newline=""))
    try:
        for row in reader:
            src = f"{path}:{reader.line_num}"
            # DictReader files surplus fields under the key None and fills missing ones with None
            if None in row or None in row.values():
                raise UserError(f"{src}: malformed CSV: the row and the header have different field counts")
            yield src, row
    except csv.Error as e:
        raise UserError(f"{path}:{reader.line_num}: malformed CSV: {e}") from None


def _hf_rows(name: str, split: str) -> Iterator[tuple[str, dict[str, Any]]]:
    try:
        import datasets
    except ImportError:
        raise UserError(
            f"data path {name} is not a local file or folder; to read it as a Hugging Face dataset, "
            "pip install kto-ray[hf]"
        ) from None
    try:
        dataset = datasets.load_dataset(name, split=split)
    except Exception as e:  # missing repo, split, network or auth: each is the user's to fix
        raise UserError(f"data path not found: {name} (not local; Hugging Face: {_one_line(e)})") from None
    for i, row in enumerate(dataset, 1):
        yield f"{name}[{split}]:row {i}", row


_READERS = {".jsonl": _jsonl_rows, ".json": _json_rows, ".parquet": _parquet_rows, ".csv": _csv_rows}


def _read_text(path: Path) -> str:
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise UserError(f"{path}:{line}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def _one_line(e: Exception) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


def _as_object(src: str, obj: Any) -> dict[str, Any]:
    if not isinstance(obj, dict):
        raise UserError(f"{src}: expected a JSON object with the row's columns, got {type(obj).__name__}")
    return obj


def _schema_of(src: str, row: dict[str, Any], first: tuple[str, str] | None) -> str:
    is_unpaired, is_paired = row.keys() >= _UNPAIRED_SET, row.keys() >= _PAIRED_SET
    if is_unpaired and is_paired:
        raise UserError(f"{src}: row has both completion/label and chosen/rejected columns; keep one schema")
    kind = "unpaired" if is_unpaired else "paired" if is_paired else None
    if first is not None and kind == first[0]:
        return kind
    # name the columns of the schema the data is using (or the row seems to aim for)
    expected_kind = first[0] if first else ("paired" if {"chosen", "rejected"} & row.keys() else "unpaired")
    expected = UNPAIRED if expected_kind == "unpaired" else PAIRED
    missing = ", ".join(c for c in expected if c not in row)
    if kind is None:
        raise UserError(
            f"{src}: missing column(s) {missing}; rows need prompt, completion, label "
            "(or prompt, chosen, rejected for paired rows)"
        )
    if first is not None:
        raise UserError(
            f"{src}: mixed schemas: this row is {kind} but {first[1]} is {first[0]} "
            f"(missing column(s) {missing}); use one schema for all data"
        )
    return kind


def _to_examples(src: str, row: dict[str, Any], kind: str, tokenizer: Any) -> list[Example]:
    prompt = _field(src, row, "prompt")
    if kind == "unpaired":
        sides = [("completion", _field(src, row, "completion"), _label(src, row["label"]))]
    else:
        sides = [
            ("chosen", _field(src, row, "chosen"), True),
            ("rejected", _field(src, row, "rejected"), False),
        ]
    return [Example(*_render(src, prompt, text, name, tokenizer), label, src) for name, text, label in sides]


def _field(src: str, row: dict[str, Any], name: str) -> str | Messages:
    value = row[name]
    if value is None:
        raise UserError(f"{src}: field {name} is null")
    if isinstance(value, str):
        if not value.strip():
            raise UserError(f"{src}: field {name} is empty")
        return value
    if isinstance(value, list | tuple):
        return _messages(src, name, value)
    raise UserError(
        f"{src}: field {name} must be text or a list of {{role, content}} messages, "
        f"got {type(value).__name__}"
    )


def _messages(src: str, name: str, value: list[Any] | tuple[Any, ...]) -> Messages:
    messages = []
    for k, m in enumerate(value, 1):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            raise UserError(
                f'{src}: field {name}, message {k}: expected {{"role": str, "content": str}}, got {m!r:.80}'
            )
        # only role and content: columnar formats pad messages with null extra keys that break templates
        messages.append({"role": m["role"], "content": m["content"]})
    if not any(m["content"].strip() for m in messages):
        raise UserError(f"{src}: field {name} is empty")
    return messages


def _label(src: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    raise UserError(f"{src}: field label must be true/false or 1/0, got {value!r:.40}")


def _render(
    src: str, prompt: str | Messages, completion: str | Messages, name: str, tokenizer: Any
) -> tuple[str, str]:
    if isinstance(prompt, str):
        if not isinstance(completion, str):
            raise UserError(f"{src}: field {name} is chat messages but prompt is text; use messages for both")
        return prompt, completion
    _check_roles(src, "prompt", prompt, _PROMPT_ROLES)
    if prompt[-1]["role"] != "user":
        raise UserError(f"{src}: field prompt must end with a user turn, not {prompt[-1]['role']!r}")
    if isinstance(completion, str):  # a text answer to a chat prompt is one assistant turn
        completion = [{"role": "assistant", "content": completion}]
    _check_roles(src, name, completion, {"assistant"})
    if tokenizer is None or getattr(tokenizer, "chat_template", None) is None:
        what = "no tokenizer was given" if tokenizer is None else "the tokenizer has no chat_template"
        raise UserError(f"{src}: field prompt is chat messages, which need a chat template, but {what}")
    prompt_text = _apply_template(src, tokenizer, prompt, generation_prompt=True)
    full = _apply_template(src, tokenizer, prompt + completion, generation_prompt=False)
    if not full.startswith(prompt_text):
        raise UserError(
            f"{src}: field {name}: the chat template does not render prompt + {name} as a continuation "
            "of the prompt with its generation prompt, so the completion cannot be split off"
        )
    if not full[len(prompt_text) :].strip():
        raise UserError(f"{src}: field {name} renders to empty text with the chat template")
    return prompt_text, full[len(prompt_text) :]


def _check_roles(src: str, name: str, messages: Messages, allowed: set[str]) -> None:
    for k, m in enumerate(messages, 1):
        if m["role"] not in allowed:
            only = ", ".join(sorted(allowed))
            raise UserError(
                f"{src}: field {name}, message {k}: role {m['role']!r} not allowed here (only {only})"
            )


def _apply_template(src: str, tokenizer: Any, messages: Messages, *, generation_prompt: bool) -> str:
    try:
        return tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=generation_prompt
        )
    except Exception as e:  # templates raise their own errors (e.g. "roles must alternate")
        raise UserError(f"{src}: chat template failed: {_one_line(e)}") from None
