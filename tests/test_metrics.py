"""TensorBoard scalars -> CSV (equal to the trainer's log_history) and the loss plot."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from fine_tune_llm.train import tensorboard_export as metrics
from tests.conftest import train_tiny

# CSV stem -> the key the Trainer puts in log_history for the same number.
LOGGED = {"train_loss": "loss", "eval_loss": "eval_loss", "learning_rate": "learning_rate", "grad_norm": "grad_norm"}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One short tiny run; training itself exports the CSVs and the plot at the end."""
    return train_tiny(tmp_path_factory.mktemp("metrics"), "runs/tiny-metrics", max_steps=6, logging_steps=1,
                      eval_steps=3, save_steps=6)


def history(run_dir: Path) -> list[dict]:
    return json.loads((run_dir / "trainer_state.json").read_text())["log_history"]


def test_csv_equals_log_history_step_for_step(run):
    cfg, result = run
    log = history(result.run_dir)
    for stem, key in LOGGED.items():
        path = Path(cfg.metrics_dir) / f"{stem}_{cfg.run_name}.csv"
        assert path.read_text().splitlines()[0] == "Wall time,Step,Value"  # TensorBoard's own CSV columns
        rows = metrics.read_csv(path)
        expected = [(h["step"], h[key]) for h in log if key in h]
        assert [s for _, s, _ in rows] == [s for s, _ in expected], stem
        # TensorBoard stores float32: the CSV holds exactly the float32 of each logged value.
        assert [np.float32(v) for *_, v in rows] == [np.float32(v) for _, v in expected], stem
        assert all(w > 1e9 for w, *_ in rows)  # wall times are Unix seconds
    assert len(metrics.read_csv(Path(cfg.metrics_dir) / f"train_loss_{cfg.run_name}.csv")) == 6  # steps 1..6
    assert [s for _, s, _ in metrics.read_csv(Path(cfg.metrics_dir) / f"eval_loss_{cfg.run_name}.csv")] == [3, 6]


def test_export_metrics_cli_rewrites_the_same_csvs(run, tmp_path):
    from fine_tune_llm.cli import main

    cfg, result = run
    assert main(["export-metrics", str(result.run_dir), "--metrics-dir", str(tmp_path / "m"),
                 "--imgs-dir", str(tmp_path / "i")]) == 0
    for stem in LOGGED:
        name = f"{stem}_{cfg.run_name}.csv"
        assert (tmp_path / "m" / name).read_text() == (Path(cfg.metrics_dir) / name).read_text()
    assert (tmp_path / "i" / f"loss_{cfg.run_name}.png").stat().st_size > 10_000


def test_plot_has_loss_and_perplexity_panels_titled_with_run_and_base_model(run):
    cfg, result = run
    scalars = metrics.read_scalars(result.run_dir / "logs")
    fig = metrics.loss_figure(scalars, "the title")
    loss_ax, ppl_ax = fig.axes[:2]
    lines = {line.get_label().split(" (")[0]: line for line in loss_ax.lines}
    train_steps, train_values = metrics._xy(scalars["train/loss"])
    assert list(lines["train loss"].get_xdata()) == train_steps
    assert list(lines["train loss"].get_ydata()) == train_values
    eval_steps, eval_values = metrics._xy(scalars["eval/loss"])
    assert list(lines["eval loss"].get_xdata()) == eval_steps
    assert list(ppl_ax.lines[0].get_ydata()) == pytest.approx([math.exp(v) for v in eval_values])
    assert fig._suptitle.get_text() == "the title"

    png = Path(cfg.imgs_dir) / f"loss_{cfg.run_name}.png"  # written by training's export
    assert png.stat().st_size > 10_000
    # The title names the run and the base model read back from the run's config.yaml.
    assert result.run.read_config().base_model == "tiny-gemma"


def _write_events(log_dir: Path, points: list[tuple[int, float]]) -> None:
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(log_dir))
    for step, value in points:
        writer.add_scalar("train/loss", value, step)
    writer.close()


def test_read_scalars_keeps_every_event_and_the_newest_file_wins(tmp_path):
    # 12,000 points: EventAccumulator's default size guidance would keep a 10,000-point reservoir sample.
    _write_events(tmp_path / "logs" / "a", [(s, s / 1000) for s in range(12_000)])
    series = metrics.read_scalars(tmp_path / "logs")["train/loss"]
    assert [s for _, s, _ in series] == list(range(12_000))
    # A resumed run logs steps again from its checkpoint: the newer event file's values win.
    import os
    import time

    time.sleep(0.01)
    _write_events(tmp_path / "logs" / "b", [(11_999, -1.0), (12_000, -2.0)])
    newest = max((tmp_path / "logs").rglob("events.out.tfevents.*"), key=lambda p: p.stat().st_mtime)
    os.utime(newest, (time.time() + 5, time.time() + 5))
    series = metrics.read_scalars(tmp_path / "logs")["train/loss"]
    assert len(series) == 12_001
    assert [v for *_, v in series[-3:]] == [pytest.approx(11.998), -1.0, -2.0]
