"""metrics.jsonl: one JSON object per optimizer step, written by rank 0, read through `MetricsFollower`.

A step costs the same whatever the run's length. Locally rank 0 appends the step's line (so `tail -f`
works). Object stores cannot append, so there the lines go to segments `metrics/000001.jsonl`, ...:
rank 0 rewrites only the newest (one PUT of at most SEGMENT_BYTES and a line) and starts the next once
it is full. Concatenated in order, the segments are the file.

On resume, lines past the restored step are dropped where they are (the local file is truncated; later
segments are deleted and the one holding that step rewritten), so no step appears twice. Readers never
return part of a line.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs

from kto_ray.rundir import RunDir
from kto_ray.storage import children

METRICS_FILE = "metrics.jsonl"  # local run dirs
SEGMENTS = "metrics"  # object storage: metrics/000001.jsonl, ...
SEGMENT_BYTES = 256 << 10  # a segment is full from this size: the most one step's PUT carries
_SEGMENT = re.compile(r"^(\d{6,})\.jsonl$")
_MAX_RESTARTS = 3  # per poll: a file rewritten again and again while read is read at the next poll


def segment_name(number: int) -> str:
    return f"{SEGMENTS}/{number:06d}.jsonl"


def _parse_line(line: bytes | str) -> dict[str, Any] | None:
    try:
        record = json.loads(line)
    except ValueError:
        return None
    return record if isinstance(record, dict) and "step" in record else None


def every_step_once(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Records in step order, each step once: a record for step s replaces what came before it for
    steps s and later, as a resumed writer redoes them."""
    kept: list[dict[str, Any]] = []
    for record in records:
        try:
            step = int(record["step"])
        except (TypeError, ValueError):
            continue
        while kept and int(kept[-1]["step"]) >= step:
            kept.pop()
        kept.append(record)
    return kept


def read_metrics(run_dir: RunDir | str | Path) -> list[dict[str, Any]]:
    """The run's records, every step once in step order ([] before the first step is written)."""
    run_dir = run_dir if isinstance(run_dir, RunDir) else RunDir(run_dir)
    return every_step_once(MetricsFollower(run_dir).poll())


class MetricsFollower:
    """Reads what was written since its last `poll`: the new records in file order. After a resume
    cut the file, the poll reads it again from the start (steps up to the restored one come again;
    `every_step_once` or the caller's own step count sorts that out)."""

    def __init__(self, run_dir: RunDir):
        self.run_dir = run_dir
        self._pending: list[dict[str, Any]] = []  # read before a poll failed: returned by the next
        self._restart()

    def _restart(self) -> None:
        self.segment = 1  # object storage: the segment being read
        self.offset = 0  # bytes of it read, up to the end of a line
        self.last_line = b""  # the line that ends at `offset`, with its newline

    def _name(self, segment: int) -> str:
        return segment_name(segment) if self.run_dir.is_remote else METRICS_FILE

    def poll(self) -> list[dict[str, Any]]:
        records, self._pending = self._pending, []
        restarts = 0
        try:
            while restarts <= _MAX_RESTARTS:
                # Check for the next segment before reading this one: once it exists, this one is complete.
                later = self.run_dir.is_remote and self.run_dir.exists(self._name(self.segment + 1))
                read = self._read_on()
                if read is None:  # cut or rewritten since the last poll, or deleted by a resume
                    self._restart()
                    restarts += 1
                    continue
                records += read
                if not later:
                    break
                self.segment, self.offset, self.last_line = self.segment + 1, 0, b""
        except OSError:
            self._pending = records
            raise
        return records

    def _read_on(self) -> list[dict[str, Any]] | None:
        """The complete lines after `offset`, or None when the file is no longer what was read."""
        location = self.run_dir.join(self._name(self.segment))
        start = self.offset - len(self.last_line)
        try:
            with location.fs.open_input_file(location.path) as handle:
                size = handle.size()
                if size < self.offset:
                    return None
                data = handle.read_at(size - start, start) if size > self.offset else self.last_line
        except FileNotFoundError:
            return None if self.offset or self.segment > 1 else []
        if not data.startswith(self.last_line):
            return None
        new = data[len(self.last_line) :]
        complete = new[: new.rfind(b"\n") + 1]  # a line still being written is read at the next poll
        if complete:
            self.offset += len(complete)
            self.last_line = complete[complete.rfind(b"\n", 0, len(complete) - 1) + 1 :]
        # Lines that do not parse (one a crash cut mid-write) are skipped.
        return [record for record in map(_parse_line, complete.splitlines()) if record is not None]


class MetricsLog:
    """Rank 0's writer: `write(record)` adds one step's line. On resume, first drops the lines past
    `resume_step`, so no step repeats."""

    def __init__(self, run_dir: RunDir, resume_step: int):
        self._sink = (
            _Segments(run_dir, resume_step)
            if run_dir.is_remote
            else _LocalFile(run_dir.local_path / METRICS_FILE, resume_step)
        )

    def write(self, record: dict[str, Any]) -> None:
        self._sink.append(json.dumps(record) + "\n")


class _LocalFile:
    def __init__(self, path: Path, resume_step: int):
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "ab+") as handle:
            kept = _end_of_kept_lines(handle, resume_step)
            if kept < handle.seek(0, os.SEEK_END):
                handle.truncate(kept)
        self.path = path

    def append(self, line: str) -> None:
        # One write of the whole line, unbuffered; readers take lines only up to their newline.
        with open(self.path, "ab", buffering=0) as handle:
            handle.write(line.encode("utf-8"))


def _end_of_kept_lines(handle, resume_step: int, chunk: int = 1 << 16) -> int:
    """The length of the file up to the end of its last complete line for a step <= resume_step,
    read back from the end: only the lines past it (and one chunk) are read."""
    end = handle.seek(0, os.SEEK_END)
    pos, data, limit = end, b"", end  # data = file[pos:end]; lines from `limit` on are dropped
    while True:
        newline = data.rfind(b"\n", 0, limit - pos)  # ends the line to look at
        begin = data.rfind(b"\n", 0, newline) if newline >= 0 else -1
        if begin < 0 and pos > 0:  # that line (or its start) lies before what was read
            start = max(0, pos - chunk)
            handle.seek(start)
            data, pos = handle.read(pos - start) + data, start
            continue
        if newline < 0:
            return 0
        record = _parse_line(data[begin + 1 : newline])
        if record is not None and _step(record) <= resume_step:
            return pos + newline + 1
        limit = pos + begin + 1


def _step(record: dict[str, Any]) -> float:
    try:
        return int(record["step"])
    except (KeyError, TypeError, ValueError):
        return float("inf")


class _Segments:
    """The newest segment's lines are kept here; each append rewrites that segment whole."""

    def __init__(self, run_dir: RunDir, resume_step: int):
        self.run_dir = run_dir
        numbers = sorted(
            int(match.group(1))
            for entry in children(run_dir.join(SEGMENTS))
            if entry.type == pafs.FileType.File and (match := _SEGMENT.match(entry.base_name))
        )
        self.number, self.lines = 1, []
        # From the newest back: segments entirely past the restored step go, the one holding it is cut.
        for number in reversed(numbers):
            lines = (run_dir.read_text(segment_name(number)) or "").splitlines(keepends=True)
            kept = [line for line in lines if _step(_parse_line(line) or {}) <= resume_step]
            if kept or number == numbers[0]:
                self.number, self.lines = number, kept
                if len(kept) < len(lines):
                    self._put_or_delete()
                break
            self._delete(number)
        self.size = sum(len(line.encode()) for line in self.lines)

    def append(self, line: str) -> None:
        if self.size >= SEGMENT_BYTES:  # full: it is not written again, the next one starts
            self.number, self.lines, self.size = self.number + 1, [], 0
        self.lines.append(line)
        self.size += len(line.encode("utf-8"))
        self._put_or_delete()

    def _put_or_delete(self) -> None:
        if self.lines:
            self.run_dir.write_text(segment_name(self.number), "".join(self.lines))
        else:
            self._delete(self.number)

    def _delete(self, number: int) -> None:
        location = self.run_dir.join(segment_name(number))
        with contextlib.suppress(FileNotFoundError):
            location.fs.delete_file(location.path)
