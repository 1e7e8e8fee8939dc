# Set-up and the two commands the README names. Poetry is installed into .tools/ (no global changes).
PYTHON ?= python3
TOOLS := .tools
POETRY := $(TOOLS)/bin/poetry
# Poetry's default PyPI client needs PyPI's per-version JSON API, which some mirrors do not serve;
# poetry-plugin-pypi-mirror points Poetry at pip's own configured index instead (read here, never committed).
export POETRY_PYPI_MIRROR_URL ?= $(shell $(PYTHON) -c 'from pip._internal.models.index import PyPI; print(PyPI.simple_url)')
export POETRY_VIRTUALENVS_IN_PROJECT := true
# `gguf` holds llama-cpp-python (GGUF quantization and checks); it compiles for ~6 minutes. GGML_NATIVE=OFF: the
# native build used an AMX instruction that crashed (illegal instruction) on q8_0/q4_k_m files on some CPUs.
GROUPS ?= dev,gguf
export CMAKE_ARGS ?= -DGGML_NATIVE=OFF

.PHONY: install demo test test-fast lint clean

$(POETRY):
	$(PYTHON) -m venv $(TOOLS)
	$(TOOLS)/bin/pip install --quiet "poetry>=2.1,<2.6" "poetry-plugin-pypi-mirror>=0.6"

install: $(POETRY)
	$(POETRY) install --compile --with $(GROUPS)

demo: install
	$(POETRY) run fine-tune-llm demo

test: install
	$(POETRY) run pytest

test-fast: install
	$(POETRY) run pytest -m "not slow"

lint: install
	$(POETRY) run ruff check fine_tune_llm tests benchmarks

clean:
	rm -rf runs .pytest_cache
