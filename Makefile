# Two entry points (see README): `make demo` runs the main job, `make test` runs every check.
# Each creates the virtual environment .venv on first use (pinned versions from settings.ini)
# and reuses it afterwards; it is rebuilt when settings.ini or setup.py change.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test venv clean-runs

$(STAMP): settings.ini setup.py
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ".[dev]"
	@touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/afd-sweep configs/demo.yaml

test: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" bash tests/check.sh

# Re-execute every library notebook in nbs/ in place (CPU, one thread per kernel, 2 at a time) and save the outputs;
# `make notebooks NB="nbs/07_baselines.ipynb nbs/index.ipynb"` runs only those.
.PHONY: notebooks
notebooks: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python tools/run_notebooks.py $(NB)
