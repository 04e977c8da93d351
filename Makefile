# Two commands: `make demo` and `make test`. Both create/refresh .venv first (idempotent).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test setup lint clean

$(STAMP): setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(PY) tools/demo.py --workdir=runs/demo

# Tests run in parallel worker processes (pytest-xdist; one per core, at most 4): the suite is
# compile-bound and XLA:CPU compiles one program per process at a time.
TEST_WORKERS ?= auto
test: $(STAMP)
	$(PY) -m pytest -q -n $(TEST_WORKERS) --maxprocesses=4 --dist worksteal tests

lint: $(STAMP)
	$(PY) -m ruff check sgt_jax tools tests configs launch

clean:
	rm -rf $(VENV) runs .pytest_cache
