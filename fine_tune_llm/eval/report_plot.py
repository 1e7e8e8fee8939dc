"""One picture per report: the columns (base, SFT, SFT + preference stage) side by side.

Panels: held-out answer perplexity; the chosen-minus-rejected margin with its 95% CI (where the rows have a
rejected answer); the mean length of the greedy answers, with how many ended their turn; the reward judge's mean
reward per column and the win rates of each stage over the one before (length-matched reward judge, and the LLM
judge's length-controlled rate when one was asked), with 95% CIs. Bars carry their values, so the picture reads
without the table.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..files import replaced

COLORS = ["#9e9e9e", "#4c72b0", "#dd8452", "#55a868"]


def report_figure(report: dict[str, Any]):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(report["columns"])
    labels = [report["columns"][n] for n in names]
    metrics = report["metrics"]
    colors = [COLORS[i % len(COLORS)] for i in range(len(names))]
    lengths = report.get("generation_lengths") or {}
    behaviour = report.get("behaviour") or {}
    wins = win_bars(behaviour, report["columns"])
    panels = ["perplexity"] + (["margin"] if "mean_margin" in metrics[names[0]] else []) + (
        ["length"] if lengths else []) + (["reward"] if "reward" in behaviour else []) + (["wins"] if wins else [])
    widths = [1.5 if p == "wins" and len(wins) > 2 else 1 for p in panels]  # room for each comparison's label
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * sum(widths), 4.2), width_ratios=widths)
    axes = [axes] if len(panels) == 1 else list(axes)
    for ax, panel in zip(axes, panels):
        if panel == "reward":
            cols = behaviour["reward"]["columns"]
            values = [cols[n]["mean_reward"] for n in names]
            err = [[v - cols[n]["ci95"][0] for v, n in zip(values, names)],
                   [cols[n]["ci95"][1] - v for v, n in zip(values, names)]]
            _bars(ax, labels, values, colors, "{:.2f}", yerr=err)
            ax.axhline(0, color="black", lw=0.8)
            ax.set(title="reward judge: mean reward, 95% CI", ylabel="reward (trained on this run's pairs)")
        elif panel == "wins":
            values = [w[1] for w in wins]
            err = [[v - w[2][0] for v, w in zip(values, wins)], [w[2][1] - v for v, w in zip(values, wins)]]
            _bars(ax, [w[0] for w in wins], values, [COLORS[(i + 1) % len(COLORS)] for i in range(len(wins))],
                  "{:.0%}", yerr=err)
            ax.axhline(0.5, color="black", lw=0.8, ls="--")
            ax.set(title="win rate over the stage before, 95% CI", ylabel="share of questions won", ylim=(0, 1.05))
            ax.tick_params(axis="x", labelsize=7 if len(wins) > 2 else 9)  # up to four two-line labels
        elif panel == "perplexity":
            values = [metrics[n]["perplexity"] for n in names]
            _bars(ax, labels, values, colors, "{:.2f}")
            ax.set(title="held-out answer perplexity (lower is better)", ylabel="perplexity")
        elif panel == "margin":
            values = [metrics[n]["mean_margin"] for n in names]
            cis = [metrics[n].get("margin_ci95") or [v, v] for n, v in zip(names, values)]
            err = [[v - lo for v, (lo, _) in zip(values, cis)], [hi - v for v, (_, hi) in zip(values, cis)]]
            _bars(ax, labels, values, colors, "{:.3f}", yerr=err)
            ax.axhline(0, color="black", lw=0.8)
            ax.set(title="chosen - rejected margin, 95% CI", ylabel="nats per answer token")
        else:
            values = [lengths[n]["mean_new_tokens"] or 0 for n in names]
            ended = [f"{label}\nended {lengths[n]['ended_turn']}/{lengths[n]['answers']}"
                     for label, n in zip(labels, names)]
            _bars(ax, ended, values, colors, "{:.0f}")
            ax.set(title="greedy answer length", ylabel="new tokens (mean)")
    settings = report.get("settings", {})
    fig.suptitle(f"{report['run']}: {settings.get('split', 'test')} split, "
                 f"{metrics[names[0]].get('answers', '?')} answers; base model {Path(report['base_model']).name}")
    fig.tight_layout()
    return fig


def win_bars(behaviour: dict[str, Any], labels: dict[str, str]) -> list[tuple[str, float, list[float]]]:
    """(label, win rate, CI) per stage: the reward judge's length-matched rate, the LLM judge's length-controlled one."""
    out = []
    for w in (behaviour.get("reward") or {}).get("win_rates", []):
        out.append((f"{labels[w['stage']]} > {labels[w['over']]}\nreward, len-matched", w["matched"]["win_rate"],
                    w["matched"]["ci95"]))
    for w in (behaviour.get("llm_judge") or {}).get("win_rates", []):
        new, old = w["columns"]
        out.append((f"{labels[new]} > {labels[old]}\nLLM judge, LC", w["lc_win_rate"], w["lc_win_rate_ci95"]))
    return out


def _bars(ax, labels: list[str], values: list[float], colors: list[str], fmt: str, yerr=None) -> None:
    bars = ax.bar(range(len(values)), values, color=colors, yerr=yerr, capsize=6 if yerr else 0)
    ax.set_xticks(range(len(values)), labels)
    ax.grid(axis="y", alpha=0.3)
    ax.margins(y=0.15)
    for i, (bar, value) in enumerate(zip(bars, values)):
        end = value + (yerr[1][i] if value >= 0 else -yerr[0][i]) if yerr else value  # beyond the error bar
        ax.annotate(fmt.format(value), (bar.get_x() + bar.get_width() / 2, end),
                    xytext=(0, 3 if value >= 0 else -12), textcoords="offset points", ha="center", fontsize=9)


def plot_report(report: dict[str, Any], imgs_dir: str | Path) -> Path:
    """imgs/report_<run>.png."""
    import matplotlib.pyplot as plt

    fig = report_figure(report)
    Path(imgs_dir).mkdir(parents=True, exist_ok=True)
    out = Path(imgs_dir) / f"report_{report['run']}.png"
    try:
        with replaced(out) as tmp:  # imgs/ is shared: a reader never sees half a picture
            fig.savefig(tmp, dpi=110)
    finally:
        plt.close(fig)
    return out


__all__ = ["plot_report", "report_figure"]
