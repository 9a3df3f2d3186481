# Every target creates what it needs, starting from a bare machine with python3.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# The real torchtitan checkpoint manager that tests/test_torchtitan.py drives.
TORCHTITAN := torchtitan==0.3.0

.PHONY: setup demo test lint typecheck pytest bench clean

setup: $(STAMP)

# torch is pinned to the exact version first: a loose requirement would pull
# the newest CUDA build (several GB) from the package registry.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[dev]'
	$(PY) -m pip install --quiet --no-deps $(TORCHTITAN)
	touch $(STAMP)

demo: setup
	$(PY) examples/demo.py

test: lint typecheck pytest

lint: setup
	$(VENV)/bin/ruff check src tests examples bench
	$(VENV)/bin/ruff format --check src tests examples bench

typecheck: setup
	$(VENV)/bin/mypy

pytest: setup
	$(PY) -m pytest -q

# distcp vs torch DCP vs torch.save vs raw I/O, 1 GiB, all scenarios (a few minutes on a
# quiet machine); writes bench/results/latest.json and latest.md. Pass options with
# BENCH_ARGS, e.g. make bench BENCH_ARGS="--size-gib 0.0625 --rounds 1".
# Then object storage: distcp vs torch DCP's fsspec storage on a local S3 server
# (256 MiB, 2 ranks; bench/results/object_store.md), options in OBJECT_BENCH_ARGS;
# the converters' peak memory and speed (conversion.md); and the training stall of
# the checkpoint manager's modes next to torch DCP's async_save (manager_stall.md).
bench: setup
	$(PY) -m bench.run $(BENCH_ARGS)
	$(PY) -m bench.object_store $(OBJECT_BENCH_ARGS)
	$(PY) -m bench.conversion
	$(PY) -m bench.manager_stall

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache .hypothesis
