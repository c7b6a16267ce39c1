"""`kto-ray` command line: parse, build, run, close. User errors exit 2 with one line, no traceback."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from kto_ray import console
from kto_ray.config import load_config
from kto_ray.errors import KtoRayError
from kto_ray.rundir import RunDir

DEFAULT_CONFIG = "configs/demo.yaml"


def _command(sub, name: str, help_text: str) -> argparse.ArgumentParser:
    """A subcommand that reads the run config, with the options every such command takes."""
    parser = sub.add_parser(name, help=help_text)
    parser.add_argument("--config", help=f"YAML run config (default: {DEFAULT_CONFIG} when present)")
    parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="show Ray, Ray Data, DeepSpeed and transformers output (or set KTO_RAY_VERBOSE=1)",
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set train.beta=0.2 (repeatable)",
    )
    return parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kto-ray", description="KTO alignment on Ray with a precomputed reference store"
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _command(sub, "demo", "build the tiny model and data, precompute, train, evaluate before/after")
    _command(sub, "precompute", "compute reference log-probs once into the reference store").add_argument(
        "--overwrite", action="store_true", help="replace a store built for another config"
    )
    _command(sub, "train", "train the policy with KTO on Ray Train + DeepSpeed")
    evaluate = _command(sub, "evaluate", "held-out KTO metrics of a model against the store's eval split")
    evaluate.add_argument("--model", help="model folder or hub id to evaluate (default: the policy)")
    evaluate.add_argument("--json", dest="json_out", help="also write the metrics to this JSON file")
    evaluate.add_argument(
        "--generate",
        type=int,
        default=0,
        metavar="N",
        help="also write N eval prompts with the model's and the reference's completions, side by side, "
        "to samples.jsonl and samples.md in the run dir",
    )
    evaluate.add_argument(
        "--temperature", type=float, default=0.0, help="with --generate: 0 = greedy (default), else sampled"
    )
    evaluate.add_argument("--seed", type=int, default=0, help="with --generate: the sampling seed")
    _command(sub, "pipeline", "precompute (or reuse) the store, train, evaluate the trained model: one job")
    plan = _command(sub, "plan", "per-GPU memory of ZeRO-3 training, GPUs needed, offload advice")
    plan.add_argument(
        "--model-config", help="architecture (config.json or its folder) to plan for, instead of the model's"
    )
    plan.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per node (default: 8)")
    plan.add_argument("--gpu-memory", type=float, default=80.0, help="GiB per GPU (default: 80)")
    sweep = _command(
        sub, "sweep", "many training runs on one store through Ray Tune (grid, random draws, early stopping)"
    )
    sweep.add_argument("--sweep", dest="sweep_file", help="sweep YAML (grid, sample, scheduler, ...)")
    sweep.add_argument(
        "--grid",
        action="append",
        default=[],
        metavar="KEY=V1,V2",
        help="a grid key and its values, e.g. --grid train.beta=0.05,0.1,0.2 (repeatable)",
    )
    sweep.add_argument(
        "--sample",
        action="append",
        default=[],
        metavar="KEY=DIST:LOW:HIGH",
        help="a key drawn at random (uniform, loguniform, int), e.g. --sample train.lr=loguniform:1e-6:1e-4",
    )
    verify = sub.add_parser(
        "verify",
        help="check every file of a reference store, a run dir (checkpoints, final/) or a sweep folder "
        "against its manifest (sizes and checksums); one line per problem, exit 2 when any",
    )
    verify.add_argument("path", help="store, run dir or sweep folder: a local path or an s3:// URI")
    verify.add_argument(
        "-v", "--verbose", action="store_true", help="show Ray, DeepSpeed and transformers output"
    )
    report = _command(sub, "report", "plots and a markdown summary of a training run or a sweep")
    report.add_argument("run_dir", nargs="?", help="run folder (default: the config's run.dir/run.name)")
    report.add_argument("--out", help="output folder (default: RUN_DIR/report)")
    report.add_argument("--tensorboard", help="also write TensorBoard events to this folder")
    return parser


def run(args: argparse.Namespace) -> int:
    if args.command == "verify":  # no config: a path is all it needs
        from kto_ray.tools.verify import verify

        print(verify(args.path).summary(args.path))
        return 0
    path = args.config
    if path is None and Path(DEFAULT_CONFIG).is_file():
        path = DEFAULT_CONFIG
    cfg = load_config(path, args.overrides)
    # Ray is joined (the job's cluster under `ray job submit`) or started only after the inputs check out.
    if args.command == "plan":
        from kto_ray.planning.advice import format_plan
        from kto_ray.planning.plan import plan

        found = plan(
            cfg,
            model_config=args.model_config,
            gpus_per_node=args.gpus_per_node,
            gpu_memory_gib=args.gpu_memory,
        )
        print(format_plan(found))
    elif args.command == "report":
        from kto_ray.sweep.report import is_sweep_dir, write_sweep_report
        from kto_ray.tools.report import write_report, write_tensorboard

        run_dir = RunDir(args.run_dir) if args.run_dir else RunDir.of(cfg)
        out = Path(args.out) if args.out else None
        if is_sweep_dir(run_dir):
            figures, summary = write_sweep_report(run_dir, out)
            print(f"report of the sweep {run_dir}: {summary} ({len(figures)} figures)")
        else:
            result = write_report(run_dir, out)
            print(f"report of {run_dir}: {result.summary}")
            for problem in result.problems:
                print(f"warning: {problem}")
            if args.tensorboard:
                write_tensorboard(run_dir, Path(args.tensorboard))
    elif args.command == "sweep":
        from kto_ray.sweep.config import load_sweep
        from kto_ray.sweep.run import run_sweep

        run_sweep(cfg, load_sweep(args.sweep_file, args.grid, args.sample))
    elif args.command == "demo":
        from kto_ray.tools.demo import run_demo

        run_demo(cfg)
    elif args.command == "precompute":
        from kto_ray.reference.precompute import precompute

        precompute(cfg, overwrite=args.overwrite)
    elif args.command == "train":
        from kto_ray.training.launch.driver import train

        result = train(cfg)
        print(f"trained {result.steps} steps; run dir {result.run_dir}")
    elif args.command == "evaluate":
        from kto_ray.tools.evaluate import evaluate, format_table

        metrics = evaluate(cfg, args.model)
        print(format_table({args.model or cfg.model.path: metrics}))
        if args.json_out:
            Path(args.json_out).write_text(json.dumps(metrics, indent=2))
        else:
            print(json.dumps(metrics))
        if args.generate > 0:
            from kto_ray.tools.samples import write_samples

            jsonl, markdown = write_samples(cfg, args.generate, args.model, args.temperature, args.seed)
            print(f"samples: {jsonl} and {markdown}")
    elif args.command == "pipeline":
        from kto_ray.tools.pipeline import run_pipeline

        run_pipeline(cfg)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    console.configure(args.verbose)
    try:
        return run(args)
    except KtoRayError as err:
        print(f"kto-ray: error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:  # train says more (errors.Interrupted): the step and its checkpoint
        print("kto-ray: interrupted", file=sys.stderr)
        return 130
