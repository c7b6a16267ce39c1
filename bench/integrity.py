"""What the integrity checks cost (issue 31): the worker's reader with and without verification, the
driver's index scan with and without the extra verified columns, and a checkpoint save with and
without its file list (sizes and CRC-32s).

- reader: `RowReader.take` of random micro-batches (16 rows, each from another row group, as a
  shuffled schedule draws them; cache 16 MiB as a worker's), rows/s, with verification (every page's
  CRC checked by pyarrow, each file's size and footer CRC checked at open) and without (the same store
  read with `page_checksum_verification` off and no footer check). Alternating rounds; the median.
- index: `SplitIndex.build` of the train split, seconds, with the three verified columns (`kl_id`,
  `ref_logps`, `ref_kl_logps`, read only so their page checksums are checked on the driver) and
  without.
- commit: `store.list_files` of the store's prefix (what precompute's commit adds: every file read
  back, its CRC-32 and its footer's), seconds.
- checkpoint: `torch.save` of a state dict of `--checkpoint-mib` MiB into a fresh folder (what
  DeepSpeed's save does per rank), then `write_file_list` (each rank's CRC-32 of its files, in
  parallel across ranks: one rank's cost is the added wall time), seconds.

Synthetic store (tests.helpers.write_store): `--rows` rows of 100-300 prompt, completion and KL tokens,
files of 4,096 rows, row groups of 256 (precompute's), local disk.

    .venv/bin/python bench/integrity.py [--rows 40000] [--takes 400] [--rounds 5] [--checkpoint-mib 1024]
    .venv/bin/python bench/integrity.py --smoke
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kto_ray.integrity import write_file_list
from kto_ray.store import format as store
from kto_ray.store import reader
from tests.helpers import write_store

FILE_ROWS, GROUP_ROWS, MICRO_BATCH = 4096, 256, 16


def _unverified(opened: store.Store) -> store.Store:
    """The same store read without page checksums or footer CRCs (sizes are free: kept)."""
    files = [f.model_copy(update={"footer_crc32": None}) for f in opened.manifest.files]
    return store.Store(opened.path, opened.manifest.model_copy(update={"files": files}))


def _reader_rows_per_s(index: reader.SplitIndex, takes: int, seed: int) -> tuple[float, float]:
    """Rows per wall second and rows per CPU second (all threads: steadier on a shared machine)."""
    rng = np.random.default_rng(seed)
    batches = [rng.choice(index.rows, MICRO_BATCH, replace=False) for _ in range(takes)]
    with reader.RowReader(index) as rows:
        began, cpu = time.perf_counter(), time.process_time()
        for batch in batches:
            rows.take(batch)
        wall, cpu = time.perf_counter() - began, time.process_time() - cpu
    return takes * MICRO_BATCH / wall, takes * MICRO_BATCH / cpu


def bench_reader(opened: store.Store, takes: int, rounds: int) -> dict[str, list[tuple[float, float]]]:
    checked = reader.SplitIndex.build(opened, "train")
    plain = reader.SplitIndex.build(_unverified(opened), "train")
    found: dict[str, list[tuple[float, float]]] = {"verified": [], "unverified": []}
    for r in range(rounds):
        found["verified"].append(_reader_rows_per_s(checked, takes, r))
        with mock.patch.object(store, "READ_OPTIONS", {"page_checksum_verification": False}):
            found["unverified"].append(_reader_rows_per_s(plain, takes, r))
    return found


def bench_index(opened: store.Store, rounds: int) -> dict[str, list[float]]:
    found: dict[str, list[float]] = {"verified columns": [], "index columns only": []}
    for _ in range(rounds):
        began = time.perf_counter()
        reader.SplitIndex.build(opened, "train")
        found["verified columns"].append(time.perf_counter() - began)
        with (
            mock.patch.object(reader, "_VERIFIED_COLUMNS", []),
            mock.patch.object(store, "READ_OPTIONS", {"page_checksum_verification": False}),
        ):
            began = time.perf_counter()
            reader.SplitIndex.build(_unverified(opened), "train")
            found["index columns only"].append(time.perf_counter() - began)
    return found


def bench_checkpoint(mib: int, rounds: int, root: Path) -> dict[str, list[float]]:
    found: dict[str, list[float]] = {"save": [], "file list": []}
    state = {f"w{i}": torch.randn(mib * 2**20 // 4 // 8) for i in range(8)}  # 8 tensors, `mib` MiB
    for r in range(rounds):
        folder = root / f"ckpt-{r}"
        folder.mkdir()
        began = time.perf_counter()
        torch.save(state, folder / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
        found["save"].append(time.perf_counter() - began)
        began = time.perf_counter()
        write_file_list(folder, 1, 0, 1)
        found["file list"].append(time.perf_counter() - began)
        for path in folder.iterdir():
            path.unlink()
        folder.rmdir()
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=40_000)
    parser.add_argument("--takes", type=int, default=400)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--checkpoint-mib", type=int, default=1024)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: the code path only")
    args = parser.parse_args()
    if args.smoke:
        args.rows, args.takes, args.rounds, args.checkpoint_mib = 2 * FILE_ROWS, 20, 1, 8
    with tempfile.TemporaryDirectory(prefix="kto-bench-integrity-") as tmp:
        root = Path(tmp)
        files = -(-args.rows // FILE_ROWS)
        opened = write_store(
            str(root / "store"),
            [GROUP_ROWS] * files,
            FILE_ROWS,
            rows=args.rows,
            lengths=((100, 300), (100, 300), (100, 300)),
            train_fraction=0.9,
        )
        size = sum(f.size for f in opened.manifest.files) / 2**20
        print(f"store: {args.rows:,} rows, {files} files, {size:,.0f} MiB; load {os.getloadavg()[0]:.1f}")
        print("\n| reader (RowReader.take, 16 random rows) | rows/s | rows per CPU s | rounds (rows/s) |")
        print("| --- | --- | --- | --- |")
        readers = bench_reader(opened, args.takes, args.rounds)
        medians = {}
        for name, values in readers.items():
            wall = statistics.median(v[0] for v in values)
            cpu = statistics.median(v[1] for v in values)
            medians[name] = (wall, cpu)
            rounds = ", ".join(f"{v[0]:,.0f}" for v in values)
            print(f"| {name} | {wall:,.0f} | {cpu:,.0f} | {rounds} |")
        wall = medians["verified"][0] / medians["unverified"][0]
        cpu = medians["verified"][1] / medians["unverified"][1]
        print(f"verified / unverified: rows/s {wall:.3f}, rows per CPU s {cpu:.3f}")
        print("\n| driver index scan (SplitIndex.build, train) | seconds (median) | all rounds |")
        print("| --- | --- | --- |")
        for name, values in bench_index(opened, args.rounds).items():
            print(f"| {name} | {statistics.median(values):.3f} | {', '.join(f'{v:.3f}' for v in values)} |")
        print(f"\n| checkpoint of {args.checkpoint_mib} MiB (one rank) | seconds (median) | all rounds |")
        print("| --- | --- | --- |")
        saved = bench_checkpoint(args.checkpoint_mib, args.rounds, root)
        for name, values in saved.items():
            print(f"| {name} | {statistics.median(values):.3f} | {', '.join(f'{v:.3f}' for v in values)} |")
        share = statistics.median(saved["file list"]) / statistics.median(saved["save"])
        print(f"file list / save: {share:.3f}")
        listed = []
        for _ in range(args.rounds):
            began = time.perf_counter()
            store.list_files(opened.location, "data-test")
            listed.append(time.perf_counter() - began)
        print(
            f"\nprecompute's commit, the store's files read back and checksummed ({size:,.0f} MiB): "
            f"{statistics.median(listed):.3f} s (median of {args.rounds}); load {os.getloadavg()[0]:.1f}"
        )


if __name__ == "__main__":
    main()
