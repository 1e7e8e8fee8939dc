"""`fine-tune-llm`: train, demo, evaluate, release, export-metrics, data.

Start-up imports no ML library: each command imports what it needs when it runs, so `--help` and the light
commands start at once (TRL alone is slow to import: docs/results.md#start-up-and-small-kernels).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from collections.abc import Callable

from ..config import PRESETS, TrainConfig, add_config_arguments, field_names, make_config
from ..console import quiet_libraries
from ..errors import FineTuneError
from . import data as data_cli
from . import evaluate as evaluation_cli
from . import release as release_cli

log = logging.getLogger("fine_tune_llm")


def train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="gemma-2b-it", choices=list(PRESETS),
                   help="starting values: gemma-2b-it (CUDA GPU), smollm2-135m (a real small model on CPU), tiny "
                        "(offline, seconds)")
    p.add_argument("--config", help="YAML file of option: value, applied over the preset (flags win over it)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--resume", dest="resume", action="store_const", const=True, default=None,
                   help="continue from the last complete checkpoint (default: automatic when one exists)")
    g.add_argument("--no-resume", dest="resume", action="store_const", const=False, help="start fresh")
    p.add_argument("--dry-run", action="store_true",
                   help="print the expected peak GPU memory of this config (and whether it fits this GPU), then stop")
    add_config_arguments(p.add_argument_group("training options (each overrides the preset and --config)"))


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    overrides = {name: getattr(args, name) for name in field_names() if name != "preset" and hasattr(args, name)}
    if overrides.get("stage") == "dpo":  # the preference stage starts from its SFT run's settings
        from ..train.lineage import preference_config

        if not overrides.get("sft_run"):
            raise FineTuneError("--stage dpo needs --sft-run RUN_DIR: the SFT run whose adapter it continues")
        return preference_config(overrides.pop("sft_run"), args.config, **overrides)
    return make_config(args.preset, args.config, **overrides)


def cmd_train(args: argparse.Namespace) -> int:
    """Fine-tune with QLoRA (--stage sft, the default) or continue an SFT run on preference pairs (--stage dpo)."""
    cfg = config_from_args(args)
    if args.dry_run:
        from ..model.hardware import visible_gpu_bytes
        from ..train.memory_estimate import dry_run

        print(dry_run(cfg).summary(visible_gpu_bytes()))
        return 0
    from ..run_lock import hold, is_main_process

    t0 = time.time()
    # Held before TRL is imported, so a second writer of this run directory stops in seconds; train() holds it too.
    with hold(cfg.output_dir, "preference training" if cfg.stage == "dpo" else "training"):
        if cfg.stage == "dpo":
            from ..train.preference import train_preference as train
        else:
            from ..train.sft import train
        result = train(cfg, resume=args.resume)
    if is_main_process():  # under `accelerate launch`, one report, not one per process
        print(training_summary(result, time.time() - t0))
    return 130 if result.interrupted else 0


def demo_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--output-dir", default="runs/tiny-demo", help="the demo's run directory (replaced each time)")
    p.add_argument("--max-steps", type=int, default=None, help="optimizer steps (default: the tiny preset's)")
    p.add_argument("--metrics-dir", default=None,
                   help="where the curves' CSVs go (default: OUTPUT_DIR/metrics, so the checkout stays clean)")
    p.add_argument("--imgs-dir", default=None, help="where the loss plot goes (default: OUTPUT_DIR/imgs)")


def cmd_demo(args: argparse.Namespace) -> int:
    """The whole job offline on CPU: tiny Gemma, 4-bit + LoRA, the shipped sample; train, export, evaluate."""
    from ..run import RunDir
    from ..run_lock import hold

    run = RunDir.of(args.output_dir)
    cfg = make_config("tiny", output_dir=args.output_dir, max_steps=args.max_steps,
                      metrics_dir=args.metrics_dir or str(run.metrics_dir), imgs_dir=args.imgs_dir or str(run.imgs_dir))
    with hold(run, "demo"):  # emptied, trained and evaluated by this process alone
        return _demo(run, cfg)


def _demo(run, cfg: TrainConfig) -> int:
    from ..eval.evaluate import evaluate_run
    from ..train.sft import train

    if run.exists():  # the demo always starts fresh: an old run's event files would mix into its curves
        run.clear()
    t0 = time.time()
    result = train(cfg, resume=False)
    print(training_summary(result, time.time() - t0))
    report = evaluate_run(run, split="test", n_generations=2, max_new_tokens=48, metrics_dir=cfg.metrics_dir)
    print(evaluation_cli.summary(report))
    print("\nwritten:")
    for name, path in {"report": run.report_md, **result.exported, "adapter": run.adapter_dir}.items():
        print(f"  {name:22s}{path}")
    print(f"  {'tensorboard':22s}tensorboard --logdir {run.logs_dir}")
    print(f"\ndone in {time.time() - t0:.0f} s")
    return 0


def training_summary(result, seconds: float) -> str:
    first = next((h["loss"] for h in result.log_history if "loss" in h), None)
    lines = [f"\ntrained {result.global_step} steps in {seconds:.0f} s"
             + (" (interrupted: checkpoint and adapter saved)" if result.interrupted else "")]
    lines.append(f"  train loss: {first:.4f} -> {result.train_loss:.4f}" if first is not None else "  train loss: n/a")
    lines.append(f"  eval loss:  {result.eval_loss:.4f}" if result.eval_loss is not None else "  eval loss: n/a")
    lines.append(f"  adapter:      {result.adapter_dir}")
    lines.append(f"  tensorboard:  tensorboard --logdir {result.run.logs_dir}")
    return "\n".join(lines)


def export_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir")
    p.add_argument("--metrics-dir", default="metrics")
    p.add_argument("--imgs-dir", default="imgs")


def cmd_export(args: argparse.Namespace) -> int:
    """TensorBoard curves -> metrics/*.csv, and the loss plot -> imgs/."""
    from ..train.tensorboard_export import export_run

    for name, path in export_run(args.run_dir, args.metrics_dir, args.imgs_dir).items():
        print(f"{name}: {path}")
    return 0


# name -> (arguments, what runs, one-line help)
COMMANDS: dict[str, tuple[Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]] = {
    "train": (train_args, cmd_train),
    "demo": (demo_args, cmd_demo),
    "evaluate": (evaluation_cli.add_args, evaluation_cli.run),
    "release": (release_cli.add_args, release_cli.run),
    "export-metrics": (export_args, cmd_export),
    "data": (data_cli.add_args, data_cli.run),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fine-tune-llm", description=__doc__.split("\n")[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging and full tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (add_args, fn) in COMMANDS.items():
        doc = (fn.__doc__ or "").strip().split("\n")[0]
        p = sub.add_parser(name, help=doc, description=doc)
        add_args(p)
        p.set_defaults(func=fn)
    return parser


def main(argv: list[str] | None = None) -> int:
    quiet_libraries()  # before the parser imports transformers
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

        from ..errors import redact

        print(redact(traceback.format_exc()), file=sys.stderr, end="")
        return 1


if __name__ == "__main__":
    sys.exit(main())
