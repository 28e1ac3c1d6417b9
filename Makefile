# Two commands do everything: `make train` and `make test`.
# Each creates .venv and installs requirements.txt first if needed.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-requirements

.PHONY: train test test-all bench venv clean

train: $(STAMP)
	$(PY) train.py -c config.json

test: $(STAMP)
	$(PY) -m pytest

test-all: $(STAMP)
	$(PY) -m pytest -m ""

bench: $(STAMP)
	$(PY) bench/train_step.py

venv: $(STAMP)

# Re-installs when requirements.txt changes.
$(STAMP): requirements.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	@touch $(STAMP)

clean:
	rm -rf $(VENV) .pytest_cache
