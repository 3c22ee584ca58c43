# The README's two commands: `make demo` and `make test`. Both set up .venv themselves.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# A real Triton Inference Server for the [triton] tests (tests/rpc/triton_server.py): PyTriton
# bundles tritonserver but needs numpy<2, so it gets a venv of its own.
TRITON_VENV := .venv-triton
TRITON_STAMP := $(TRITON_VENV)/.installed

.PHONY: setup triton-venv test demo bench demo-robust-model clean

setup: $(STAMP)

# torch first and pinned: 2.13.0 is the CPU wheel on these machines; the [server] extra's
# looser range is then already satisfied and pip fetches no CUDA build.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[server,dev]'
	touch $(STAMP)

triton-venv: $(TRITON_STAMP)

$(TRITON_STAMP):
	$(PYTHON) -m venv $(TRITON_VENV)
	$(TRITON_VENV)/bin/pip install -q nvidia-pytriton==0.7.0 "numpy<2" onnxruntime
	touch $(TRITON_STAMP)

test: $(STAMP) $(TRITON_STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

demo: $(STAMP)
	$(BIN)/python -m spurguard.server.demo

bench: $(STAMP)
	$(BIN)/python bench/run.py

# The built-in demo_robust, retrained: L2 PGD adversarial training of the demo CNN on the demo's
# planted data (generated into .demo/data when missing), seeded. By hand, not part of `make test`:
# about 11 CPU-minutes (one thread, which beats two on a busy 2-core machine). Its settings,
# accuracy and the eps trade-off measured for it are in demo/model_robust/train_report.json.
ROBUST_DIR := server/spurguard/server/demo/model_robust
demo-robust-model: $(STAMP)
	$(BIN)/python -m spurguard.server.demo.train --data .demo/data --out $(ROBUST_DIR) --name demo_robust \
		--eps 1.0 --attack-steps 3 --epochs 10 --seed 0 --threads 1

clean:
	rm -rf $(VENV) $(TRITON_VENV) build *.egg-info
