# The two Quickstart commands: `make demo` and `make test`. Both create .venv and install with the CPU torch pin.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: demo test install clean

$(BIN)/activate:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: $(BIN)/activate pyproject.toml
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e ".[dev,slurm]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(BIN)/seqrl-train experiment=smoke

test: install
	bash .ci/verl_ref.sh $(VENV)  # verl's core_algos for the parity tests, beside the venv (it pins an old transformers)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) outputs multirun .pytest_cache
