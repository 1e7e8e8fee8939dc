# Set-up and the two commands the README names. Poetry is installed into .tools/ (no global changes).
PYTHON ?= python3
TOOLS := .tools
POETRY := $(TOOLS)/bin/poetry
VENV := .venv
# Poetry's default PyPI client needs PyPI's per-version JSON API, which some mirrors do not serve;
# poetry-plugin-pypi-mirror points Poetry at pip's own configured index instead (read here, never committed).
ifeq ($(origin POETRY_PYPI_MIRROR_URL),undefined)
POETRY_PYPI_MIRROR_URL := $(shell $(PYTHON) -c 'from pip._internal.models.index import PyPI; print(PyPI.simple_url)')
endif
export POETRY_PYPI_MIRROR_URL
export POETRY_VIRTUALENVS_IN_PROJECT := true
# GGML_NATIVE=OFF for the `gguf` group's llama-cpp-python build: the native build used an AMX instruction that
# crashed (illegal instruction) on q8_0/q4_k_m files on some CPUs.
export CMAKE_ARGS ?= -DGGML_NATIVE=OFF

# Dependency groups: main (the package: training, evaluation, notebooks), dev (pytest, ruff, notebook runners),
# gguf (llama-cpp-python for `fine-tune-llm release gguf`; it compiles for minutes), eval (EleutherAI's
# lm-evaluation-harness for `fine-tune-llm evaluate --tasks`). Each group is installed
# once, then again only when pyproject.toml, poetry.lock or Poetry itself changed: a stamp file per group under
# .venv/. With the stamps fresh, demo/test/lint run without Poetry and without the network.
# `make install` installs main plus GROUPS (e.g. `make install GROUPS=dev,gguf`).
GROUPS ?=
STAMP := $(VENV)/.installed
comma := ,
group_stamps = $(STAMP)-main $(foreach g,$(subst $(comma), ,$(1)),$(STAMP)-$(g))

.PHONY: install install-dev install-gguf install-eval demo test test-fast lint lock clean
# One Poetry at a time: the group installs share one virtualenv.
.NOTPARALLEL:

$(POETRY):
	$(PYTHON) -m venv $(TOOLS)
	$(TOOLS)/bin/pip install --quiet "poetry>=2.1,<2.6" "poetry-plugin-pypi-mirror>=0.6"

$(STAMP)-main: pyproject.toml poetry.lock $(POETRY)
	$(POETRY) install --compile --only main
	@touch $@

# Another group: installed with main (so the main stamp is refreshed too).
$(STAMP)-%: pyproject.toml poetry.lock $(POETRY)
	$(POETRY) install --compile --only main,$*
	@touch $@ $(STAMP)-main

install: $(call group_stamps,$(GROUPS))

install-dev: $(call group_stamps,dev)

install-gguf: $(call group_stamps,gguf)

install-eval: $(call group_stamps,eval)

demo: $(STAMP)-main
	$(VENV)/bin/fine-tune-llm demo

# CI (.ci/run) runs exactly `make test`: lint first (seconds), then the whole suite.
# PYTEST_ARGS narrows it while developing, e.g. `make test PYTEST_ARGS=tests/test_lock.py`.
PYTEST_ARGS ?=
test: lint $(call group_stamps,dev gguf eval)
	$(VENV)/bin/pytest $(PYTEST_ARGS)

test-fast: lint $(call group_stamps,dev gguf eval)
	$(VENV)/bin/pytest -m "not slow" $(PYTEST_ARGS)

lint: $(STAMP)-dev
	$(VENV)/bin/ruff check fine_tune_llm tests benchmarks

# Re-resolve poetry.lock after editing pyproject.toml (keeps locked versions where it can).
lock: $(POETRY)
	$(POETRY) lock

clean:
	rm -rf runs .pytest_cache
