# Two commands on a fresh machine: `make demo` and `make test`.
# Both create .venv when it is missing and install the project into it with pinned versions.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Demo size: the original system's full scale (1,223,992 rows). Smaller: make demo DEMO_ROWS=200000
DEMO_ROWS ?= 1223992
DEMO_DATA := data/generated/capums
DEMO_CSV := data/generated/CaPUMS5full.csv

.PHONY: install demo data test test-fast test-multidevice clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[spark,test]'
	touch $(STAMP)

# Census-like CSV in the original CaPUMS5full.csv schema, then the Spark job (local mode)
# turns it into HDF5 shards with a manifest (malformed rows would go to rejects/).
data: $(STAMP)
	mkdir -p data/generated
	$(PY) -m preprocessing.synthesize --rows $(DEMO_ROWS) --schema capums --seed 0 --output $(DEMO_CSV)
	$(PY) -m preprocessing.spark_job --input $(DEMO_CSV) --output $(DEMO_DATA) --spec capums --overwrite

# A fresh workdir each time (a rerun in the same workdir would resume, not retrain).
demo: data
	rm -rf runs/demo
	$(PY) main.py --config=configs/seq.py --config.data.path=$(DEMO_DATA) --workdir=runs/demo

# All tests: the main suite, then the 8-fake-device tests in their own process (the CPU
# device count is fixed once JAX starts). pytest's exit code 5 (no tests ran) fails the target.
test: $(STAMP)
	$(PY) -m pytest -q tests -m "not multidevice"
	XLA_FLAGS=--xla_force_host_platform_device_count=8 $(PY) -m pytest -q tests -m multidevice

clean:
	rm -rf runs data/generated
