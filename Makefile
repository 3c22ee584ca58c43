# The README's two commands: `make demo` and `make test`. Both set up .venv themselves.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# A real Triton Inference Server for the [triton] tests (tests/rpc/triton_server.py): PyTriton
# bundles tritonserver but needs numpy<2, so it gets a venv of its own.
TRITON_VENV := .venv-triton
TRITON_STAMP := $(TRITON_VENV)/.installed

.PHONY: setup triton-venv test demo bench fuzz deploy-check image-check demo-robust-model ui-screenshots clean

setup: $(STAMP)

# torch first and pinned: 2.13.0 is the CPU wheel on these machines; the [server] extra's
# looser range is then already satisfied and pip fetches no CUDA build.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[server,ui,dev]'
	touch $(STAMP)

triton-venv: $(TRITON_STAMP)

$(TRITON_STAMP):
	$(PYTHON) -m venv $(TRITON_VENV)
	$(TRITON_VENV)/bin/pip install -q nvidia-pytriton==0.7.0 "numpy<2" onnxruntime
	touch $(TRITON_STAMP)

test: $(STAMP) $(TRITON_STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

# ARGS go to the demo: `make demo ARGS=--keep-serving` leaves its server running for `spurguard ui`.
demo: $(STAMP)
	$(BIN)/python -m spurguard.server.demo $(ARGS)

bench: $(STAMP)
	$(BIN)/python bench/run.py

# The request fuzzer of `make test` (tests/rpc/test_rpc_fuzz.py) with many more examples per RPC
# and a seed of its own each run (printed; FUZZ_SEED=N repeats one).
FUZZ_EXAMPLES ?= 1000
ifndef FUZZ_SEED
FUZZ_SEED := $(shell od -An -N4 -tu4 /dev/urandom | tr -d ' ')
endif
fuzz: $(STAMP)
	@echo "make fuzz: $(FUZZ_EXAMPLES) examples per RPC, seed $(FUZZ_SEED)"
	SPURGUARD_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) SPURGUARD_FUZZ_SEED=$(FUZZ_SEED) $(BIN)/python -m pytest -q tests/rpc/test_rpc_fuzz.py

# README "Deploy". Every overlay renders and validates, and the pod-args test runs the cpu
# Deployment's container here (these are part of `make test` too); then image-check.
deploy-check: $(STAMP)
	$(BIN)/python -m pytest -q tests/deploy
	$(MAKE) image-check

# The image: a Debian base (mmdebstrap, once), `podman build --isolation=chroot`, then its
# entrypoint and HEALTHCHECK run from the read-only mounted image. As root, with podman and
# mmdebstrap installed (.ci/run installs them); about 4 minutes the first time, 1 after.
image-check:
	$(PYTHON) deploy/docker/check_image.py

# The built-in demo_robust, retrained: L2 PGD adversarial training of the demo CNN on the demo's
# planted data (generated into .demo/data when missing), seeded. By hand, not part of `make test`:
# about 11 CPU-minutes (one thread, which beats two on a busy 2-core machine). Its settings,
# accuracy and the eps trade-off measured for it are in demo/model_robust/train_report.json.
ROBUST_DIR := server/spurguard/server/demo/model_robust
# Pictures of the labelling page (`spurguard ui`), taken by the browser test that makes them.
ui-screenshots: $(STAMP)
	SPURGUARD_UI_SCREENSHOTS=$(CURDIR)/ui-screenshots $(BIN)/python -m pytest -q tests/ui/test_ui_browser.py -k screenshots
	@echo "screenshots in ui-screenshots/"

demo-robust-model: $(STAMP)
	$(BIN)/python -m spurguard.server.demo.train --data .demo/data --out $(ROBUST_DIR) --name demo_robust \
		--eps 1.0 --attack-steps 3 --epochs 10 --seed 0 --threads 1

clean:
	rm -rf $(VENV) $(TRITON_VENV) build *.egg-info
