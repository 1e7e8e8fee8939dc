"""The notebooks run top to bottom on the tiny preset (notebook 02 as a student runs it, in an interactive kernel;
notebook 01 headless); and they are committed clean, thin, and with knobs that follow the preset."""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import signal
import sys
import time
import urllib.request
from pathlib import Path

import nbformat
import pytest
import yaml

from fine_tune_llm.config import PRESETS, make_config
from tests.conftest import train_tiny

REPO = Path(__file__).resolve().parent.parent
NOTEBOOKS = REPO / "notebooks"
NB01 = NOTEBOOKS / "01_GEMMA2B_QUICK_INFERENCE.ipynb"
NB02 = NOTEBOOKS / "02_GEMMA2B_FINE_TUNING.ipynb"
PARAMETERS = {
    NB01: {"PRESET", "BASE_MODEL", "QUANTIZATION", "ADAPTER_PATH", "MAX_NEW_TOKENS"},
    NB02: {"PRESET", "BASE_MODEL", "DATA_SAMPLES", "EPOCHS", "MAX_STEPS", "LORA_R", "LORA_ALPHA", "LEARNING_RATE",
           "OUTPUT_DIR", "METRICS_DIR", "IMGS_DIR", "PUSH_TO_HUB", "HUB_REPO_ID", "EVAL_GENERATIONS", "JUDGE", "MAX_NEW_TOKENS",
           "PREFERENCE_STAGE"},
}
RUN_NAME = "nb-run"  # not the default run name, so a stray write into the repository would be noticed


def parameters_index(nb) -> int:
    found = [i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])]
    assert len(found) == 1, "exactly one cell must be tagged `parameters`"
    return found[0]


def with_parameters(path: Path, **params) -> nbformat.NotebookNode:
    """Papermill's way: a cell right after the `parameters` cell re-assigns what the runner overrides.

    It also checks the kernel runs this interpreter: the `python3` kernelspec resolves to the interpreter
    running the tests, unless a user-level kernelspec of that name points elsewhere.
    """
    nb = nbformat.read(path, as_version=4)
    source = "\n".join(f"{k} = {v!r}" for k, v in params.items())
    source += (f"\nimport sys\nassert sys.prefix == {sys.prefix!r}, "
               f"f'the python3 kernel runs {{sys.executable}}, not this virtualenv'")
    cell = nbformat.v4.new_code_cell(source)
    cell.metadata["tags"] = ["injected-parameters"]
    nb.cells.insert(parameters_index(nb) + 1, cell)
    return nb


def path_without_tensorboard() -> str:
    """PATH minus every folder holding a `tensorboard` program (the virtualenv's bin among them): what a kernel
    started on `.venv/bin/python` without activating the environment sees."""
    kept = [d for d in os.environ.get("PATH", "").split(os.pathsep) if d and not shutil.which("tensorboard", path=d)]
    assert str(Path(sys.executable).parent) not in kept
    return os.pathsep.join(kept)


def execute(nb, cwd: Path, monkeypatch, interactive: bool = False, on_cell_executed=None) -> nbformat.NotebookNode:
    """Run nb in a fresh python3 kernel. Headless (FINE_TUNE_LLM_HEADLESS=1) unless interactive: then the kernel
    runs as a student's would, TensorBoard included, with no tensorboard program on its PATH."""
    from nbclient import NotebookClient

    if interactive:
        monkeypatch.delenv("FINE_TUNE_LLM_HEADLESS", raising=False)
        monkeypatch.delenv("CI", raising=False)
        monkeypatch.setenv("PATH", path_without_tensorboard())
    else:
        monkeypatch.setenv("FINE_TUNE_LLM_HEADLESS", "1")  # the kernel inherits it: TensorBoard is not started
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # Errors raise CellExecutionError with the cell's traceback, which fails the test with it.
    NotebookClient(nb, kernel_name="python3", timeout=600, resources={"metadata": {"path": str(cwd)}},
                   on_cell_executed=on_cell_executed).execute()
    return nb


def outputs_text(cell) -> str:
    parts = []
    for out in cell.get("outputs", []):
        parts.append(out.get("text", ""))
        parts.extend(str(v) for v in out.get("data", {}).values())
    return "\n".join(parts)


def cell_after(nb, fragment: str):
    return next(c for c in nb.cells if c.cell_type == "code" and fragment in c.source)


def noise(nb) -> list[str]:
    """What a student could not act on: anything on stderr, and any line with ERROR or a Python warning."""
    found = []
    for i, cell in enumerate(nb.cells):
        found += [f"cell {i} stderr: {o.text[:300]}" for o in cell.get("outputs", [])
                  if o.get("output_type") == "stream" and o.get("name") == "stderr"]
        found += [f"cell {i}: {line[:300]}" for line in outputs_text(cell).splitlines()
                  if re.search(r"ERROR|Warning\b|WARNING|Traceback", line)]
    return found


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def get_json(url: str):
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # localhost never goes through a proxy
    with opener.open(url, timeout=10) as resp:
        return json.loads(resp.read())


@pytest.fixture(scope="module")
def fine_tuned(tmp_path_factory):
    """Notebook 02 as a student runs it: an interactive kernel without the virtualenv on its PATH, started in
    notebooks/ (VS Code's working directory), with only PRESET changed among the recipe's knobs. The run's files
    go under tmp; the preference section is switched on. Returns (tmp, executed notebook, what TensorBoard served).
    """
    tmp = tmp_path_factory.mktemp("nb02")
    nb = with_parameters(NB02, PRESET="tiny", OUTPUT_DIR=str(tmp / RUN_NAME), METRICS_DIR=str(tmp / "metrics"),
                         IMGS_DIR=str(tmp / "imgs"), PREFERENCE_STAGE="dpo")
    board_file = tmp / "board.json"
    probe = nbformat.v4.new_code_cell(  # right after the TensorBoard cell: where its server is
        f"import json\njson.dump(board and dict(url=board.url, pid=board.pid), open({str(board_file)!r}, 'w'))")
    probe.metadata["tags"] = ["tensorboard-probe"]
    nb.cells.insert(nb.cells.index(cell_after(nb, "open_tensorboard(LOG_DIR)")) + 1, probe)
    served: dict = {}

    def ask_the_server(cell, **_):  # while the kernel, and so the server, still runs
        if "tensorboard-probe" in cell.metadata.get("tags", []):
            served.update(board=json.loads(board_file.read_text()))
            if served["board"]:
                served["logdir"] = get_json(served["board"]["url"] + "data/logdir")["logdir"]
                served["runs"] = get_json(served["board"]["url"] + "data/runs")

    with pytest.MonkeyPatch.context() as mp:
        try:
            execute(nb, NOTEBOOKS, mp, interactive=True, on_cell_executed=ask_the_server)
        finally:
            nbformat.write(nb, tmp / "executed.ipynb")  # to read, or render (jupyter nbconvert --to html), after a failure
            pid = (served.get("board") or {}).get("pid")
            if pid:  # the kernel's exit stops the server; the deadline is the test's, the kill is a safety net
                deadline = time.monotonic() + 20
                while alive(pid) and time.monotonic() < deadline:
                    time.sleep(0.2)
                served["outlived_the_kernel"] = alive(pid)
                if served["outlived_the_kernel"]:
                    os.kill(pid, signal.SIGKILL)
    return tmp, nb, served


@pytest.mark.slow
def test_tensorboard_opens_inline_without_the_virtualenv_on_path(fine_tuned):
    tmp, nb, served = fine_tuned
    shown = cell_after(nb, "open_tensorboard(LOG_DIR)")
    assert served["board"], outputs_text(shown)
    assert served["logdir"] == str((tmp / RUN_NAME / "logs").resolve())  # it answered, serving this run's logs
    assert served["runs"] == ["."]  # the event files of the run, at the top of its logs folder
    assert served["board"]["url"] in outputs_text(shown)  # the address, for a frame that stays blank
    assert any("text/html" in o.get("data", {}) for o in shown.outputs)  # TensorBoard's own inline frame
    assert not served["outlived_the_kernel"], "the TensorBoard server kept running after the kernel stopped"


@pytest.mark.slow
def test_the_notebook_shows_no_error_or_warning(fine_tuned):
    assert noise(fine_tuned[1]) == []


@pytest.mark.slow
def test_changing_only_the_preset_gives_the_presets_recipe_and_the_demos_loss(fine_tuned, tmp_path):
    tmp, nb, _ = fine_tuned
    run = tmp / RUN_NAME
    _cfg, demo = train_tiny(tmp_path, "demo")  # what `fine-tune-llm demo` trains: the tiny preset as it is

    def recipe(run_dir: Path) -> dict:
        ran = yaml.safe_load((run_dir / "config.yaml").read_text())
        return {k: v for k, v in ran.items() if k not in ("output_dir", "metrics_dir", "imgs_dir")}

    assert recipe(run) == recipe(demo.run.path)
    assert "0.003" in outputs_text(cell_after(nb, "show.recipe(cfg)"))
    demo_losses = [h["loss"] for h in demo.log_history if "loss" in h]
    losses = [float(line.split(",")[2]) for line in
              (tmp / "metrics" / f"train_loss_{RUN_NAME}.csv").read_text().splitlines()[1:]]
    assert len(losses) == len(demo_losses) and losses[0] == pytest.approx(demo_losses[0], abs=0.01)
    assert losses[-1] <= demo_losses[-1] + 0.05, (losses, demo_losses)
    assert losses[0] - losses[-1] > 1.0  # not the barely-moving curve of another preset's learning rate


@pytest.mark.slow
def test_fine_tuning_notebook_writes_a_run(fine_tuned):
    tmp, nb, _ = fine_tuned
    run = tmp / RUN_NAME
    for name in ("adapter/adapter_model.safetensors", "adapter/adapter_config.json", "adapter/tokenizer.json",
                 "config.yaml", "report.json", "report.md"):
        assert (run / name).is_file(), name
    assert list((run / "logs").rglob("events.out.tfevents.*"))
    assert (tmp / "imgs" / f"loss_{RUN_NAME}.png").stat().st_size > 10_000
    assert (tmp / "metrics" / f"eval_loss_{RUN_NAME}.csv").is_file()
    scores = json.loads((run / "report.json").read_text())["metrics"]
    assert scores["tuned"]["perplexity"] < 0.8 * scores["base"]["perplexity"]
    assert "| metric | base | SFT |" in outputs_text(cell_after(nb, "report = evaluate_run("))
    assert not list((REPO / "metrics").glob(f"*_{RUN_NAME}.csv")), "wrote into the repository's metrics/"

    masked = cell_after(nb, "show.masked_view(")
    html = "".join(o["data"].get("text/html", "") for o in masked.outputs if "data" in o)
    assert "trained tokens" in html and "&lt;end_of_turn&gt;" in html
    assert "4-bit NF4" in outputs_text(cell_after(nb, "model = load_model(cfg)"))
    assert "r=8, alpha=16" in outputs_text(cell_after(nb, "model = add_lora(model, cfg)"))
    assert "first train loss" in outputs_text(cell_after(nb, "show.training_summary(result)"))
    pushed = outputs_text(cell_after(nb, "push_folder("))  # PUSH_TO_HUB=False: a dry run, nothing sent
    assert "dry run" in pushed and "adapter_model.safetensors" in pushed
    assert (run / "release" / "adapter" / "README.md").is_file()


@pytest.mark.slow
def test_the_toys_preference_stage_moves_the_margin_and_its_answers_still_end(fine_tuned):
    tmp, nb, _ = fine_tuned
    dpo = json.loads((tmp / f"{RUN_NAME}-dpo" / "report.json").read_text())  # PREFERENCE_STAGE="dpo"
    assert list(dpo["columns"].values()) == ["base", "SFT", "SFT+DPO"]
    margin = {name: m["mean_margin"] for name, m in dpo["metrics"].items()}
    assert margin["tuned"] > margin["sft"] + 0.1, margin
    greedy = dpo["generation_lengths"]["tuned"]
    assert greedy["answers"] == 5 and greedy["ended_turn"] >= 4, greedy  # not 128 tokens of one repeated word
    assert "| metric | base | SFT | SFT+DPO |" in outputs_text(cell_after(nb, "if PREFERENCE_STAGE:"))


@pytest.mark.slow
def test_inference_notebook_compares_base_and_tuned(fine_tuned, tmp_path, monkeypatch):
    run = fine_tuned[0] / RUN_NAME
    nb = with_parameters(NB01, PRESET="tiny", ADAPTER_PATH=str(run / "adapter"), MAX_NEW_TOKENS=24)
    dump = tmp_path / "answers.json"  # the test reads the notebook's variables back through this file
    nb.cells.append(nbformat.v4.new_code_cell(
        f"import json\njson.dump(dict(one_by_one=one_by_one, batched=batched, tuned=tuned), open({str(dump)!r}, 'w'))"))
    execute(nb, REPO, monkeypatch)  # this time from the repository root, headless
    answers = json.loads(dump.read_text())
    for key in ("one_by_one", "batched", "tuned"):
        assert len(answers[key]) == 4 and all(a["new_tokens"] > 0 for a in answers[key])
    assert [a["answer"] for a in answers["tuned"]] != [a["answer"] for a in answers["batched"]]
    table = outputs_text(cell_after(nb, "if ADAPTER_PATH:"))
    assert "tuned" in table and answers["tuned"][0]["answer"][:20] in table
    assert "4-bit NF4" in outputs_text(cell_after(nb, "show.model_summary(model)"))  # QUANTIZATION=None: tiny's
    assert noise(nb) == []


# --- committed state ------------------------------------------------------------------------------------

@pytest.mark.parametrize("path", [NB01, NB02], ids=lambda p: p.name[:2])
def test_committed_notebook_has_no_outputs_or_execution_counts(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    dirty = [i for i, c in enumerate(nb.cells)
             if c.cell_type == "code" and (c.outputs or c.execution_count is not None)]
    assert not dirty, f"{path.name}: cells {dirty} have outputs or execution counts; clear them before committing"


@pytest.mark.parametrize("path", [NB01, NB02], ids=lambda p: p.name[:2])
def test_notebook_is_thin_and_has_its_parameters(path):
    nb = nbformat.read(path, as_version=4)
    params = nb.cells[parameters_index(nb)]
    assigned = {t.id for node in ast.parse(params.source).body for t in getattr(node, "targets", [])}
    assert assigned == PARAMETERS[path]
    for cell in nb.cells:
        if cell.cell_type != "code" or cell is params:  # the parameters cell lists every knob; the rest stay short
            continue
        lines = cell.source.rstrip().splitlines()  # blank lines count: a cell must fit the eye
        assert len(lines) <= 15, f"{path.name}: a {len(lines)}-line cell; move the logic into the package"
        assert not any(ln.lstrip().startswith(("def ", "class ")) for ln in lines), "no definitions in notebooks"
    kinds = [c.cell_type for c in nb.cells]
    assert kinds.count("markdown") >= kinds.count("code") - 2, "each step needs its explanation"


# knob -> the config field it sets. Committed as None (the preset's value), with every preset's value in its comment.
KNOBS = {
    NB01: {"BASE_MODEL": "base_model", "QUANTIZATION": "quantization"},
    NB02: {"BASE_MODEL": "base_model", "DATA_SAMPLES": "data_samples", "EPOCHS": "num_epochs",
           "MAX_STEPS": "max_steps", "LORA_R": "lora_r", "LORA_ALPHA": "lora_alpha", "LEARNING_RATE": "learning_rate"},
}


def listed_values(comment: str) -> dict[str, str]:
    """{preset: value} from a comment's `value (preset, preset)` groups; other parentheses are prose."""
    found = {}
    for value, names in re.findall(r"([^\s(]+) \(([^)]*)\)", comment):
        presets = [n.strip() for n in names.split(",")]
        if set(presets) <= set(PRESETS):
            found.update(dict.fromkeys(presets, value))
    return found


def as_value(text: str):
    if text == "None":
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


@pytest.mark.parametrize("path", [NB01, NB02], ids=lambda p: p.name[:2])
def test_every_knob_follows_the_preset_and_its_comment_says_each_presets_value(path):
    nb = nbformat.read(path, as_version=4)
    lines = {m[1]: (m[2], m[3]) for line in nb.cells[parameters_index(nb)].source.splitlines()
             if (m := re.match(r"(\w+) = (\S+)\s+#(.*)", line))}
    for knob, field in KNOBS[path].items():
        value, comment = lines[knob]
        assert value == "None", f"{path.name}: {knob} = {value}; None takes the preset's value"
        listed = listed_values(comment)
        assert set(listed) == set(PRESETS), f"{path.name}: {knob}'s comment lists {sorted(listed)}"
        for preset, shown in listed.items():
            actual = getattr(make_config(preset), field)
            assert as_value(shown) == actual, f"{path.name}: {knob}'s comment says {shown} for {preset}, not {actual}"


def test_the_knob_comments_are_read_as_meant():
    assert listed_values("a cap, -1 = run the epochs: -1 (gemma-2b-it, smollm2-135m), 30 (tiny)") == \
        {"gemma-2b-it": "-1", "smollm2-135m": "-1", "tiny": "30"}
    assert listed_values('"4bit" or "none" (to compare speed): 4bit (tiny)') == {"tiny": "4bit"}
    assert [as_value(t) for t in ("None", "-1", "2e-4", "4bit")] == [None, -1, 2e-4, "4bit"]
