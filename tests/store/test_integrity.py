"""A damaged store file is found where it is read and named in one line (StoreDamaged, exit 2), locally
and on the S3 test server: a truncated file, 64 flipped bytes, one flipped bit in a `ref_logps` page
(which pyarrow alone decodes without complaint), a flipped footer byte, a missing file. `kto-ray
verify` on a good and a damaged store. No Ray: the driver's index build is where train meets them."""

from __future__ import annotations

import re
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from kto_ray.errors import StoreDamaged
from kto_ray.storage import Location
from kto_ray.store.format import check_files, open_store
from kto_ray.store.reader import RowReader, SplitIndex
from kto_ray.tools.verify import VerifyFailed, verify
from tests.conftest import REPO
from tests.helpers import write_store
from tests.s3server import s3_server

GROUPS = [64, 64]  # two files of 200 rows, row groups of 64


def _read(location: Location, path: str) -> bytes:
    with location.fs.open_input_stream(path) as stream:
        return stream.read()


def _write(location: Location, path: str, data: bytes) -> None:
    with location.fs.open_output_stream(path) as stream:
        stream.write(data)


def _chunk(data: bytes, column: str, group: int) -> tuple[int, int]:
    row_group = pq.read_metadata(pa.BufferReader(data)).row_group(group)
    chunks = (row_group.column(i) for i in range(row_group.num_columns))
    chunk = next(c for c in chunks if c.path_in_schema.split(".")[0] == column)
    return chunk.dictionary_page_offset or chunk.data_page_offset, chunk.total_compressed_size


def _page_end(data: bytes, column: str, group: int = 1) -> int:
    """The offset of the last byte of `column`'s chunk in row group `group`: inside its last data page."""
    start, size = _chunk(data, column, group)
    return start + size - 1


def _page_middle(data: bytes, column: str, group: int = 1) -> int:
    """An offset in the middle of `column`'s chunk: inside its values (the log-probs' dictionary)."""
    start, size = _chunk(data, column, group)
    return start + size // 3


def _truncate(data: bytes) -> bytes:
    return data[: len(data) // 2]


def _flip_64(data: bytes) -> bytes:
    damaged = bytearray(data)
    middle = len(data) // 2
    for i in range(middle, middle + 64):
        damaged[i] ^= 0xFF
    return bytes(damaged)


def _flip_ref_logps(data: bytes) -> bytes:
    damaged = bytearray(data)
    damaged[_page_middle(data, "ref_logps")] ^= 0x01
    return bytes(damaged)


def _flip_footer(data: bytes) -> bytes:
    damaged = bytearray(data)
    footer = int.from_bytes(data[-8:-4], "little")
    damaged[len(data) - 8 - footer // 2] ^= 0x10
    return bytes(damaged)


DAMAGES = {
    "truncated": (_truncate, r"size \d+, expected \d+"),
    "64 flipped bytes": (_flip_64, r"CRC checksum|Unexpected|deserializ|Couldn't|corrupt"),
    "a bit of a ref_logps page": (_flip_ref_logps, r"CRC checksum verification failed"),
    "a footer byte": (_flip_footer, r"footer checksum differs"),
}


def _damaged_copy(root, damage: str, uri: str | None = None):
    """A fresh store of synthetic rows (at `uri`, else under `root`) whose second file is damaged."""
    store = write_store(uri or str(root / damage.replace(" ", "-")), GROUPS, 100)
    path = store.files()[1]
    _write(store.location, path, DAMAGES[damage][0](_read(store.location, path)))
    return store, path.rsplit("/", 2)[-2] + "/" + path.rsplit("/", 1)[-1]


def _one_line(err: Exception, store, file: str, pattern: str) -> None:
    text = str(err)
    assert "\n" not in text and text.startswith(f"reference store {store.path}: file {file} is damaged (")
    assert re.search(pattern, text), text
    assert isinstance(err, StoreDamaged) and err.exit_code == 2


def test_pyarrow_alone_reads_the_flipped_log_prob_without_an_error(tmp_path):
    """The threat: a flipped bit in a page decodes to another number unless page checksums are checked."""
    store = write_store(str(tmp_path / "store"), GROUPS, 100)
    path = store.files()[1]
    good = _read(store.location, path)
    bad = _flip_ref_logps(good)
    before = pq.ParquetFile(pa.BufferReader(good)).read_row_group(1)["ref_logps"]
    after = pq.ParquetFile(pa.BufferReader(bad)).read_row_group(1)["ref_logps"]  # no error
    assert not before.equals(after)
    with pytest.raises(OSError, match="CRC checksum verification failed"):
        pq.ParquetFile(pa.BufferReader(bad), page_checksum_verification=True).read_row_group(1)


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_the_driver_index_names_the_damaged_file(tmp_path, damage):
    store, file = _damaged_copy(tmp_path, damage)
    for split in ("train", "eval"):  # train's index, evaluate's read_split
        with pytest.raises(StoreDamaged) as found:
            SplitIndex.build(store, split) if split == "train" else store.read_split(split)
        _one_line(found.value, store, file, DAMAGES[damage][1])


def test_a_truncated_or_missing_file_is_found_by_a_listing(tmp_path):
    store, file = _damaged_copy(tmp_path, "truncated")
    with pytest.raises(StoreDamaged, match=rf"file {file} is damaged \(size \d+, expected \d+\)"):
        check_files(store)
    store.location.fs.delete_file(store.files()[1])
    with pytest.raises(StoreDamaged, match=rf"file {file} is damaged \(missing \(expected \d+ bytes\)\)"):
        check_files(store)


def test_a_worker_meets_a_damaged_kl_completion_page_before_training_on_it(tmp_path):
    """A page damaged after the driver's scan (which reads every column: a row's length needs the KL
    completions): a worker's read of the row group fails in one line, the other groups read on, and
    the next scan names it."""
    store = write_store(str(tmp_path / "store"), GROUPS, 100)
    index = SplitIndex.build(store, "train")
    path = store.files()[1]
    data = bytearray(_read(store.location, path))
    data[_page_end(bytes(data), "kl_completion_ids", group=0)] ^= 0x04
    _write(store.location, path, bytes(data))
    in_file = np.flatnonzero(index.group_file[index.row_group] == 1)
    damaged = [p for p in in_file if index.group_index[index.row_group[p]] == 0]  # its first group
    with RowReader(index) as reader:
        with pytest.raises(StoreDamaged, match="CRC checksum verification failed"):
            reader.take([damaged[0]])
        kept = int(np.flatnonzero(index.group_file[index.row_group] == 0)[0])
        assert reader.take([kept]).num_rows == 1
    with pytest.raises(StoreDamaged, match="CRC checksum verification failed"):
        SplitIndex.build(store, "train")


def test_verify_a_good_and_a_damaged_store(tmp_path):
    good = write_store(str(tmp_path / "good"), GROUPS, 100)
    lines: list[str] = []
    report = verify(good.path, lines.append)
    assert lines == [] and not report.problems
    assert report.summary(good.path).startswith(f"verified reference store {good.path}: 2 files (")
    store, file = _damaged_copy(tmp_path, "a bit of a ref_logps page")
    with pytest.raises(VerifyFailed, match=r"1 problem in 2 files") as failed:
        verify(store.path, lines.append)
    assert failed.value.exit_code == 2
    assert lines == [f"{store.path}: {file}: checksum " + lines[0].rsplit("checksum ", 1)[1]]
    assert lines[0].endswith("(same size)")


@pytest.mark.slow
def test_cli_verify_and_train_on_a_truncated_store_are_one_line_exit_2(tmp_path, built_store):
    """The CLI end to end on a precomputed store: `verify` lists the file, `train` exits 2 in one line
    before Ray starts, and nothing is written into the run dir."""
    cfg, store = built_store
    copy = tmp_path / "store"
    subprocess.run(["cp", "-r", store.path, str(copy)], check=True)
    damaged = open_store(str(copy))
    path = damaged.files()[0]
    _write(damaged.location, path, _truncate(_read(damaged.location, path)))
    file = path[len(str(copy)) + 1 :]
    tree = cfg.model_dump(mode="json")
    tree["store"]["path"] = str(copy)
    tree["run"] |= {"dir": str(tmp_path / "runs"), "name": "damaged"}
    config = tmp_path / "cfg.yaml"
    config.write_text(yaml.safe_dump(tree))

    run = lambda *args: subprocess.run(  # noqa: E731
        [sys.executable, "-m", "kto_ray", *args], cwd=REPO, capture_output=True, text=True
    )
    checked = run("verify", str(copy))
    assert checked.returncode == 2, checked.stderr
    assert checked.stdout.splitlines() == [
        f"{copy}: {file}: size {len(_read(damaged.location, path))}, expected {damaged.entry(path).size}"
    ]
    assert checked.stderr.strip().startswith(f"kto-ray: error: verify {copy}: 1 problem in ")
    trained = run("train", "--config", str(config))
    assert trained.returncode == 2, trained.stderr
    assert trained.stderr.strip().splitlines() == [
        f"kto-ray: error: reference store {copy}: file {file} is damaged (size "
        f"{len(_read(damaged.location, path))}, expected {damaged.entry(path).size}); check it with "
        f"`kto-ray verify {copy}` and rebuild it with `kto-ray precompute --overwrite`"
    ]
    assert not (tmp_path / "runs" / "damaged" / "checkpoints").exists()
    assert not (tmp_path / "runs" / "damaged" / "metrics.jsonl").exists()


@pytest.fixture(scope="module")
def s3():
    with s3_server() as server, pytest.MonkeyPatch.context() as patch:
        for key, value in server.environment().items():
            patch.setenv(key, value)
        server.create_bucket("kto")
        yield server


@pytest.mark.parametrize("damage", ["truncated", "64 flipped bytes", "a bit of a ref_logps page"])
def test_on_s3_the_damaged_file_is_named_and_verify_lists_it(s3, damage):
    uri = f"s3://kto/stores/{damage.replace(' ', '-')}"
    store, file = _damaged_copy(None, damage, uri)
    with pytest.raises(StoreDamaged) as found:
        SplitIndex.build(store, "train")
    _one_line(found.value, store, file, DAMAGES[damage][1])
    lines: list[str] = []
    with pytest.raises(VerifyFailed):
        verify(uri, lines.append)
    assert len(lines) == 1 and lines[0].startswith(f"{uri}: {file}: ")
