"""TensorBoard scalars -> CSV files in metrics/ (TensorBoard's own columns) and a loss plot in imgs/."""

from __future__ import annotations

import csv
import math
from pathlib import Path

# TensorBoard tag -> CSV stem. The Trainer logs "train/loss", "eval/loss", ...
EXPORTS = {
    "train/loss": "train_loss",
    "eval/loss": "eval_loss",
    "train/learning_rate": "learning_rate",
    "train/grad_norm": "grad_norm",
}


def read_scalars(log_dir: str | Path) -> dict[str, list[tuple[float, int, float]]]:
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


def write_csv(path: Path, rows: list[tuple[float, int, float]]) -> None:
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["Wall time", "Step", "Value"])
        writer.writerows(rows)


def export_scalars(run_dir: str | Path, metrics_dir: str | Path = "metrics") -> dict[str, Path]:
    run_dir, metrics_dir = Path(run_dir), Path(metrics_dir)
    metrics_dir.mkdir(parents=True, exist_ok=True)
    scalars = read_scalars(run_dir / "logs")
    written = {}
    for tag, stem in EXPORTS.items():
        if tag in scalars:
            path = metrics_dir / f"{stem}_{run_dir.name}.csv"
            write_csv(path, scalars[tag])
            written[stem] = path
    return written


def plot_run(run_dir: str | Path, imgs_dir: str | Path = "imgs", base_model: str = "") -> Path | None:
    """Train and eval loss against step, and eval perplexity on a second panel."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    scalars = read_scalars(run_dir / "logs")
    if "train/loss" not in scalars:
        return None
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for tag, label in (("train/loss", "train loss"), ("eval/loss", "eval loss")):
        if tag in scalars:
            ax1.plot([s for _, s, _ in scalars[tag]], [v for *_, v in scalars[tag]], marker=".", label=label)
    ax1.set(xlabel="optimizer step", ylabel="loss (nats / answer token)", title="loss")
    ax1.legend()
    if "eval/loss" in scalars:
        ax2.plot([s for _, s, _ in scalars["eval/loss"]], [math.exp(min(v, 50)) for *_, v in scalars["eval/loss"]],
                 marker="o", color="tab:orange")
    ax2.set(xlabel="optimizer step", ylabel="perplexity", title="eval perplexity = exp(eval loss)")
    fig.suptitle(f"{run_dir.name}  ({base_model})" if base_model else run_dir.name)
    fig.tight_layout()
    Path(imgs_dir).mkdir(parents=True, exist_ok=True)
    out = Path(imgs_dir) / f"loss_{run_dir.name}.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def export_run(run_dir: str | Path, metrics_dir: str | Path = "metrics", imgs_dir: str | Path = "imgs",
               base_model: str = "") -> dict[str, Path]:
    written = export_scalars(run_dir, metrics_dir)
    plot = plot_run(run_dir, imgs_dir, base_model)
    if plot is not None:
        written["plot"] = plot
    return written
