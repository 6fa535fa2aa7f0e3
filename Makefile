# Two commands for a newcomer: `make demo` (set up, then fine-tune on the embedded dataset)
# and `make test` (set up, then run the tests). Everything lives in .venv.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test test-hub1 gpu-check bench reproduce cards clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints.txt torch torchvision
	$(BIN)/pip install -q -c constraints.txt -e '.[test,demo]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/nfnet-zoo demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

# The Hub tests on huggingface_hub's 1.x line (CI runs the whole suite on the pinned 2.x line).
HUB1 ?= .venv-hub1
test-hub1: $(HUB1)/.installed
	$(HUB1)/bin/python -m pytest -q tests/test_hub.py tests/test_install.py

$(HUB1)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(HUB1)
	$(HUB1)/bin/pip install -q -c constraints.txt torch torchvision
	$(HUB1)/bin/pip install -q -c constraints.txt 'huggingface_hub>=1.31,<2' -e '.[test]'
	touch $@

# On a GPU machine as it is: its own python, torch, timm and accelerate; no venv, no installs, no network.
# One log (gpu_check.log). DEVICE=cpu runs the same on the CPU; QUICK=1 is the smallest form (CI).
DEVICE ?= cuda
gpu-check:
	$(PYTHON) benchmarks/gpu_check.py --device $(DEVICE) $(if $(QUICK),--quick) $(if $(LOG),--log $(LOG))

bench: $(STAMP)  ## writes BENCHMARKS.md (about 10 minutes on 2 cores)
	$(BIN)/python benchmarks/bench.py

# The paper's AGC batch-size ablation at toy scale (about 18 minutes on 2 cores): REPRODUCTION.md and
# reproduction/*.png. QUICK=1 runs a tiny grid into reproduce-quick/ (seconds; CI runs it in tests).
reproduce: $(STAMP)
	$(BIN)/python experiments/reproduce.py $(if $(QUICK),--quick)

cards: $(STAMP)
	$(BIN)/nfnet-zoo cards

clean:
	rm -rf $(VENV) $(HUB1) build src/*.egg-info
