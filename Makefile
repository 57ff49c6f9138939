# Every target works on a fresh machine with only Python 3 and pip: the venv is created and
# filled on first use (and again whenever requirements.txt, setup.py or pyproject.toml change).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test bench install clean gpu gpu-quick gpu-install

demo: $(STAMP)
	$(PY) -m odenets_fast.demo

test: $(STAMP)
	$(PY) -m pytest -q tests --ignore=tests/gpu

# CPU benchmarks and the papers' figures (several minutes); tables on stdout, files in bench/results/.
bench: $(STAMP)
	$(PY) -m bench.cpu_training_step
	OMP_NUM_THREADS=1 $(PY) -m bench.memory --reps 7
	$(PY) -m bench.conv_example
	$(PY) -m bench.generic_blocks
	$(PY) -m bench.repro_gradient_error
	$(PY) -m bench.repro_smoothness
	$(PY) -m bench.error_control
	$(PY) -m bench.mnist1d
	$(PY) -m bench.mnist1d --long
	$(PY) -m bench.dispatch_overhead
	$(PY) -m pytest -q bench/test_micro.py --benchmark-only -rs --benchmark-json=bench/results/micro-cpu-$$(date +%Y%m%d).json

install: $(STAMP)

# No build isolation: a C++ extension must build against the torch installed from requirements.txt.
$(STAMP): requirements.txt requirements-nodeps.txt setup.py pyproject.toml $(wildcard csrc/*)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -r requirements-nodeps.txt
	$(PY) -m pip install -q --no-build-isolation -e .
	touch $@

clean:
	rm -rf $(VENV) build *.egg-info

# On a GPU machine (no venv, no internet: the machine's own torch and triton): install the package in
# place without the CPU extension (no GPU step uses it; it would cost a fresh machine a build), then
# bench.gpu_suite writes its report to bench/results/ (manual: bench/README.md). gpu-quick, the first
# call (budgeted at about 420 s on a cold machine; not yet measured): both paths' accuracy tests, then
# the goal configurations, nothing started after QUICK_BUDGET seconds. gpu: the whole GPU test suite and every benchmark,
# nothing started after BUDGET seconds (none: no limit).
GPU_PYTHON ?= python3
RESULTS ?= bench/results
QUICK_BUDGET ?= 330

gpu-install:
	ODENETS_FAST_SKIP_EXT=1 $(GPU_PYTHON) -m pip install -q --no-deps --no-build-isolation -e .

gpu-quick: gpu-install
	$(GPU_PYTHON) -m bench.gpu_suite --run quick --budget-s $(QUICK_BUDGET) --out $(RESULTS)

gpu: gpu-install
	$(GPU_PYTHON) -m bench.gpu_suite --run full $(if $(BUDGET),--budget-s $(BUDGET)) --out $(RESULTS)
