# The two commands of the README: `make demo` and `make test`. Both create .venv when missing.
PYTHON ?= python3
TORCH_SPEC ?= torch==2.13.0
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e ".[dev]" "$(TORCH_SPEC)"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/simfluence demo

lint: $(STAMP)
	$(BIN)/ruff check .

test: lint
	$(BIN)/python -m pytest

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_fit.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache

# The long fuzz run of tests/test_fuzz.py (make test runs a short one): FUZZ_EXAMPLES inputs per test, random
# (not derandomized) draws; the counts of inputs tried and of each outcome go to FUZZ_REPORT.
FUZZ_EXAMPLES ?= 1500
FUZZ_REPORT ?= benchmarks/fuzz.json
.PHONY: fuzz
fuzz: $(STAMP)
	SIMFLUENCE_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) SIMFLUENCE_FUZZ_REPORT=$(FUZZ_REPORT) \
		$(BIN)/python -m pytest -q tests/test_fuzz.py -p no:cacheprovider
	cat $(FUZZ_REPORT)
