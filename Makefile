# The whole developer interface. `make demo` and `make test` create .venv/ when it is missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
PYTEST := $(PY) -m pytest -q
# Exact versions that last passed `make test` (`make lock` re-resolves and re-tests them). Applied as pip
# constraints without the torch line: torch is installed on its own below, so a CUDA machine keeps the torch it has.
LOCK := requirements/lock.txt
CONSTRAINTS := $(VENV)/constraints.txt

.PHONY: demo test test-cpu test-interpret test-gpu lint bench install lock clean

$(STAMP): pyproject.toml setup.py CMakeLists.txt $(LOCK) $(wildcard csrc/*.cpp csrc/*/*.cpp csrc/*/*.cu csrc/*/*.h)
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@# CPU torch from local disk where no torch is installed; a CUDA machine keeps the torch it has.
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$$(grep -E '^torch==' $(LOCK))"
	@grep -vE '^torch==' $(LOCK) > $(CONSTRAINTS)
	$(PY) -m pip install -q -c $(CONSTRAINTS) setuptools wheel cmake
	@# HFF_FORCE_EXT=1: here a failed native build is an error, not a silent fallback (HFF_SKIP_EXT=1 opts out)
	HFF_FORCE_EXT=$${HFF_FORCE_EXT:-1} $(PY) -m pip install -q -c $(CONSTRAINTS) --no-build-isolation -e ".[dev]"
	@touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/hermesflow demo

test: test-cpu test-interpret

test-cpu: $(STAMP)
	$(PYTEST) -m "not interpret" tests

test-interpret: $(STAMP)
	TRITON_INTERPRET=1 $(PYTEST) -m interpret tests

test-gpu: $(STAMP)
	$(PYTEST) -m gpu tests

lint: $(STAMP)
	$(VENV)/bin/ruff check .

lock:
	bash requirements/lock.sh

bench: $(STAMP)
	$(VENV)/bin/hermesflow bench logprobs

clean:
	rm -rf build *.egg-info hermesflow_fast/_C*.so
