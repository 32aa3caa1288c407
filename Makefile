# The two commands of the README: `make demo` and `make test` (ruff, the docs build, pytest). Both create .venv
# when missing. `make docs` builds the documentation site into site/ with warnings as errors (mkdocs --strict).
PYTHON ?= python3
TORCH_SPEC ?= torch==2.13.0
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# pytest-xdist processes for `make test` (one per core of the 2-core CI machine; tests of one module share a process)
TEST_WORKERS ?= 2

.PHONY: demo test lint docs bench clean

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

docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir site

test: lint docs
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadscope

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_fit.py

clean:
	rm -rf $(VENV) build site *.egg-info .pytest_cache .ruff_cache

# The long fuzz run of tests/test_fuzz.py (make test runs a short one): run sets, import tables, the CLI, install_run
# and the model files of every method; FUZZ_EXAMPLES inputs per test (per method for model files), random (not
# derandomized) draws; the counts of inputs tried and of each outcome go to FUZZ_REPORT.
FUZZ_EXAMPLES ?= 1500
FUZZ_REPORT ?= benchmarks/fuzz.json
.PHONY: fuzz
fuzz: $(STAMP)
	SIMFLUENCE_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) SIMFLUENCE_FUZZ_REPORT=$(FUZZ_REPORT) \
		$(BIN)/python -m pytest -q tests/test_fuzz.py -p no:cacheprovider
	cat $(FUZZ_REPORT)
