# wbc_spark: `make demo` runs the main job, `make test` runs the tests; both set everything up.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export PYSPARK_PYTHON := $(abspath $(PY))
export PYSPARK_DRIVER_PYTHON := $(abspath $(PY))

.PHONY: setup browser demo test test-fast pack cluster-start cluster-stop clean
PACK_VENV ?= runs/pack/venv
PACK ?= runs/wbc_env.tar.gz
# CPU executors get torch's CPU build (the CUDA build loads 3 GB of CUDA libraries at import,
# so it cannot be slimmed): 1.2 GB packed instead of 6 GB unpacked per executor. The newest CPU
# build on this machine's disk is torch 2.13.0+cpu; online, add the PyTorch CPU index with
# PACK_PIP='--extra-index-url https://download.pytorch.org/whl/cpu' and choose
# PACK_TORCH='torch==2.14.1+cpu'. torchvision (an optional extra, for model.source=torchvision)
# is left out: this machine has no CPU build of it. PACK_GPU=1 packs requirements/lock.txt
# as it is (CUDA included) for GPU executors.
PACK_TORCH ?= torch==2.13.0+cpu
PACK_PIP ?=

setup: $(STAMP)

$(STAMP): requirements/lock.txt pyproject.toml
	@command -v java >/dev/null || { echo "setup: Java 11 or 17 is required by Spark (apt-get install openjdk-17-jre-headless)"; exit 1; }
	python3 -m venv $(VENV)
	$(PY) -m pip install -q -r requirements/lock.txt
	$(PY) -m pip install -q -e '.[test,deploy,torchvision]'
	$(PY) -m pip check
	touch $@

demo: setup
	bash deploy/demo.sh

# The report's browser test needs Chromium (Debian's package; installed when run as root).
browser:
	@command -v chromium >/dev/null || command -v chromium-browser >/dev/null || command -v google-chrome >/dev/null || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; \
	  else echo "make test needs Chromium for the report's browser test: sudo apt-get install chromium"; exit 1; fi; }

test: setup browser pack
	$(PY) -m pytest -ra

test-fast: setup
	$(PY) -m pytest -ra -m "not slow"

# The environment for executors that do not have the project's (deploy/submit.sh with
# WBC_SPARK_ENV_ARCHIVE=$(PACK)): a fresh virtual environment that gets the package the way a
# user does (pip install -r requirements/lock.txt, then pip install .), packed by venv-pack.
pack: $(PACK)

$(PACK): Makefile $(STAMP) requirements/lock.txt $(shell find wbc_spark -name '*.py')
	rm -rf $(PACK_VENV) && python3 -m venv $(PACK_VENV)
	grep -v -E '$(if $(PACK_GPU),^$$,^(torch|torchvision)==)' requirements/lock.txt >$(PACK_VENV)/lock.txt
	$(if $(PACK_GPU),,printf '%s\n' $(PACK_TORCH) >>$(PACK_VENV)/lock.txt)
	$(PACK_VENV)/bin/pip install -q $(PACK_PIP) -r $(PACK_VENV)/lock.txt
	$(PACK_VENV)/bin/pip install -q $(PACK_PIP) .
	$(PACK_VENV)/bin/pip check
	$(VENV)/bin/venv-pack -q -f -p $(PACK_VENV) -o $@.tmp --format tar.gz --compress-level 1
	mv $@.tmp $@

cluster-start: setup
	bash deploy/local_cluster.sh start

cluster-stop:
	bash deploy/local_cluster.sh stop

clean:
	rm -rf runs spark-warehouse
