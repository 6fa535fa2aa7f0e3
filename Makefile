# Two commands for a newcomer: `make demo` (set up, then fine-tune on the embedded dataset)
# and `make test` (set up, then run the tests). Everything lives in .venv.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test test-hub1 test-floors gpu-check bench reproduce cards clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints.txt torch torchvision
	$(BIN)/pip install -q -c constraints.txt -e '.[test,demo]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/nfnet-zoo demo

# Two pytest workers, a test file each at a time (module fixtures built once): the suite is mostly process starts
# and small CPU runs, which two workers overlap on two cores.
test: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 --dist loadfile

# The Hub tests on huggingface_hub's 1.x line (CI runs the whole suite on the pinned 2.x line).
HUB1 ?= .venv-hub1
test-hub1: $(HUB1)/.installed
	$(HUB1)/bin/python -m pytest -q tests/test_hub.py tests/test_install.py

$(HUB1)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(HUB1)
	$(HUB1)/bin/pip install -q -c constraints.txt torch torchvision
	$(HUB1)/bin/pip install -q -c constraints.txt 'huggingface_hub>=1.31,<2' -e '.[test]'
	touch $@

# pyproject.toml's lower bounds (constraints-floor.txt) installed together from nothing, and the tests of what
# touches their APIs (model creation, finetune, evaluate, predict, push to a local Hub, cards, AGC with
# accelerate, saved datasets, Hub datasets by name, parquet and WebDataset shards) run with them. CI runs it after `make test`.
FLOOR ?= .venv-floor
FLOOR_TESTS := tests/test_versions.py tests/test_variants.py tests/test_install.py tests/test_readme.py \
	tests/test_finetune.py::test_run_folder_contract tests/test_finetune.py::test_result_loads_with_timm_local_dir \
	tests/test_finetune.py::test_checkpoint_with_other_classes_gets_a_new_head tests/test_finetune.py::test_cli_faults_are_one_line \
	tests/test_evaluate.py tests/test_hub.py tests/test_received.py tests/test_data.py::test_saved_hf_dataset_with_a_corrupt_row \
	tests/test_agc_distributed.py::test_accelerate_accumulation_clips_once_on_the_accumulated_gradient \
	tests/test_agc_distributed.py::test_refuses_fsdp1_and_deepspeed tests/test_ecosystem.py::test_meta_device_and_dtype \
	tests/test_hfds.py tests/test_shards.py tests/test_sources.py
test-floors: $(FLOOR)/.installed
	$(FLOOR)/bin/python -m pytest -q $(FLOOR_TESTS)

$(FLOOR)/.installed: pyproject.toml constraints.txt constraints-floor.txt
	rm -rf $(FLOOR)
	$(PYTHON) -m venv $(FLOOR)
	$(FLOOR)/bin/pip install -q -c constraints-floor.txt torch torchvision
	$(FLOOR)/bin/pip install -q -c constraints-floor.txt -e '.[datasets,plots,wds]' pytest pyyaml scikit-learn
	touch $@

# On a GPU machine as it is: its own torch, timm and accelerate; no installs, no network. Its python: PYTHON=...
# when given, else .venv's when there is one, else python3; one line if that lacks a dependency or has one
# older than pyproject.toml's floors. One log (gpu_check.log). DEVICE=cpu runs the same on the CPU; QUICK=1 is
# the smallest form (CI).
DEVICE ?= cuda
CHECK_PYTHON = $(if $(filter command line environment,$(origin PYTHON)),$(PYTHON),$(if $(wildcard $(BIN)/python),$(BIN)/python,$(PYTHON)))
gpu-check:
	$(CHECK_PYTHON) benchmarks/gpu_check.py --device $(DEVICE) $(if $(QUICK),--quick) $(if $(LOG),--log $(LOG))

bench: $(STAMP)  ## writes BENCHMARKS.md (about 10 minutes on 2 cores)
	$(BIN)/python benchmarks/bench.py

# The paper's AGC batch-size ablation at toy scale (about 18 minutes on 2 cores): REPRODUCTION.md and
# reproduction/*.png. QUICK=1 runs a tiny grid into reproduce-quick/ (seconds; CI runs it in tests).
reproduce: $(STAMP)
	$(BIN)/python experiments/reproduce.py $(if $(QUICK),--quick)

cards: $(STAMP)
	$(BIN)/nfnet-zoo cards

clean:
	rm -rf $(VENV) $(HUB1) $(FLOOR) build src/*.egg-info
