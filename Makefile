# Two entry points on a fresh clone:  make demo  and  make test
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: demo test bench lint clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(VENV)/.installed-run: $(BIN)/python pyproject.toml setup.py ext/_native.pyx
	$(BIN)/pip install --quiet -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed-run
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

demo: $(VENV)/.installed-run
	$(BIN)/calstream run configs/demo.toml

test: $(VENV)/.installed-test
	$(BIN)/ruff check src tests bench
	$(BIN)/pytest

bench: $(VENV)/.installed-test
	$(BIN)/pytest bench --benchmark-only

lint: $(VENV)/.installed-test
	$(BIN)/ruff check src tests bench

clean:
	rm -rf build dist src/*.egg-info src/calstream/_native*.so ext/*.c spool data constants
