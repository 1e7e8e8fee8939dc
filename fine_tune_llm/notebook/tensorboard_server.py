"""TensorBoard inline in a notebook, whatever PATH the kernel was started with.

`%tensorboard` runs the `tensorboard` program it finds on PATH. A kernel started on the project's `.venv/bin/python`
without activating the environment (`.venv/bin/jupyter lab`, VS Code, most kernel launchers) has no `.venv/bin` on
its PATH, and the magic fails with "Could not find tensorboard". Here the server is started from the kernel's own
interpreter's folder, on a free port, and shown in an inline frame; the URL is printed too, for frontends whose
frame stays blank. The server stops with the kernel.
"""

from __future__ import annotations

import atexit
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from .paths import interactive

DEFAULT_PORT = 6006  # TensorBoard's own default, the one VS Code forwards and tutorials name
START_TIMEOUT_S = 90.0  # TensorBoard imports for seconds on a busy machine before it answers


@dataclass
class TensorBoardServer:
    """A TensorBoard process this kernel started: its address, and how to stop it."""

    log_dir: Path
    port: int
    process: subprocess.Popen
    output: Path  # the server's own stdout and stderr (its start-up chatter stays out of the notebook)

    @property
    def url(self) -> str:
        return f"http://localhost:{self.port}/"

    @property
    def pid(self) -> int:
        return self.process.pid

    def running(self) -> bool:
        return self.process.poll() is None and answers(self.url)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.output.unlink(missing_ok=True)


# log dir -> its server: running the cell again shows the same server instead of starting another.
_SERVERS: dict[Path, TensorBoardServer] = {}


def tensorboard_command() -> list[str]:
    """The `tensorboard` program installed beside this interpreter, else the same program through `python -m`.

    Neither depends on PATH: `sys.executable` is the kernel's own interpreter (`.venv/bin/python`, not resolved, so
    its folder is the environment's `bin`).
    """
    for name in ("tensorboard", "tensorboard.exe"):
        program = Path(sys.executable).parent / name
        if program.is_file() and os.access(program, os.X_OK):
            return [str(program)]
    return [sys.executable, "-m", "tensorboard.main"]


def answers(url: str, timeout: float = 2.0) -> bool:
    """Whether a server answers on url. Proxies are bypassed: a proxy set for the Hub must not see localhost."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=timeout) as resp:
            return resp.status == 200
    except OSError:
        return False


def free_port(preferred: int = DEFAULT_PORT) -> int:
    """preferred if nothing listens there, else a port the system says is free."""
    for port in (preferred, 0):
        with socket.socket() as s:
            try:
                s.bind(("localhost", port))
            except OSError:
                continue
            return s.getsockname()[1]
    raise OSError("no free port on localhost")


def start_server(log_dir: str | Path, port: int | None = None, timeout: float = START_TIMEOUT_S) -> TensorBoardServer:
    """`tensorboard --logdir LOG_DIR --port PORT` in the background, once it answers; OSError if it does not."""
    log_dir = Path(log_dir).resolve()
    port = port or free_port()
    fd, name = tempfile.mkstemp(prefix="tensorboard-", suffix=".log")
    with os.fdopen(fd, "wb") as out:
        process = subprocess.Popen(tensorboard_command() + ["--logdir", str(log_dir), "--port", str(port)],
                                   stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
    server = TensorBoardServer(log_dir, port, process, Path(name))
    deadline = time.monotonic() + timeout
    while not answers(server.url):
        if process.poll() is not None or time.monotonic() > deadline:
            why = (f"it exited with code {process.returncode}" if process.poll() is not None else
                   f"it did not answer on {server.url} within {timeout:.0f} s")
            output = _tail(server.output)
            server.stop()
            raise OSError(f"{why}: {output}")
        time.sleep(0.25)
    atexit.register(server.stop)  # a kernel that shuts down or restarts leaves no server behind
    return server


def open_tensorboard(log_dir: str | Path, port: int | None = None, height: int = 600) -> TensorBoardServer | None:
    """Show TensorBoard on log_dir inline and print its URL; the server started (or reused) for it, or None.

    Headless runs (tests, CI, papermill) print the command to run instead and start nothing. A server that fails to
    start is reported in one line, not raised: the rest of the notebook does not need it.
    """
    log_dir = Path(log_dir).resolve()
    command = " ".join(tensorboard_command())
    if not interactive():
        print(f"headless run: view the logs with  {command} --logdir {log_dir}")
        return None
    server = _SERVERS.get(log_dir)
    if server is None or not server.running():
        try:
            server = _SERVERS[log_dir] = start_server(log_dir, port)
        except OSError as exc:
            print(f"TensorBoard did not start ({exc}). The curves are also in the metrics CSVs and the plot below; "
                  f"to try by hand, run  {command} --logdir {log_dir}")
            return None
    print(f"TensorBoard serves {log_dir} at {server.url}\nIf the frame below stays blank (VS Code without port "
          f"forwarding), open that address in a browser. The server stops with the kernel.")
    if "google.colab" in sys.modules:  # Colab reaches a kernel's ports only through its proxy, which this display knows
        from tensorboard import notebook

        notebook.display(port=server.port, height=height)
    else:
        from IPython.display import display

        display(frame(server.port, height))
    return server


# TensorBoard's own notebook frame puts its port on the page's address, which works where Jupyter serves the page over
# http(s), but gives file:/// in a saved HTML page and a vscode-webview:// address in VS Code. Those get localhost.
FRAME = """<iframe id="{id}" title="TensorBoard" width="100%" height="{height}" frameborder="0"></iframe>
<script>
(function () {{
  var here = window.location;
  var url = /^https?:$/.test(here.protocol) ? new URL("/", here.href) : new URL("http://localhost/");
  url.port = "{port}";
  document.getElementById("{id}").src = url.href;
}})();
</script>"""


def frame(port: int, height: int = 600):
    """An inline frame on the TensorBoard at port: the notebook server's host where Jupyter serves the page, else
    localhost."""
    from IPython.display import HTML

    return HTML(FRAME.format(id=f"tensorboard-frame-{port}-{time.monotonic_ns()}", port=port, height=height))


def _tail(path: Path, chars: int = 600) -> str:
    text = path.read_text(errors="replace").strip() if path.is_file() else ""
    return text[-chars:] or "no output"
