"""What an append costs next to a full precompute.

The data is `--rows` generated rows; the first (1 - `--new`) of them are the old file, the rest the new
one. Per round: a full precompute of both files into a fresh store, then a precompute of the old file
alone into another fresh store followed by the append of the new file to it (the figure). Each call is
timed end to end (reading and checking all rows, Ray Data start-up, actor model load, scoring,
writing, commit) on a local Ray started beforehand. The rows scored are the store's own counts.

    .venv/bin/python bench/append_cost.py [--rows 4096] [--new 0.1] [--actors 1] [--rounds 2] [--smoke]
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import common


def _precompute(cfg, name: str, files: list[Path]) -> tuple[float, int, int, int]:
    """Seconds of one precompute of `files` into store `name`, the rows it scored, the store's rows,
    the tokens it scored."""
    from kto_ray.reference.precompute import precompute

    cfg = cfg.model_copy(deep=True)
    cfg.store.path = str(Path(cfg.store.path).with_name(name))
    cfg.data.paths = [str(f) for f in files]
    with common.timed() as wall:
        store = precompute(cfg).store
    manifest = store.manifest
    scored = sum(sum(c.values()) for c in manifest.segments[-1].counts.values())
    rows = sum(sum(c.values()) for c in manifest.counts.values())
    return wall[0], scored, rows, manifest.segments[-1].tokens


def main() -> None:
    spec = common.SPECS[args.model]
    model = common.build_model(spec)
    data = common.write_dataset("uniform", args.rows)
    root = common.scratch_dir("bench-append-")
    lines = data.read_text().splitlines(keepends=True)
    cut = round(len(lines) * (1 - args.new))
    old, new = root / "old.jsonl", root / "new.jsonl"
    old.write_text("".join(lines[:cut]))
    new.write_text("".join(lines[cut:]))
    cfg = common.bench_config(
        model,
        data,
        root,
        precompute={"actors": args.actors, "cpus_per_actor": 1.0},
    )
    print(f"machine: {common.machine_line()}")
    print(f"model {spec.name}: {common.count_parameters(model):,} parameters")
    print(f"data: {len(lines)} rows ({cut} old + {len(lines) - cut} new), {common.length_summary(data)}")
    common.ray_init()
    table, ratios, fulls, full_rates, appended_tokens = [], [], [], [], []
    for r in range(args.rounds):
        full, full_rows, _, full_tokens = _precompute(cfg, f"full-{r}", [old, new])
        base, base_rows, _, _ = _precompute(cfg, f"grown-{r}", [old])
        append, appended_rows, total, append_tokens = _precompute(cfg, f"grown-{r}", [old, new])
        assert total == full_rows, (total, full_rows)
        ratios.append(append / full)
        fulls.append(full)
        full_rates.append(full_tokens / full)
        appended_tokens.append(append_tokens)
        table += [
            [f"full precompute #{r + 1}", full_rows, full_rows, full, ""],
            [f"precompute of the old rows #{r + 1}", base_rows, base_rows, base, f"{base / full:.2f}"],
            [f"append of the new rows #{r + 1}", appended_rows, total, append, f"{append / full:.2f}"],
        ]
    common.print_table(
        ["run", "rows scored", "store rows", "wall s", "/ full"],
        table,
        title=f"append of {args.new:.0%} new rows vs a full precompute, {args.actors} actor(s) x 1 CPU",
    )
    print(f"append / full precompute wall time: {statistics.mean(ratios):.2f} (rows: {args.new:.2f})")
    # The append's tokens at the full build's tokens/s: what its rows alone cost; the rest is the
    # start-up every precompute pays (Ray Data, actor and model load, reading and checking all rows).
    scoring = statistics.mean(appended_tokens) / statistics.mean(full_rates)
    append_wall = statistics.mean(r * f for r, f in zip(ratios, fulls))
    print(
        f"the append's rows at the full build's tokens/s: {scoring:.1f} s "
        f"({scoring / statistics.mean(fulls):.2f} of the full build); start-up: {append_wall - scoring:.1f} s"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--new", type=float, default=0.1, help="share of the rows that are new")
    parser.add_argument("--actors", type=int, default=1, choices=(1, 2))
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--model", default="small", choices=sorted(common.SPECS))
    smoke = {"rows": 80, "rounds": 1, "model": "tiny"}
    args = common.parse_args(parser, smoke)
    main()
