VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: demo test lint bench-dp clean

$(VENV)/.plait-installed: pyproject.toml scripts/setup_venv.sh
	VENV=$(VENV) bash scripts/setup_venv.sh

demo: $(VENV)/.plait-installed
	$(VENV)/bin/plait train

test: $(VENV)/.plait-installed
	$(PY) -m pytest -q tests

lint: $(VENV)/.plait-installed
	$(VENV)/bin/ruff check .

bench-dp: $(VENV)/.plait-installed
	$(VENV)/bin/plait bench dp --json runs/bench_dp.json

clean:
	rm -rf runs .pytest_cache
