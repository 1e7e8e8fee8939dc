"""TensorBoard scalars -> CSV files in metrics/ (TensorBoard's own columns) and a loss plot in imgs/."""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

from ..files import replaced
from ..run import RunDir

# TensorBoard tag -> CSV stem: the curves a user compares between runs. One-off trainer totals (runtime, FLOPs,
# tokens seen) stay in the run's trainer_state.json and TensorBoard; exporting them gave 17 CSVs per run.
EXPORTS = {
    "train/loss": "train_loss",
    "eval/loss": "eval_loss",
    "train/learning_rate": "learning_rate",
    "train/grad_norm": "grad_norm",
    "train/mean_token_accuracy": "train_token_accuracy",
    "eval/mean_token_accuracy": "eval_token_accuracy",
    # The preference stage: reward margin (beta x chosen-minus-rejected log-ratio) and how often it is positive.
    "train/rewards/margins": "train_reward_margin",
    "eval/rewards/margins": "eval_reward_margin",
    "train/rewards/accuracies": "train_reward_accuracy",
    "eval/rewards/accuracies": "eval_reward_accuracy",
}
CSV_HEADER = ["Wall time", "Step", "Value"]  # what TensorBoard's own "download CSV" writes

Series = list[tuple[float, int, float]]


def read_scalars(log_dir: str | Path) -> dict[str, Series]:
    """Every scalar event, unsampled: EventAccumulator keeps only 10,000 per tag unless told 0 (= all)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    series: dict[str, dict[int, tuple[float, int, float]]] = {}
    for events in sorted(Path(log_dir).rglob("events.out.tfevents.*"), key=lambda p: p.stat().st_mtime):
        acc = EventAccumulator(str(events), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags().get("scalars", []):
            for ev in acc.Scalars(tag):
                # A resumed run logs again from its checkpoint: the newer event file wins for a step.
                series.setdefault(tag, {})[ev.step] = (ev.wall_time, ev.step, ev.value)
    return {tag: [by_step[s] for s in sorted(by_step)] for tag, by_step in series.items()}


def write_csv(path: Path, rows: Series) -> None:
    # Replaced whole: metrics/ is shared, and a run of the same name elsewhere may export into it at once.
    with replaced(path) as tmp, open(tmp, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(CSV_HEADER)
        writer.writerows(rows)


def read_csv(path: str | Path) -> Series:
    with open(path, newline="") as fh:
        reader = csv.reader(fh)
        next(reader)
        return [(float(w), int(s), float(v)) for w, s, v in reader]


def export_scalars(run: RunDir | str | Path, metrics_dir: str | Path = "metrics",
                   scalars: dict[str, Series] | None = None) -> dict[str, Path]:
    """One CSV per exported curve (EXPORTS): metrics/<stem>_<run>.csv."""
    run, metrics_dir = RunDir.of(run), Path(metrics_dir)
    metrics_dir.mkdir(parents=True, exist_ok=True)
    written = {}
    for tag, rows in (scalars if scalars is not None else read_scalars(run.logs_dir)).items():
        if tag not in EXPORTS:
            continue
        stem = EXPORTS[tag]
        path = metrics_dir / f"{stem}_{run.name}.csv"
        write_csv(path, rows)
        written[stem] = path
    return written


def loss_figure(scalars: dict[str, Series], title: str):
    """Left: train and eval loss against step. Right: eval perplexity = exp(eval loss)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5), sharex=True)
    for tag, label, style in (("train/loss", "train loss", {"marker": ".", "lw": 1.2}),
                              ("eval/loss", "eval loss", {"marker": "o", "lw": 2})):
        if tag in scalars:
            steps, values = _xy(scalars[tag])
            ax1.plot(steps, values, label=f"{label} (last {values[-1]:.3f})", **style)
    ax1.set(xlabel="optimizer step", ylabel="loss (nats per answer token)", title="loss")
    if "eval/loss" in scalars:
        steps, values = _xy(scalars["eval/loss"])
        ppl = [math.exp(min(v, 50)) for v in values]  # exp(50) is already meaningless; avoid overflow
        ax2.plot(steps, ppl, marker="o", lw=2, color="tab:orange", label=f"eval perplexity (last {ppl[-1]:.2f})")
        if max(ppl) / min(ppl) > 20:  # a collapse from thousands to tens reads better on a log axis
            ax2.set_yscale("log")
        ax2.legend()
    else:
        ax2.text(0.5, 0.5, "no evaluation logged", ha="center", va="center", transform=ax2.transAxes)
    ax2.set(xlabel="optimizer step", ylabel="perplexity", title="eval perplexity = exp(eval loss)")
    for ax in (ax1, ax2):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    if ax1.lines:
        ax1.legend()
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def _xy(series: Series) -> tuple[list[int], list[float]]:
    return [s for _, s, _ in series], [v for *_, v in series]


def plot_run(run: RunDir | str | Path, imgs_dir: str | Path = "imgs",
             scalars: dict[str, Series] | None = None) -> Path | None:
    """imgs/loss_<run>.png, titled with the run name and its base model (from the run's config)."""
    import matplotlib.pyplot as plt

    run = RunDir.of(run)
    scalars = scalars if scalars is not None else read_scalars(run.logs_dir)
    if "train/loss" not in scalars:
        return None
    base_model = run.read_config().base_model if run.exists() else ""
    if base_model and Path(base_model).expanduser().exists():  # a local file or folder: its name, not the path
        base_model = Path(base_model).name
    fig = loss_figure(scalars, f"{run.name}  (base model: {base_model})" if base_model else run.name)
    Path(imgs_dir).mkdir(parents=True, exist_ok=True)
    out = Path(imgs_dir) / f"loss_{run.name}.png"
    try:
        with replaced(out) as tmp:
            fig.savefig(tmp, dpi=110)
    finally:
        plt.close(fig)
    return out


def export_run(run: RunDir | str | Path, metrics_dir: str | Path = "metrics",
               imgs_dir: str | Path = "imgs") -> dict[str, Any]:
    """The run's curves as CSVs in metrics_dir and its loss plot in imgs_dir."""
    run = RunDir.of(run)
    scalars = read_scalars(run.logs_dir)  # read the event files once for both
    written: dict[str, Any] = export_scalars(run, metrics_dir, scalars)
    plot = plot_run(run, imgs_dir, scalars)
    if plot is not None:
        written["plot"] = plot
    return written
