# The README's quick start: `make demo`, then `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
RUN_DIR ?= runs/demo

.PHONY: venv demo test bench-quality bench-scale samples clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $@

venv: $(VENV)/.installed

demo: venv
	$(VENV)/bin/poisonguard scan data/samples/digits_poisoned.parquet --out $(RUN_DIR) \
		--config configs/digits.yaml; code=$$?; \
	echo "outputs: $(RUN_DIR)/ (clean/, quarantine/, summary.json, provenance.jsonl); provenance log: runs/poisonguard-provenance.jsonl"; \
	exit $$code

test: venv
	$(PY) -m pytest -q tests

bench-quality: venv
	$(PY) -m pip install --quiet -e ".[bench]"
	$(PY) benchmarks/quality.py

bench-scale: venv
	$(PY) benchmarks/scale.py

samples: venv
	$(PY) data/samples/make_samples.py

clean:
	rm -rf runs .pytest_cache
