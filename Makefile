# Two commands for a newcomer: `make demo` (set up, then fine-tune on the embedded dataset)
# and `make test` (set up, then run the tests). Everything lives in .venv.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test bench cards clean

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

bench: $(STAMP)  ## writes BENCHMARKS.md (about 10 minutes on 2 cores)
	$(BIN)/python benchmarks/bench.py

cards: $(STAMP)
	$(BIN)/nfnet-zoo cards

clean:
	rm -rf $(VENV) build src/*.egg-info
