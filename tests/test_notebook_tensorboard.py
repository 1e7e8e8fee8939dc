"""Notebook 02's TensorBoard cell: a server from the kernel's own interpreter, whatever PATH says; headless runs
start nothing; a server that cannot start is one line, not an exception that stops the notebook."""

from __future__ import annotations

import functools
import http.server
import re
import shutil
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from fine_tune_llm.notebook import tensorboard_server as board
from tests.test_notebooks import get_json, path_without_tensorboard


@pytest.fixture
def shown(monkeypatch):
    """open_tensorboard as in a notebook someone is looking at; every server it starts is stopped afterwards."""
    monkeypatch.setattr(board, "interactive", lambda: True)
    monkeypatch.setattr(board, "_SERVERS", {})
    yield board.open_tensorboard
    for server in board._SERVERS.values():
        server.stop()


def test_it_serves_the_logs_with_no_tensorboard_on_path(shown, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PATH", path_without_tensorboard())
    assert shutil.which("tensorboard") is None
    server = shown(tmp_path)
    assert get_json(server.url + "data/logdir")["logdir"] == str(tmp_path.resolve())
    printed = capsys.readouterr().out
    assert server.url in printed and "ERROR" not in printed
    assert shown(tmp_path) is server  # the cell run again shows the same server
    server.stop()
    assert server.process.poll() is not None and not board.answers(server.url) and not server.output.exists()


def test_a_busy_port_moves_to_a_free_one():
    with socket.socket() as taken:
        taken.bind(("localhost", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        port = board.free_port(busy)
        assert port != busy
    assert board.free_port(port) == port  # free now that nothing holds it


def test_the_interpreters_own_program_is_used_when_it_is_there(monkeypatch, tmp_path):
    (tmp_path / "python").touch()
    monkeypatch.setattr(sys, "executable", str(tmp_path / "python"))
    assert board.tensorboard_command() == [str(tmp_path / "python"), "-m", "tensorboard.main"]
    program = tmp_path / "tensorboard"
    program.write_text("#!/bin/sh\n")
    program.chmod(0o755)
    assert board.tensorboard_command() == [str(program)]


def test_a_server_that_exits_is_reported_in_one_line(shown, tmp_path, monkeypatch, capsys):
    fails = Path(tmp_path / "tensorboard")
    fails.write_text("#!/bin/sh\necho 'cannot bind: port in use' >&2\nexit 3\n")
    fails.chmod(0o755)
    monkeypatch.setattr(board, "tensorboard_command", lambda: [str(fails)])
    assert shown(tmp_path) is None
    printed = capsys.readouterr().out
    assert "TensorBoard did not start (it exited with code 3: cannot bind: port in use)" in printed
    assert f"{fails} --logdir {tmp_path.resolve()}" in printed and "ERROR" not in printed


def test_a_headless_run_prints_the_command_and_starts_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FINE_TUNE_LLM_HEADLESS", "1")
    monkeypatch.setattr(board, "start_server", lambda *a, **k: pytest.fail("a headless run started a server"))
    assert board.open_tensorboard(tmp_path) is None
    assert capsys.readouterr().out.startswith(f"headless run: view the logs with  {' '.join(board.tensorboard_command())}")


def test_the_frame_points_at_localhost_from_a_saved_page(tmp_path):
    """TensorBoard's own frame put the port on the page's address: file:/// in a saved HTML page (a listing of the
    viewer's disk) and a vscode-webview:// address in VS Code. A page not served over http(s) gets localhost."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if browser is None:
        pytest.skip("no Chromium to run the frame's script")
    page = tmp_path / "saved.html"
    page.write_text(f"<html><body>{board.frame(6123, 300).data}</body></html>")

    def frame_src(url: str) -> str:
        dom = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom", url],
                             capture_output=True, text=True, timeout=120, check=True).stdout
        return re.search(r'<iframe[^>]* src="([^"]*)"', dom)[1]

    assert frame_src(page.as_uri()) == "http://localhost:6123/"
    # Served over http (Jupyter, JupyterHub): the same host, on TensorBoard's port.
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler) as server:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        try:
            assert frame_src(f"http://127.0.0.1:{server.server_address[1]}/saved.html") == "http://127.0.0.1:6123/"
        finally:
            server.shutdown()
