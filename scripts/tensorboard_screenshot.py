"""Screenshot the real TensorBoard page of a finished run with headless Chromium (the picture in the README).

    .venv/bin/python scripts/tensorboard_screenshot.py                      # trains the tiny demo run first
    .venv/bin/python scripts/tensorboard_screenshot.py runs/tiny-demo --out imgs/tensorboard1.png

Needs Debian's `chromium` package (`apt-get install chromium`). Starts `tensorboard` on a free loopback port over
RUN_DIR/logs, waits until it serves the run's scalars, opens the time-series dashboard filtered to the loss
curves, saves the screenshot, and stops the server. Not part of the test suite.
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                  "--hide-scrollbars", "--force-device-scale-factor=1"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_demo_run(root: Path) -> Path:
    """The `fine-tune-llm demo` run (tiny Gemma, 4-bit, shipped sample data), into a temporary directory."""
    sys.path.insert(0, str(REPO))
    from fine_tune_llm.config import make_config
    from fine_tune_llm.train.sft import train

    cfg = make_config("tiny", output_dir=str(root / "tiny-demo"), metrics_dir=str(root / "metrics"),
                      imgs_dir=str(root / "imgs"))
    return train(cfg, resume=False).run_dir


def wait_for_scalars(url: str, run: str, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"tensorboard exited with code {proc.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/data/plugin/scalars/tags", timeout=5) as resp:
                if "eval/loss" in json.loads(resp.read()).get(run, {}):
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"tensorboard did not serve {run}'s scalars within {timeout:.0f} s")


def screenshot(url: str, out: Path, width: int, height: int, budget_ms: int) -> None:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        raise SystemExit("chromium not found: apt-get install chromium")
    with tempfile.TemporaryDirectory() as profile:  # a throwaway profile: no state from earlier runs
        subprocess.run([chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--window-size={width},{height}",
                        f"--virtual-time-budget={budget_ms}", f"--screenshot={out.resolve()}", url],
                       check=True, timeout=180, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def page_url(url: str, dashboard: str, tag_filter: str) -> str:
    from urllib.parse import quote

    # Smoothing 0: the picture shows the logged values themselves, as the CSVs in metrics/ hold them.
    return f"{url}/#{dashboard}&tagFilter={quote(tag_filter)}&_smoothingWeight=0"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("run_dir", nargs="?", help="a finished run directory (default: train the tiny demo run)")
    p.add_argument("--out", default=str(REPO / "imgs" / "tensorboard1.png"))
    p.add_argument("--width", type=int, default=1200)
    p.add_argument("--height", type=int, default=560, help="560 px shows the two loss cards and nothing below")
    p.add_argument("--tag-filter", default="^(train|eval)/loss$", help="TensorBoard's tag filter (a regex)")
    p.add_argument("--dashboard", default="scalars", choices=["scalars", "timeseries"])
    p.add_argument("--budget-ms", type=int, default=20000, help="virtual time the page gets to load and render")
    args = p.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(args.run_dir) if args.run_dir else train_demo_run(Path(tmp))
        if not (run_dir / "logs").is_dir():
            raise SystemExit(f"{run_dir}/logs not found: is {run_dir} a finished run directory?")
        port, run = free_port(), run_dir.name
        # TensorBoard names a run after its folder under --logdir: a link named after the run directory shows
        # "tiny-demo" in the run list instead of "logs" or "tiny-demo/.".
        logdir = Path(tmp) / "tensorboard"
        logdir.mkdir()
        (logdir / run).symlink_to((run_dir / "logs").resolve(), target_is_directory=True)
        proc = subprocess.Popen([sys.executable, "-m", "tensorboard.main", "--logdir", str(logdir),
                                 "--host", "127.0.0.1", "--port", str(port), "--load_fast", "false"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        url = f"http://127.0.0.1:{port}"
        try:
            wait_for_scalars(url, run, proc)
            out = Path(args.out)
            out.parent.mkdir(parents=True, exist_ok=True)
            screenshot(page_url(url, args.dashboard, args.tag_filter), out, args.width, args.height, args.budget_ms)
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    print(f"screenshot: {out} ({out.stat().st_size:,} bytes) of {run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
