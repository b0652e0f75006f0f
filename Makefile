# The two commands of the README: `make test` and `make book`. Both create the pinned environment first.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
export IPYTHONDIR := $(CURDIR)/book/ipython_profile

.PHONY: env browser test book book-student chapter-times book-results bench golden check-golden check-store clean-book help

help:
	@echo "make test   - create .venv (pinned torch==2.14.1/torchvision==0.29.1 first) and run pytest"
	@echo "make book   - same environment, then build the book into _build/html/index.html"
	@echo "make book-student - the same book without the exercises' solutions, into _build/student/_build/html"
	@echo "make bench  - run the benchmarks (~12 min), write benchmarks/results-KIND.md and .json (KIND: AMX, VNNI or AVX2)"
	@echo "make chapter-times - after a cold make book: write book/chapter_times.json (each chapter's run time)"
	@echo "make book-results  - after a cold make book: ship its finished runs in data/book-runs/"
	@echo "make golden        - after bumping NUMERICS_VERSION: rewrite data/golden/ (shortened runs of every recipe)"
	@echo "make check-golden  - recompute every recipe's golden run and compare with data/golden/ (~5 min)"
	@echo "make check-store   - recompute three shipped runs (FP32, HQ-DiT W4A4 and W4A3, seed 0) from scratch and compare (~4 min)"

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

# Headless Chromium (Debian package) for tests/test_book_offline.py, which opens a built page with the network
# off and checks that its formulas render. Installed when missing if we are root (as in CI, ~20 s); otherwise
# that one test is skipped with a message (.ci/run sets HQDIT_REQUIRE_CHROMIUM=1 so that it fails instead).
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing chromium (Debian package) for the offline-math test"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null; \
	  else echo "chromium is not installed (apt-get install chromium): the offline-math browser test will be skipped"; fi; }

test: env browser
	$(BIN)/python -m pytest

# glibc returns freed blocks above its mmap threshold to the OS, so every large temporary of a forward pass
# page-faults again; raising the thresholds makes sampling ~20-35 % faster here (benchmarks/run_all.py uses
# the same settings). Numbers are unchanged: only the allocator's bookkeeping differs.
book: export MALLOC_MMAP_THRESHOLD_ := 268435456
book: export MALLOC_TRIM_THRESHOLD_ := 1073741824
# Chapter 7's full design: every row of its comparison at 5 paired seeds (the `book` profile alone, as a notebook
# opened in Jupyter sees it, runs 2). Set HQDIT_TABLE_SEEDS=2 make book for the cheapest build; chapter-times
# records the same count as the build it reads.
book chapter-times: export HQDIT_TABLE_SEEDS ?= 5
book: env
	$(BIN)/jupyter-book build . -W -n --keep-going

# The student edition: every exercise's solution removed from the pages and their .md/.ipynb downloads, the check
# cells kept (book/_ext/notebook_downloads.py). It reuses make book's notebook cache: run after make book.
book-student: export HQDIT_TABLE_SEEDS ?= 5
book-student: env
	HQDIT_STUDENT=1 $(BIN)/jupyter-book build . --path-output _build/student -W -n --keep-going

# Each chapter's "run time" line reads book/chapter_times.json; this writes it from the execution records of the
# last build. Meaningful after a cold build only (fresh clone, no .hqdit_cache/): bash .ci/run, then this.
chapter-times: env
	$(BIN)/python book/_ext/chapter_times.py

# The finished runs of the last build, shipped so that a fresh clone of unchanged code reads them instead of
# recomputing (experiments.run adopts an entry only when its key material matches exactly; see the book's
# "How this book is built" page). Run after a cold build: HQDIT_SHIPPED_RUNS=none make book, then this.
# SHIP=--add keeps the store's runs and adds the ones it lacks (new rows made on this machine).
book-results: env
	$(BIN)/python -m hqdit_utils.runs.run_store $(SHIP) .hqdit_cache/runs data/book-runs
	@echo "data/book-runs: $$(du -sh data/book-runs | cut -f1)"

# The results store's rule (hqdit_utils/numerics.py): run keys hold a declared numerics version, not the code's text;
# these targets regenerate and check the golden outputs that catch an undeclared behaviour change.
golden: env
	$(BIN)/python -m hqdit_utils.runs.golden write

check-golden: env
	$(BIN)/python -m hqdit_utils.runs.golden check

check-store: env
	$(BIN)/python -m hqdit_utils.runs.golden store

bench: env
	$(BIN)/python -m benchmarks.run_all

clean-book:
	rm -rf _build
