# Two commands do everything: `make train` and `make test`.
# Each creates .venv and installs requirements.txt first if needed; `make test` also
# installs the test-only requirements-dev.txt.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-requirements
DEV    := $(VENV)/.installed-dev-requirements

.PHONY: train test test-all bench venv clean

train: $(STAMP)
	$(PY) train.py -c config.json

test: $(DEV)
	$(PY) -m pytest

test-all: $(DEV)
	$(PY) -m pytest -m ""

bench: $(STAMP)
	$(PY) -m tools.bench.train_step

venv: $(STAMP)

# Re-installs when requirements.txt changes.
$(STAMP): requirements.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	@touch $(STAMP)

$(DEV): $(STAMP) requirements-dev.txt
	$(PY) -m pip install --quiet -r requirements-dev.txt
	@touch $(DEV)

clean:
	rm -rf $(VENV) .pytest_cache
