"""The real TensorBoard server, over a finished run, serves the same curves as the exported CSVs."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from fine_tune_llm.train import tensorboard_export as metrics
from tests.conftest import train_tiny


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    cfg, _ = train_tiny(tmp_path_factory.mktemp("tensorboard"), "runs/tiny-tb", max_steps=4, logging_steps=1,
                        eval_steps=2, save_steps=4)
    return cfg


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(url: str):
    with urllib.request.urlopen(url, timeout=10) as resp:
        return json.loads(resp.read())


@pytest.fixture
def tensorboard(run):
    """`tensorboard --logdir RUN_DIR` on a free loopback port; yields its base URL, stops it afterwards."""
    port = free_port()
    # --load_fast=false: the pure-Python loader (no separate data-server binary). samples_per_plugin: keep every
    # point (here 0 would mean "serve none", unlike EventAccumulator where 0 means "keep all").
    proc = subprocess.Popen(
        [sys.executable, "-m", "tensorboard.main", "--logdir", run.output_dir, "--host", "127.0.0.1",
         "--port", str(port), "--load_fast", "false", "--samples_per_plugin", "scalars=1000000",
         "--reload_interval", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 90
        while True:
            try:
                tags = get_json(f"{url}/data/plugin/scalars/tags")
                if "eval/loss" in tags.get("logs", {}):
                    break
            except OSError:
                pass
            if proc.poll() is not None:
                pytest.fail(f"tensorboard exited with {proc.returncode}: {proc.stdout.read().decode()[-2000:]}")
            if time.time() > deadline:
                pytest.fail("tensorboard did not serve the run's scalars within 90 s")
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_tensorboard_serves_the_same_loss_curves_as_the_csvs(run, tensorboard):
    tags = get_json(f"{tensorboard}/data/plugin/scalars/tags")
    assert set(tags) == {"logs"}  # the run's event files live in RUN_DIR/logs
    assert {"train/loss", "eval/loss", "train/learning_rate", "train/grad_norm"} <= set(tags["logs"])
    for tag, stem in (("train/loss", "train_loss"), ("eval/loss", "eval_loss")):
        query = urllib.parse.urlencode({"run": "logs", "tag": tag})
        served = get_json(f"{tensorboard}/data/plugin/scalars/scalars?{query}")  # [[wall_time, step, value], ...]
        exported = metrics.read_csv(Path(run.metrics_dir) / f"{stem}_{run.run_name}.csv")
        assert [(s, v) for _, s, v in served] == [(s, v) for _, s, v in exported], tag
        assert [w for w, *_ in served] == pytest.approx([w for w, *_ in exported], abs=1e-3)
    steps = [s for _, s, _ in metrics.read_csv(Path(run.metrics_dir) / f"train_loss_{run.run_name}.csv")]
    assert steps == [1, 2, 3, 4]
