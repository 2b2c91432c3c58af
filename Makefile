# The README's two commands: `make demo` and `make test`. Each sets itself up first.
PY := .venv/bin/python

.PHONY: setup demo test lint bench

setup:
	@bash scripts/setup.sh

demo: setup
	$(PY) -m qsmnode demo $(DEMO_ARGS)

test: setup
	$(PY) -m ruff check qsmnode tests benchmarks
	$(PY) -m pytest

bench: setup
	for b in benchmarks/bench_*.py; do $(PY) $$b || exit 1; done
