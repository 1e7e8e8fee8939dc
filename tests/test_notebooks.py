"""The notebooks run top to bottom, headless, on the tiny preset; and they are committed clean and thin."""

from __future__ import annotations

import ast
import json
import sys
from pathlib import Path

import nbformat
import pytest

REPO = Path(__file__).resolve().parent.parent
NOTEBOOKS = REPO / "notebooks"
NB01 = NOTEBOOKS / "01_GEMMA2B_QUICK_INFERENCE.ipynb"
NB02 = NOTEBOOKS / "02_GEMMA2B_FINE_TUNING.ipynb"
PARAMETERS = {
    NB01: {"PRESET", "BASE_MODEL", "QUANTIZATION", "ADAPTER_PATH", "MAX_NEW_TOKENS"},
    NB02: {"PRESET", "BASE_MODEL", "DATA_SAMPLES", "EPOCHS", "MAX_STEPS", "LORA_R", "LORA_ALPHA", "LEARNING_RATE",
           "OUTPUT_DIR", "METRICS_DIR", "IMGS_DIR", "PUSH_TO_HUB", "HUB_REPO_ID", "EVAL_GENERATIONS", "MAX_NEW_TOKENS",
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


def execute(nb, cwd: Path, monkeypatch) -> nbformat.NotebookNode:
    from nbclient import NotebookClient

    monkeypatch.setenv("FINE_TUNE_LLM_HEADLESS", "1")  # the kernel inherits it: TensorBoard is not started
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # Errors raise CellExecutionError with the cell's traceback, which fails the test with it.
    NotebookClient(nb, kernel_name="python3", timeout=300, resources={"metadata": {"path": str(cwd)}}).execute()
    return nb


def outputs_text(cell) -> str:
    parts = []
    for out in cell.get("outputs", []):
        parts.append(out.get("text", ""))
        parts.extend(str(v) for v in out.get("data", {}).values())
    return "\n".join(parts)


def cell_after(nb, fragment: str):
    return next(c for c in nb.cells if c.cell_type == "code" and fragment in c.source)


@pytest.fixture(scope="module")
def fine_tuned(tmp_path_factory):
    """Notebook 02 run from notebooks/ (VS Code's working directory) with every output under tmp."""
    tmp = tmp_path_factory.mktemp("nb02")
    nb = with_parameters(NB02, PRESET="tiny", BASE_MODEL=None, DATA_SAMPLES=80, EPOCHS=None, MAX_STEPS=20,
                         LORA_R=None, LORA_ALPHA=None, LEARNING_RATE=None, OUTPUT_DIR=str(tmp / RUN_NAME),
                         METRICS_DIR=str(tmp / "metrics"), IMGS_DIR=str(tmp / "imgs"), PUSH_TO_HUB=False,
                         HUB_REPO_ID="someone/tiny-psych-lora", EVAL_GENERATIONS=2, MAX_NEW_TOKENS=24,
                         PREFERENCE_STAGE="dpo")
    with pytest.MonkeyPatch.context() as mp:
        execute(nb, NOTEBOOKS, mp)
    return tmp, nb


@pytest.mark.slow
def test_fine_tuning_notebook_writes_a_run(fine_tuned):
    tmp, nb = fine_tuned
    run = tmp / RUN_NAME
    for name in ("adapter/adapter_model.safetensors", "adapter/adapter_config.json", "adapter/tokenizer.json",
                 "config.yaml", "report.json", "report.md"):
        assert (run / name).is_file(), name
    assert list((run / "logs").rglob("events.out.tfevents.*"))
    assert (tmp / "imgs" / f"loss_{RUN_NAME}.png").stat().st_size > 10_000
    losses = [float(line.split(",")[2]) for line in
              (tmp / "metrics" / f"train_loss_{RUN_NAME}.csv").read_text().splitlines()[1:]]
    assert len(losses) >= 5 and losses[-1] < losses[0] - 0.3  # the tiny model really moved
    assert (tmp / "metrics" / f"eval_loss_{RUN_NAME}.csv").is_file()
    scores = json.loads((run / "report.json").read_text())["metrics"]
    assert scores["tuned"]["perplexity"] < 0.8 * scores["base"]["perplexity"]
    assert "| metric | base | SFT |" in outputs_text(cell_after(nb, "report = evaluate_run("))
    assert not list((REPO / "metrics").glob(f"*_{RUN_NAME}.csv")), "wrote into the repository's metrics/"

    masked = cell_after(nb, "show.masked_view(")
    html = "".join(o["data"].get("text/html", "") for o in masked.outputs if "data" in o)
    assert "trained tokens" in html and "&lt;end_of_turn&gt;" in html
    assert "headless run" in outputs_text(cell_after(nb, "%tensorboard"))
    assert "4-bit NF4" in outputs_text(cell_after(nb, "model = load_model(cfg)"))
    assert "r=8, alpha=16" in outputs_text(cell_after(nb, "model = add_lora(model, cfg)"))
    assert "first train loss" in outputs_text(cell_after(nb, "show.training_summary(result)"))
    pushed = outputs_text(cell_after(nb, "push_folder("))  # PUSH_TO_HUB=False: a dry run, nothing sent
    assert "dry run" in pushed and "adapter_model.safetensors" in pushed
    assert (run / "release" / "adapter" / "README.md").is_file()
    dpo = json.loads((tmp / f"{RUN_NAME}-dpo" / "report.json").read_text())  # PREFERENCE_STAGE="dpo"
    assert list(dpo["columns"].values()) == ["base", "SFT", "SFT+DPO"]
    assert dpo["metrics"]["tuned"]["mean_margin"] > dpo["metrics"]["sft"]["mean_margin"]
    assert "| metric | base | SFT | SFT+DPO |" in outputs_text(cell_after(nb, "if PREFERENCE_STAGE:"))


@pytest.mark.slow
def test_inference_notebook_compares_base_and_tuned(fine_tuned, tmp_path, monkeypatch):
    run = fine_tuned[0] / RUN_NAME
    nb = with_parameters(NB01, PRESET="tiny", BASE_MODEL=None, QUANTIZATION="4bit",
                         ADAPTER_PATH=str(run / "adapter"), MAX_NEW_TOKENS=24)
    dump = tmp_path / "answers.json"  # the test reads the notebook's variables back through this file
    nb.cells.append(nbformat.v4.new_code_cell(
        f"import json\njson.dump(dict(one_by_one=one_by_one, batched=batched, tuned=tuned), open({str(dump)!r}, 'w'))"))
    execute(nb, REPO, monkeypatch)  # this time from the repository root
    answers = json.loads(dump.read_text())
    for key in ("one_by_one", "batched", "tuned"):
        assert len(answers[key]) == 4 and all(a["new_tokens"] > 0 for a in answers[key])
    assert [a["answer"] for a in answers["tuned"]] != [a["answer"] for a in answers["batched"]]
    table = outputs_text(cell_after(nb, "if ADAPTER_PATH:"))
    assert "tuned" in table and answers["tuned"][0]["answer"][:20] in table


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
