# wbc_spark: `make demo` runs the main job, `make test` runs the tests; both set everything up.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export PYSPARK_PYTHON := $(abspath $(PY))
export PYSPARK_DRIVER_PYTHON := $(abspath $(PY))

.PHONY: setup browser demo test test-fast cluster-start cluster-stop clean

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

# The report's browser test needs Chromium (Debian's package; installed when run as root).
browser:
	@command -v chromium >/dev/null || command -v chromium-browser >/dev/null || command -v google-chrome >/dev/null || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; \
	  else echo "make test needs Chromium for the report's browser test: sudo apt-get install chromium"; exit 1; fi; }

test: setup browser
	$(PY) -m pytest -ra

test-fast: setup
	$(PY) -m pytest -ra -m "not slow"

cluster-start: setup
	bash deploy/local_cluster.sh start

cluster-stop:
	bash deploy/local_cluster.sh stop

clean:
	rm -rf runs spark-warehouse
