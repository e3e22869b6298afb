# dist_clip: build, test, demo, bench. `make test` on a fresh machine installs everything first.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
export DS_ACCELERATOR ?= cpu
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: install test test-fast demo bench bench-quick lint clean

install: $(STAMP)

# Idempotent: the stamp depends on the packaging files, so a second `make install` is a no-op.
# torch is pinned and installed first (the CPU build lying on disk here); DeepSpeed needs torch at build
# time, hence --no-build-isolation, and DS_BUILD_OPS=0 keeps it from compiling CUDA ops.
$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q numpy setuptools wheel ninja
	DS_BUILD_OPS=0 $(BIN)/pip install -q --no-build-isolation deepspeed==0.19.8
	$(BIN)/pip install -q torch==2.13.0 -e '.[fairscale,mpi,train,dev]'
	# The native CPU kernel, built ahead of first use; without a compiler dist_clip falls back to plain torch.
	-$(BIN)/python -m dist_clip._native
	touch $(STAMP)

test: install
	$(BIN)/python -m pytest tests

test-fast: install
	$(BIN)/python -m pytest tests -m "not slow"

demo: install
	NPROC=2 bash launch/torchrun.sh train --config configs/fsdp2.yaml

bench: install
	$(BIN)/python -m bench

bench-quick: install
	$(BIN)/python -m bench --quick

lint: install
	$(BIN)/ruff check dist_clip tests bench

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
