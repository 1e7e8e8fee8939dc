"""`fine-tune-llm evaluate RUN_DIR`: base vs tuned on the held-out split."""

from __future__ import annotations

import argparse


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", help="a run directory made by `fine-tune-llm train` (its config, saved splits and adapter/)")
    p.add_argument("--split", default="test", choices=["test", "validation", "train"],
                   help="held-out test split by default: never trained on, never used to pick a checkpoint")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--n-generations", type=int, default=None,
                   help="held-out questions every column answers, one per near-duplicate cluster (default: the "
                        "run's eval_generations: 100, 30 on the smollm2-135m preset)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--metrics-dir", default=None, help="where runs.csv gets its row (default: the run's metrics_dir)")
    p.add_argument("--seed", type=int, default=0, help="seed for sampled generations and the bootstrap")
    p.add_argument("--quantized", action="store_true",
                   help="score the 4-bit base as trained instead of the released (unquantized) weights; labelled so")
    p.add_argument("--tasks", default=None,
                   help="also run EleutherAI's lm-evaluation-harness on every column: comma-separated lm-eval task "
                        "names, task YAML files (local data works offline), a YAML file listing them, or "
                        "heldout_pairs (the split's preference pairs as a two-choice task); needs `make install-eval`")
    p.add_argument("--judge", default=None, metavar="MODEL",
                   help="also compare the columns' answers with a stronger model, pairwise, in both orders: a Hub id "
                        "or local folder, a .gguf file, or an OpenAI-compatible URL (key from FINE_TUNE_LLM_JUDGE_KEY)")
    p.add_argument("--no-judges", action="store_true",
                   help="skip the reward-model judge and the safety probe (they train and generate: minutes on a CPU)")
    p.add_argument("--limit", type=_positive, default=None,
                   help="with --tasks: the first N items of each task only (a quick look, not a score)")


def run(args: argparse.Namespace) -> int:
    """Perplexity, preference margin and generations: base vs each tuned stage; writes report.json/.md."""
    from ..run import RunDir
    from ..run_lock import hold

    if args.tasks:
        from ..eval.harness import require_lm_eval

        require_lm_eval()  # the optional group, named at once, before the run is even read
    run = RunDir.of(args.run_dir)
    run.read_config()  # a folder that is no run is named before anything loads
    # Held before torch is imported, so a second writer of this run directory stops in a second or two.
    with hold(run, "evaluation", create=False):
        from ..eval.evaluate import evaluate_run

        report = evaluate_run(run, split=args.split, batch_size=args.batch_size,
                              n_generations=args.n_generations, max_new_tokens=args.max_new_tokens,
                              metrics_dir=args.metrics_dir, seed=args.seed, quantized=args.quantized,
                              tasks=args.tasks, limit=args.limit, judge=args.judge, judges=not args.no_judges)
    print(summary(report))
    return 0


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def summary(report: dict) -> str:
    """The report as a small table: one column per model (base, SFT, SFT+DPO)."""
    labels = report.get("columns") or {"base": "base", "tuned": "tuned"}
    m, names = report["metrics"], list(report.get("columns") or ["base", "tuned"])
    rows = [("perplexity", "perplexity"), ("bits per byte", "bits_per_byte"),
            ("pref. accuracy (normalized)", "accuracy_normalized"), ("pref. accuracy (raw sum)", "accuracy_sum"),
            ("mean margin (nats/token)", "mean_margin")]
    base = m["base"]
    lines = [(f"\n{report['run']}: {report['settings']['split']} split, {base['answers']} answers, "
             f"{base.get('pairs', 0)} pairs; {report['settings'].get('weights', '')}"),
             f"  {'':30s}" + "".join(f"{labels[n]:>16s}" for n in names)]
    lines += [f"  {label:30s}" + "".join(f"{m[n][key]:16.4f}" for n in names) for label, key in rows if key in base]
    if base.get("pairs"):
        cis = ["[{:.2f}, {:.2f}]".format(*m[n]["margin_ci95"]) for n in names]
        lines.append(f"  {'margin 95% CI':30s}" + "".join(f"{c:>16s}" for c in cis))
    elif report["settings"].get("no_pairs"):
        lines.append(f"  no preference metrics: {report['settings']['no_pairs']}")
    lengths = report.get("generation_lengths") or {}
    if lengths:
        lines.append(f"  {'greedy answer tokens (mean)':30s}"
                     + "".join(f"{(lengths[n]['mean_new_tokens'] or 0):16.1f}" for n in names))
        lines.append(f"  {'greedy answers that ended':30s}"
                     + "".join(f"{str(lengths[n]['ended_turn']) + '/' + str(lengths[n]['answers']):>16s}"
                               for n in names))
    lines += harness_summary(report)
    lines.append(f"  report: {report['run_dir']}/report.md")
    if report.get("plot"):
        lines.append(f"  plot:   {report['plot']}")
    return "\n".join(lines)


def harness_summary(report: dict) -> list[str]:
    """The harness table's top rows: task/metric, a value per column, each change and its flag."""
    h = report.get("harness")
    if not h:
        return []
    labels = report.get("columns") or {}
    names = h["columns"]
    lines = [f"  {'lm-eval task/metric':30s}" + "".join(f"{labels.get(n, n):>16s}" for n in names)
             + "".join(f"{'change ' + labels.get(n, n):>22s}" for n in names[1:])]
    for r in (r for r in h["rows"] if r["top"]):
        values = "".join(f"{r['values'][n]:16.4f}" if r["values"].get(n) is not None else f"{'n/a':>16s}"
                         for n in names)
        changes = "".join(f"{_change(r['changes'].get(n)):>22s}" for n in names[1:])
        lines.append(f"  {(r['task'] + '/' + r['metric'])[:30]:30s}{values}{changes}")
    return lines


def _change(c: dict | None) -> str:
    if not c:
        return "n/a"
    se = f"±{c['stderr']:.4f}" if c["stderr"] is not None else ""
    return f"{c['change']:+.4f}{se}" + (" DROP" if c["flagged"] else "")
