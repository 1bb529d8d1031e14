# Two entry points (see README): `make demo` runs the main job, `make test` runs every check.
# Each creates the virtual environment .venv on first use (the exact versions of constraints.txt, within the
# ranges of settings.ini) and reuses it afterwards; it is rebuilt when settings.ini, setup.py or constraints.txt change.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test venv clean-runs

$(STAMP): settings.ini setup.py constraints.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[dev]"
	@touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/afd-sweep configs/demo.yaml

test: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" bash tests/check.sh
