"""`fine-tune-llm` command line: train, demo, export-metrics (evaluate and release register themselves)."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import time
from typing import Any, Callable

from .config import PRESETS, TrainConfig, make_config
from .errors import FineTuneError

log = logging.getLogger("fine_tune_llm")
COMMANDS: dict[str, tuple[Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]] = {}


def command(name: str, add_args: Callable[[argparse.ArgumentParser], None]):
    """Register a subcommand: modules add theirs without this file knowing them."""
    def wrap(fn):
        COMMANDS[name] = (add_args, fn)
        return fn
    return wrap


def add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="gemma-2b-it", help=f"one of: {', '.join(PRESETS)}")
    p.add_argument("--config", help="YAML file of option: value, applied over the preset")
    for f in dataclasses.fields(TrainConfig):
        if f.name != "preset":
            p.add_argument("--" + f.name.replace("_", "-"), dest=f.name, default=None, metavar="VALUE",
                           help=argparse.SUPPRESS)
    p.epilog = "Every config option is a flag too, e.g. --learning-rate 1e-4 --data-samples 200."


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)
                 if f.name != "preset" and getattr(args, f.name, None) is not None}
    return make_config(args.preset, args.config, **overrides)


def _train_args(p: argparse.ArgumentParser) -> None:
    add_config_args(p)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--resume", dest="resume", action="store_const", const=True, default=None,
                   help="continue from the last complete checkpoint (default: automatic when one exists)")
    g.add_argument("--no-resume", dest="resume", action="store_const", const=False, help="start fresh")


@command("train", _train_args)
def cmd_train(args: argparse.Namespace) -> int:
    from .training import is_main_process, train

    cfg = config_from_args(args)
    t0 = time.time()
    result = train(cfg, resume=args.resume)
    if is_main_process():  # under `accelerate launch`, one report, not one per process
        report_training(result, time.time() - t0)
    return 130 if result.interrupted else 0


@command("demo", lambda p: (p.add_argument("--output-dir", default="runs/tiny-demo"),
                            p.add_argument("--max-steps", type=int, default=None)))
def cmd_demo(args: argparse.Namespace) -> int:
    """The embedded default: the tiny Gemma, 4-bit, on the shipped sample data, offline, on CPU."""
    from .training import train

    overrides: dict[str, Any] = {"output_dir": args.output_dir}
    if args.max_steps:
        overrides["max_steps"] = args.max_steps
    cfg = make_config("tiny", **overrides)
    _clear_previous_demo(cfg.output_dir)
    t0 = time.time()
    result = train(cfg, resume=False)
    report_training(result, time.time() - t0)
    return 0


def _clear_previous_demo(output_dir: str) -> None:
    """The demo always starts fresh: an old run's event files would otherwise mix into its curves."""
    import shutil
    from pathlib import Path

    run = Path(output_dir)
    if (run / "config.yaml").is_file():
        shutil.rmtree(run)


def report_training(result, seconds: float) -> None:
    first = next((h["loss"] for h in result.log_history if "loss" in h), None)
    print(f"\ntrained {result.global_step} steps in {seconds:.0f} s"
          + (" (interrupted: checkpoint and adapter saved)" if result.interrupted else ""))
    print(f"  train loss: {first:.4f} -> {result.train_loss:.4f}" if first is not None else "  train loss: n/a")
    print(f"  eval loss:  {result.eval_loss:.4f}" if result.eval_loss is not None else "  eval loss: n/a")
    print(f"  adapter:      {result.adapter_dir}")
    print(f"  tensorboard:  tensorboard --logdir {result.run_dir / 'logs'}")


@command("export-metrics", lambda p: (p.add_argument("run_dir"), p.add_argument("--metrics-dir", default="metrics"),
                                      p.add_argument("--imgs-dir", default="imgs")))
def cmd_export(args: argparse.Namespace) -> int:
    from .metrics import export_run

    for name, path in export_run(args.run_dir, args.metrics_dir, args.imgs_dir).items():
        print(f"{name}: {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    _load_plugins()
    parser = argparse.ArgumentParser(prog="fine-tune-llm", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging and full tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (add_args, fn) in COMMANDS.items():
        p = sub.add_parser(name, help=(fn.__doc__ or "").strip().split("\n")[0] or None)
        add_args(p)
        p.set_defaults(func=fn)
    return parser


def _load_plugins() -> None:
    import importlib

    for module in ("evaluation_cli", "release_cli"):
        try:
            importlib.import_module(f"{__package__}.{module}")
        except ModuleNotFoundError as exc:
            if exc.name != f"{__package__}.{module}":
                raise


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        return args.func(args)
    except FineTuneError as exc:
        if args.verbose:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Exception:  # a bug or a library failure: keep the traceback, minus any Hub token it may quote
        if args.verbose:
            raise
        import traceback

        from .errors import redact

        print(redact(traceback.format_exc()), file=sys.stderr, end="")
        return 1


if __name__ == "__main__":
    sys.exit(main())
