# memprof: two commands do everything on a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# DeepSpeed's JIT-built ops live in this checkout's venv: torch caches them by name only, so a shared
# ~/.cache/torch_extensions makes two checkouts rebuild each other's ops on every launch.
TORCH_EXTENSIONS_DIR ?= $(abspath $(VENV))/torch_extensions
export TORCH_EXTENSIONS_DIR

.PHONY: install demo test bench clean

install: $(STAMP)

# torch first, pinned, so the CPU wheel on this disk is used; anything that depends on torch
# afterwards finds it satisfied and does not pull a multi-GB CUDA build.
$(STAMP): pyproject.toml Makefile
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q --no-build-isolation "deepspeed==0.19.8"
	$(BIN)/pip install -q -e ".[test]"
	$(BIN)/python tests/browser_setup.py --install
	# compiled once here (a few minutes on 2 cores), not inside the first launch that needs them
	DS_ACCELERATOR=cpu $(BIN)/python launch/build_ops.py
	touch $(STAMP)

demo: install
	DS_ACCELERATOR=cpu $(BIN)/deepspeed --num_gpus 2 launch/train.py \
		--deepspeed_config configs/demo.json --model gpt2-tiny --steps 3 --out reports/demo

test: install
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q tests

bench: install
	$(BIN)/python benchmarks/run_all.py

clean:
	rm -rf $(VENV) reports/demo
