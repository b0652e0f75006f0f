# The two commands of the README: `make test` and `make book`. Both create the pinned environment first.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
export IPYTHONDIR := $(CURDIR)/book/ipython_profile

.PHONY: env test book bench clean-book help

help:
	@echo "make test   - create .venv (pinned torch==2.14.1/torchvision==0.29.1 first) and run pytest"
	@echo "make book   - same environment, then build the book into _build/html/index.html"
	@echo "make bench  - run the benchmarks (~12 min), write benchmarks/results.md and results.json"

# torch and torchvision first, as a pair; every later install is constrained to that pair and to the
# versions this project was tested with (requirements/constraints.txt).
$(STAMP): pyproject.toml requirements/constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(BIN)/python -m pip install --quiet -c requirements/constraints.txt -e ".[book]"
	$(BIN)/python -c "import torch, torchvision; assert torch.__version__.startswith('2.14.1'), torch.__version__"
	touch $(STAMP)

env: $(STAMP)

test: env
	$(BIN)/python -m pytest

# glibc returns freed blocks above its mmap threshold to the OS, so every large temporary of a forward pass
# page-faults again; raising the thresholds makes sampling ~20-35 % faster here (benchmarks/run_all.py uses
# the same settings). Numbers are unchanged: only the allocator's bookkeeping differs.
book: export MALLOC_MMAP_THRESHOLD_ := 268435456
book: export MALLOC_TRIM_THRESHOLD_ := 1073741824
book: env
	$(BIN)/jupyter-book build . -W -n --keep-going

bench: env
	$(BIN)/python benchmarks/run_all.py

clean-book:
	rm -rf _build
