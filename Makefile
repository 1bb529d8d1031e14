# Two entry points (see README): `make demo` runs the main job, `make test` runs every check.
# Each creates the virtual environment .venv on first use (the exact versions of constraints.txt, within the
# ranges of settings.ini) and reuses it afterwards; it is rebuilt when settings.ini, setup.py or constraints.txt change.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test venv clean-runs

# PyTorch's wheel: `auto` takes the CPU wheel index when there is no NVIDIA driver (no nvidia-smi), pip's default
# index otherwise; `make demo TORCH_INDEX=default` (or cpu, or an index URL) overrides it. An unreachable index
# falls back to the default wheel with one line saying so (tools/torch_wheel.py).
TORCH_INDEX ?= auto

$(STAMP): settings.ini setup.py constraints.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python tools/torch_wheel.py --index "$(TORCH_INDEX)" --pip "$(BIN)/python -m pip"
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[dev]"
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

# The executed notebooks as HTML pages in _pages/ (tools/make_pages.py): readable offline, maths typeset by the MathJax
# copy of the jupyter-server-mathjax package, and hidden what nbdev hides from the docs. Open _pages/index.html.
.PHONY: pages
pages: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python tools/make_pages.py

# The CPU study past the collapse (configs/cpu-study-2.yaml, 34 runs, about 4 hours on 2 cores: 3.9 measured, 4.9 on a slower
# CPU; stop and rerun to resume), then its summary in results/cpu-study/ (report, CSVs, figures, provenance, the
# finished runs' small files; the first, 40-step study is kept in results/cpu-study/40-step/).
.PHONY: study
study: $(STAMP)
	$(BIN)/afd-sweep configs/cpu-study-2.yaml
	$(BIN)/python tools/publish_results.py configs/cpu-study-2.yaml --runs runs/cpu-study-2 --out results/cpu-study --keep-runs

# GPU check (nbs/15_gpucheck.ipynb): one command for a short window on one GPU, no install step. On a bare GPU
# machine carry data/cifar10_jpeg.npz (a copy, not a link) and .whl/ (from `make gpu-wheels`, run where pip works).
.PHONY: gpu-check gpu-wheels
# The check stops itself at GPU_BUDGET s; `timeout` (budget + 60 s for Python, CUDA and the data to start) is the backstop.
GPU_BUDGET  ?= 480
GPU_TIMEOUT ?= 540
GPU_OUT     ?= results/gpu/$(shell date -u +%Y%m%d-%H%M%S)
gpu-check:
	PYTHONPATH=.:.whl/site$${PYTHONPATH:+:$$PYTHONPATH} timeout -k 15 $(GPU_TIMEOUT) python3 -m afd_nb.gpucheck --budget $(GPU_BUDGET) --out $(GPU_OUT)

gpu-wheels:
	rm -rf .whl && mkdir -p .whl/dl .whl/site
	printf 'pyautoattack==0.2.0 --hash=sha256:ce84de323b52ca109949d07a9df8e2f1072a8742bd951a020a678259f93f652d\ntorchattacks==3.5.1 --hash=sha256:10c1b05f3a0b52869a91dfa9f9d5adf613750276a15f41fdbd361127cc6bd703\n' > .whl/requirements.txt
	python3 -m pip download --no-deps --only-binary=:all: --require-hashes -r .whl/requirements.txt -d .whl/dl
	python3 -c "import glob, zipfile; [z.extractall('.whl/site', [n for n in z.namelist() if '/examples/' not in n]) for z in map(zipfile.ZipFile, glob.glob('.whl/dl/*.whl'))]"
	rm -rf .whl/dl && du -sh .whl
