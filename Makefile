# wbc_spark: `make demo` runs the main job, `make test` runs the tests; both set everything up.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export PYSPARK_PYTHON := $(abspath $(PY))
export PYSPARK_DRIVER_PYTHON := $(abspath $(PY))

.PHONY: setup demo test test-fast cluster-start cluster-stop clean

setup: $(STAMP)

$(STAMP): requirements/lock.txt requirements/petastorm.txt pyproject.toml
	@command -v java >/dev/null || { echo "setup: Java 11 or 17 is required by Spark (apt-get install openjdk-17-jre-headless)"; exit 1; }
	python3 -m venv $(VENV)
	$(PY) -m pip install -q -r requirements/lock.txt
	# petastorm pins setuptools<70, torch 2.14 needs >=77: install it without its pins.
	$(PY) -m pip install -q --no-deps -r requirements/petastorm.txt
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $@

demo: setup
	bash deploy/demo.sh

test: setup
	$(PY) -m pytest -ra

test-fast: setup
	$(PY) -m pytest -ra -m "not slow"

cluster-start: setup
	bash deploy/local_cluster.sh start

cluster-stop:
	bash deploy/local_cluster.sh stop

clean:
	rm -rf runs spark-warehouse
