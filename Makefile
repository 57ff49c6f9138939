# Every target works on a fresh machine with only Python 3 and pip: the venv is created and
# filled on first use (and again whenever requirements.txt, setup.py or pyproject.toml change).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test bench install clean gpu gpu-quick

demo: $(STAMP)
	$(PY) -m odenets_fast.demo

test: $(STAMP)
	$(PY) -m pytest -q tests --ignore=tests/gpu

# CPU benchmarks and the papers' figures (several minutes); tables on stdout, files in bench/results/.
bench: $(STAMP)
	$(PY) -m bench.cpu_training_step
	$(PY) -m bench.memory
	$(PY) -m bench.conv_example
	$(PY) -m bench.repro_gradient_error
	$(PY) -m bench.repro_smoothness
	$(PY) -m bench.error_control
	$(PY) -m bench.mnist1d
	$(PY) -m bench.mnist1d --long
	$(PY) -m bench.dispatch_overhead
	$(PY) -m pytest -q bench/test_micro.py --benchmark-only -rs --benchmark-json=bench/results/micro-cpu-$$(date +%Y%m%d).json

install: $(STAMP)

# No build isolation: a C++ extension must build against the torch installed from requirements.txt.
$(STAMP): requirements.txt setup.py pyproject.toml $(wildcard csrc/*)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-build-isolation -e .
	touch $@

clean:
	rm -rf $(VENV) build *.egg-info

# On a GPU machine (no venv, no internet: the machine's own torch and triton): install the package
# in place (without the CPU extension, which no GPU stage uses: it would cost a fresh machine a
# build), run the GPU tests, compute-sanitizer, the kernel benchmarks, the memory comparison and the
# micro-benchmarks and tile candidates, write bench/results/. STAGES=tests,bench picks stages;
# BUDGET=<seconds> ends the run's subprocesses by then and starts no stage, test, configuration or
# depth after it (a device call's time limit), each stage but the last capped (CAPS=tests=300,… replaces
# some caps). Reports of stages run in separate calls become one with `python -m bench.gpu_suite --combine` (README).
GPU_PYTHON ?= python3
RESULTS ?= bench/results

gpu:
	ODENETS_FAST_SKIP_EXT=1 $(GPU_PYTHON) -m pip install -q --no-deps --no-build-isolation -e .
	$(GPU_PYTHON) -m bench.gpu_suite --out $(RESULTS) $(if $(STAGES),--stages $(STAGES)) $(if $(BUDGET),--budget-s $(BUDGET)) $(if $(CAPS),--stage-caps $(CAPS))

# The first call on a GPU machine, to fit one short device call (about 420 s on a cold machine): both
# paths' accuracy, then the goal configurations of the GPU issues, then as many other benchmark
# configurations as fit. `make gpu` (with STAGES=… of what is left) can follow in a second call.
QUICK_BUDGET ?= 330

gpu-quick:
	$(MAKE) gpu STAGES=quick,bench BUDGET=$(QUICK_BUDGET)
