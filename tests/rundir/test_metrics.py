"""metrics.jsonl: appended locally, in bounded segments on object storage (a real S3 server, moto's);
every step once after a resume, readers never return part of a line, a follower reads only what is
new and notices a file a resume cut."""

from __future__ import annotations

import json
import os

import pytest

from kto_ray.rundir import RunDir, metrics
from kto_ray.rundir.metrics import (
    METRICS_FILE,
    MetricsFollower,
    MetricsLog,
    every_step_once,
    read_metrics,
    segment_name,
)
from kto_ray.storage import files_under


def _record(step: int, attempt: int = 0) -> dict:
    return {"step": step, "loss": 0.5 - step / 1000, "attempt": attempt, "pad": "x" * 400}


def _write(log: MetricsLog, steps, attempt: int = 0) -> list[dict]:
    records = [_record(s, attempt) for s in steps]
    for record in records:
        log.write(record)
    return records


# ------------------------------------------------------------------------------------------ local disk


def test_local_lines_are_appended_to_one_file(tmp_path):
    run_dir = RunDir(tmp_path / "run")
    log = MetricsLog(run_dir, 0)
    first = _write(log, [1])
    inode = os.stat(run_dir.local_path / METRICS_FILE).st_ino
    written = first + _write(log, range(2, 6))
    path = run_dir.local_path / METRICS_FILE
    assert os.stat(path).st_ino == inode  # the same file grew: `tail -f` follows it
    assert path.read_text() == "".join(json.dumps(r) + "\n" for r in written)
    assert read_metrics(run_dir) == written


def test_local_resume_truncates_at_the_restored_step_and_never_repeats_a_step(tmp_path):
    run_dir = RunDir(tmp_path)
    path = tmp_path / METRICS_FILE
    before = _write(MetricsLog(run_dir, 0), range(1, 301))  # ~130 KB: read back over several chunks
    with open(path, "a") as handle:
        handle.write('{"step": 301, "loss": 0.2')  # a crash cut the last line
    original = path.read_bytes()
    after = _write(MetricsLog(run_dir, 7), range(8, 12), attempt=1)
    text = path.read_bytes()
    assert text.startswith(original[: original.index(b"\n", original.index(b'"step": 7,')) + 1])
    assert read_metrics(run_dir) == before[:7] + after
    assert [json.loads(line)["step"] for line in text.splitlines()] == list(range(1, 12))


def test_local_resume_from_nothing_or_past_the_end(tmp_path):
    run_dir = RunDir(tmp_path)
    written = _write(MetricsLog(run_dir, 0), range(1, 4))
    MetricsLog(run_dir, 10)  # nothing past step 10: nothing dropped
    assert read_metrics(run_dir) == written
    MetricsLog(run_dir, 0)
    assert (tmp_path / METRICS_FILE).read_text() == "" and read_metrics(run_dir) == []


def test_readers_skip_a_line_being_written_and_unparsable_lines(tmp_path):
    line = json.dumps(_record(2))
    (tmp_path / METRICS_FILE).write_text(json.dumps(_record(1)) + "\nnot json\n" + line[:20])
    follower = MetricsFollower(RunDir(tmp_path))
    assert [r["step"] for r in follower.poll()] == [1]
    with open(tmp_path / METRICS_FILE, "a") as handle:
        handle.write(line[20:] + "\n")
    assert follower.poll() == [_record(2)]
    assert follower.poll() == []


def test_local_follower_reads_only_what_is_new_and_notices_a_resume(tmp_path):
    run_dir = RunDir(tmp_path)
    follower = MetricsFollower(run_dir)
    assert follower.poll() == []  # no file yet
    log = MetricsLog(run_dir, 0)
    first = _write(log, range(1, 6))
    assert follower.poll() == first
    more = _write(log, [6])
    assert follower.poll() == more and follower.offset == (tmp_path / METRICS_FILE).stat().st_size
    # A resume from step 3 cuts the file, and the redone steps grow it past where the follower was.
    redone = _write(MetricsLog(run_dir, 3), range(4, 9), attempt=1)
    seen = follower.poll()
    assert every_step_once(first + more + seen) == first[:3] + redone
    assert redone[0] in seen  # read from the start again, not from the old offset


# --------------------------------------------------------------------------------------- object storage


@pytest.fixture
def s3_run(s3, request, monkeypatch):
    """A run dir on the S3 server, with small segments (full from 1600 bytes: four lines each)."""
    monkeypatch.setattr(metrics, "SEGMENT_BYTES", 1600)
    return RunDir(f"s3://kto/metrics-tests/{request.node.name}")


def _objects(run_dir: RunDir) -> dict[str, bytes]:
    prefix = run_dir.location
    out = {}
    for path in files_under(prefix, ""):
        with prefix.fs.open_input_stream(path) as stream:
            out[path[len(prefix.path) + 1 :]] = stream.read()
    return out


def test_s3_segments_are_bounded_and_only_the_newest_is_written(s3_run, monkeypatch):
    written_names: list[str] = []
    put = s3_run.write_text
    monkeypatch.setattr(
        s3_run, "write_text", lambda name, text: (written_names.append(name), put(name, text))
    )
    records = _write(MetricsLog(s3_run, 0), range(1, 19))
    objects = _objects(s3_run)
    assert sorted(objects) == [segment_name(n) for n in range(1, 6)]  # 4 + 4 + 4 + 4 + 2 lines
    assert written_names == sorted(written_names) and len(written_names) == 18  # one PUT per step
    line = len(json.dumps(_record(18))) + 1
    assert all(len(data) <= metrics.SEGMENT_BYTES + line for data in objects.values())
    assert b"".join(objects[name] for name in sorted(objects)).decode() == "".join(
        json.dumps(r) + "\n" for r in records
    )
    assert read_metrics(s3_run) == records


def test_s3_follower_sees_every_step_once_across_segments(s3_run):
    log, follower = MetricsLog(s3_run, 0), MetricsFollower(s3_run)
    seen, written = [], []
    for chunk in (range(1, 3), range(3, 10), range(10, 11), range(11, 20)):
        written += _write(log, chunk)
        seen += follower.poll()
        assert seen == written
    assert follower.segment == 5 and follower.poll() == []


def test_s3_resume_into_an_older_segment_cuts_it_and_deletes_the_later_ones(s3_run):
    before = _write(MetricsLog(s3_run, 0), range(1, 19))  # segments 1-4 full, 5 holds 17-18
    follower = MetricsFollower(s3_run)
    assert follower.poll() == before
    old = _objects(s3_run)
    log = MetricsLog(s3_run, 6)  # step 6 lies in segment 2 (steps 5-8)
    objects = _objects(s3_run)
    assert sorted(objects) == [segment_name(1), segment_name(2)]
    assert objects[segment_name(1)] == old[segment_name(1)]  # before the cut: untouched
    assert read_metrics(s3_run) == before[:6]
    redone = _write(log, range(7, 20), attempt=1)
    assert read_metrics(s3_run) == before[:6] + redone
    assert every_step_once(before + follower.poll()) == before[:6] + redone


def test_s3_resume_from_nothing_and_at_a_segment_boundary(s3_run):
    before = _write(MetricsLog(s3_run, 0), range(1, 11))
    MetricsLog(s3_run, 8)  # the end of segment 2: segment 3 goes, 2 stays whole
    assert sorted(_objects(s3_run)) == [segment_name(1), segment_name(2)]
    assert read_metrics(s3_run) == before[:8]
    log = MetricsLog(s3_run, 0)
    assert _objects(s3_run) == {} and read_metrics(s3_run) == []
    assert _write(log, [1], attempt=1) == read_metrics(s3_run)
