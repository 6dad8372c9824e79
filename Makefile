# `make run`: create .venv, install, run the default experiment.
# `make test`: create .venv, install with the test and dgl extras, run the test suite.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
export OMP_NUM_THREADS ?= 1

.PHONY: run test bench clean

$(VENV)/.base: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e .
	touch $@

$(VENV)/.test: $(VENV)/.base
	$(PY) -m pip install --quiet -e '.[test,dgl]'
	touch $@

run: $(VENV)/.base
	$(VENV)/bin/mmkd run

test: $(VENV)/.test
	$(PY) -m pytest

# every benchmark (long: about two hours on 2 CPU cores); tables land in benchmarks/results/
bench: $(VENV)/.test
	cd benchmarks && for b in quickstart trainer_overhead cache_speedup avdigits mst_distill g2m_accuracy g2m_latency; do \
		MMKD_DATA=$${MMKD_DATA:-../../shared/data} ../$(PY) $$b.py || exit 1; done

clean:
	rm -rf $(VENV) runs build *.egg-info
