# dist_clip: build, test, demo, bench. `make test` on a fresh machine installs everything first.
# Paths are relative to this file, so that `make -f path/to/Makefile test` works from any folder.
ROOT    := $(patsubst %/,%,$(dir $(abspath $(lastword $(MAKEFILE_LIST)))))
PY      ?= python3
VENV    ?= $(ROOT)/.venv
BIN     := $(abspath $(VENV))/bin
STAMP   := $(VENV)/.installed
export DS_ACCELERATOR ?= cpu
export PATH := $(BIN):$(PATH)

.PHONY: install test test-fast demo bench bench-quick lint clean

install: $(STAMP)

# Idempotent: the stamp depends on the packaging files, so a second `make install` is a no-op.
# torch is pinned and installed first (the CPU build lying on disk here); DeepSpeed needs torch at build
# time, hence --no-build-isolation, and DS_BUILD_OPS=0 keeps it from compiling CUDA ops.
$(STAMP): $(ROOT)/pyproject.toml $(ROOT)/Makefile
	test -x $(BIN)/python || $(PY) -m venv $(abspath $(VENV))
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q numpy setuptools wheel ninja
	DS_BUILD_OPS=0 $(BIN)/pip install -q --no-build-isolation deepspeed==0.19.8
	$(BIN)/pip install -q torch==2.13.0 -e '$(ROOT)[fairscale,mpi,train,dev]'
	# The native CPU kernel, built ahead of first use; without a compiler dist_clip falls back to plain torch.
	# Not `python -m dist_clip._native`: runpy warns that the package's __init__ already imported the module.
	-$(BIN)/python -c 'import dist_clip._native as n; n.main()'
	# DeepSpeed's CPU comm op, built here once: the first DeepSpeed test built it inside its ranks' timeout (a minute
	# on idle cores, 15 beside other jobs), and a build killed midway left a lock that stalled every later one.
	-$(BIN)/python -c 'from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder as B; B().load()'
	touch $(STAMP)

test: install
	cd $(ROOT) && $(BIN)/python -m pytest tests

test-fast: install
	cd $(ROOT) && $(BIN)/python -m pytest tests -m "not slow"

# PYTHON: the interpreter installed into $(VENV); the script's own pick (the repository's .venv, or a PYTHON from the
# environment) ran another one with VENV= given.
demo: install
	cd $(ROOT) && PYTHON=$(BIN)/python NPROC=2 bash launch/torchrun.sh train --config configs/fsdp2.yaml

bench: install
	cd $(ROOT) && $(BIN)/python -m bench

bench-quick: install
	cd $(ROOT) && $(BIN)/python -m bench --quick

lint: install
	cd $(ROOT) && $(BIN)/ruff check dist_clip tests bench

clean:
	rm -rf $(abspath $(VENV))
	cd $(ROOT) && rm -rf build *.egg-info .pytest_cache
