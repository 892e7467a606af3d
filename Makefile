# The README's two commands: `make demo` (set up, then run the demo) and `make test`.
# Set-up is a virtual environment in .venv with the CPU build of PyTorch pinned, so pip never
# pulls a multi-GB CUDA build on a machine without a GPU. Override TORCH for another build.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: setup demo test lint clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet '$(TORCH)' -e '.[dev]'
	touch $@

demo: setup
	$(BIN)/vaelab demo --out runs/demo

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: lint
	$(BIN)/pytest -q

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
