# The README's quick start: `make demo`, then `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
RUN_DIR ?= runs/demo

.PHONY: venv browser demo test airflow-check bench-quality bench-scale bench-embed samples clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $@

venv: $(VENV)/.installed

# The report test renders report.html in a real headless Chromium (Debian's package).
browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || { \
		echo "installing Debian's chromium for the report test"; \
		if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq chromium; \
		else sudo apt-get update -qq && sudo apt-get install -y -qq chromium; fi; }

demo: venv
	$(VENV)/bin/poisonguard scan data/samples/digits_poisoned.parquet --out $(RUN_DIR) \
		--config configs/digits.yaml --state runs/state; code=$$?; \
	echo "outputs: $(RUN_DIR)/ (report.html, review.csv, clean/, quarantine/, summary.json, provenance.jsonl)"; \
	echo "provenance log: runs/poisonguard-provenance.jsonl; state (decisions, drift baselines): runs/state"; \
	exit $$code

# Two test workers, one BLAS/OpenMP thread each: with each worker's BLAS spreading over every core
# the workers contend (on 2 cores the suite took 172-188 s that way, 125 s this way).
test: venv browser
	OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 MKL_NUM_THREADS=1 $(PY) -m pytest -q -n 2 --dist worksteal tests

# The example DAG under `airflow dags test`, with Airflow in its own venv (not part of `make test`:
# installing Airflow takes about 40 s here, the check itself about 20 s).
AIRFLOW_VENV ?= .airflow-venv
$(AIRFLOW_VENV)/.installed:
	$(PYTHON) -m venv $(AIRFLOW_VENV)
	$(AIRFLOW_VENV)/bin/pip install --quiet "apache-airflow>=2.9"
	touch $@

airflow-check: venv $(AIRFLOW_VENV)/.installed
	bash examples/airflow-check.sh

bench-quality: venv
	$(PY) -m pip install --quiet -e ".[bench]"
	$(PY) benchmarks/quality.py

bench-scale: venv  # the committed table's run (appended to benchmarks/results/scale.md)
	$(PY) benchmarks/scale.py --sizes 100000x128,1000000x128,3000000x128 --repeat 3

bench-embed: venv
	$(PY) benchmarks/embed.py

samples: venv
	$(PY) data/samples/make_samples.py

clean:
	rm -rf runs .pytest_cache
