# quantkit's two entry points: `make demo` (set up, quantize the bundled model, compare) and `make test`.
# Both create the virtual environment when it is missing. On a machine without an NVIDIA GPU the
# install is pinned to the CPU build of torch (constraints-cpu.txt), so nothing pulls CUDA wheels.

VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
QK := $(VENV)/bin/quantkit
CONSTRAINTS := $(shell command -v nvidia-smi >/dev/null 2>&1 || echo "-c constraints-cpu.txt")
DEMO_OUT ?= out/quantkit-target-w4a16-g128
export HF_HUB_OFFLINE ?= 1

.PHONY: setup demo test test-gpu clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints-cpu.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(CONSTRAINTS) -e '.[dev,server]'
	touch $@

demo: setup
	$(QK) quantize --scheme w4a16 --group-size 128 -o $(DEMO_OUT) --overwrite
	$(QK) eval $(DEMO_OUT) --baseline quantkit-target --dataset wikitext2

test: setup
	TRITON_INTERPRET=1 $(PY) -m pytest -q -m "not gpu" --durations=10

test-gpu: setup
	$(PY) -m pytest -q -m gpu

clean:
	rm -rf $(VENV) out .pytest_cache
