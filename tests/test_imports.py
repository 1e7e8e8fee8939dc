"""The package's shape: modules import downward only, no class hides inside a function, one owner per name."""

import ast
import re
from pathlib import Path

from tests.conftest import REPO

PACKAGE = REPO / "fine_tune_llm"


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """Every fine_tune_llm module this one imports, at top level or inside a function."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                target = f"{base}.{alias.name}"
                found.add(target if target in known else base)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return {m for m in found if m in known and m != name}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def import_graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: imports_of(name, path, set(mods)) for name, path in mods.items()}


def test_the_cycle_finder_finds_a_planted_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_module_imports_one_that_imports_it_back():
    graph = import_graph()
    assert graph["fine_tune_llm.train.sft"], "the walker found no imports at all"
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


# The stages, bottom to top. A module may import its own layer or a lower one, never a higher one, so a reader can
# follow the job upward: the shared core (config, errors, files), the data, the model, the run directory and its
# manifest (which record the data's split and the model's source), training, evaluation, release, and the front
# ends (the command line, what the notebooks show) on top.
LAYERS = [
    {"fine_tune_llm.errors", "fine_tune_llm.files", "fine_tune_llm.config", "fine_tune_llm.console"},
    {"fine_tune_llm.data"},
    {"fine_tune_llm.model"},
    {"fine_tune_llm.run", "fine_tune_llm.manifest"},
    {"fine_tune_llm.train"},
    {"fine_tune_llm.eval"},
    {"fine_tune_llm.release"},
    {"fine_tune_llm.cli", "fine_tune_llm.notebook"},
    {"fine_tune_llm", "fine_tune_llm.__main__"},
]


def layer_of(module: str) -> int:
    parts = module.split(".")
    for depth in (2, 1):
        prefix = ".".join(parts[:depth])
        for i, layer in enumerate(LAYERS):
            if prefix in layer:
                return i
    raise AssertionError(f"{module} is in no layer: add its folder to LAYERS")


def test_the_package_is_folders_by_stage_with_few_top_level_modules():
    top = sorted(p.stem for p in PACKAGE.glob("*.py"))
    assert top == ["__init__", "__main__", "config", "console", "errors", "files", "manifest", "run"], top
    stages = sorted(p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file())
    assert {"data", "model", "train", "eval", "release", "cli"} <= set(stages), stages


def test_stages_import_downward_only():
    upward = [f"{name} -> {dep}" for name, deps in import_graph().items() for dep in deps
              if layer_of(dep) > layer_of(name)]
    assert not upward, upward


def test_the_layer_check_catches_an_upward_import():
    assert layer_of("fine_tune_llm.eval.scoring") > layer_of("fine_tune_llm.model.generation")
    assert layer_of("fine_tune_llm.data.rows") < layer_of("fine_tune_llm.run")


def test_no_class_is_defined_inside_a_function():
    nested = []
    for name, path in modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                nested += [f"{name}.{node.name}.{c.name}" for c in ast.walk(node) if isinstance(c, ast.ClassDef)]
    assert not nested, nested


def test_only_the_run_directory_module_spells_the_run_layout():
    offenders = [f"{name}:{n}" for name, path in modules().items() if name != "fine_tune_llm.run"
                 for n, line in enumerate(path.read_text().splitlines(), 1) if '"config.yaml"' in line]
    assert not offenders, offenders


def test_splits_are_made_in_one_place():
    calls = [name for name, path in modules().items() if re.search(r"\bload_splits\(cfg", path.read_text())]
    assert calls == ["fine_tune_llm.train.sft"], calls


def test_cli_start_up_does_not_import_trl():
    import subprocess
    import sys

    code = "import sys, fine_tune_llm.cli.commands as c; c.build_parser(); print('trl' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120,
                         check=False)
    assert out.stdout.strip() == "False", out.stderr[-2000:]


def test_the_public_surface_names_what_it_exports():
    import fine_tune_llm

    assert set(fine_tune_llm.__all__) == set(fine_tune_llm._OWNERS) | set(fine_tune_llm._MODULES)
    assert fine_tune_llm.show.__name__ == "fine_tune_llm.notebook.display"
    for name in ("RunDir", "make_config", "evaluate_run", "generate_answers"):
        assert getattr(fine_tune_llm, name).__name__ == name


def test_the_public_train_is_the_function_even_after_the_train_folder_is_imported():
    """`train` names both a public function and the stage folder train/; importing a module of the folder binds
    the folder's name on the package, which made `from fine_tune_llm import train` (notebook 02) the folder."""
    import fine_tune_llm.train.lineage  # noqa: F401 - what a notebook's earlier `import prepare_data` also does
    from fine_tune_llm import train
    from fine_tune_llm.train import sft

    assert train is sft.train
    assert sft.__name__ == "fine_tune_llm.train.sft"  # the folder's modules still import by their dotted names


def test_the_notebooks_import_only_the_public_surface():
    import json

    import fine_tune_llm

    for notebook in sorted((REPO / "notebooks").glob("*.ipynb")):
        code = "\n".join("".join(c["source"]) for c in json.loads(notebook.read_text())["cells"]
                         if c["cell_type"] == "code")
        # IPython magics (%tensorboard) are not Python: each becomes a `pass` at its indentation.
        lines = [line.split("%")[0] + "pass" if line.lstrip().startswith("%") else line for line in code.splitlines()]
        tree = ast.parse("\n".join(lines))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("fine_tune_llm"):
                assert node.module == "fine_tune_llm", f"{notebook.name}: from {node.module} import ..."
                missing = [a.name for a in node.names if a.name not in fine_tune_llm.__all__]
                assert not missing, f"{notebook.name} imports {missing}, which __all__ does not export"
            if isinstance(node, ast.Import):
                assert not any(a.name.startswith("fine_tune_llm") for a in node.names), notebook.name
