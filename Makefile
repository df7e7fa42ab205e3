# Two commands for a fresh machine: `make demo` and `make test`. Both create .venv first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
FASHION_MNIST ?= /usr/share/datasets/fashion-mnist

.PHONY: install demo test lint clean bench bench-quick bench-report soak nnc-venv

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -c constraints.txt -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/compresspipe run pipelines/quickstart.yaml

test: $(STAMP)
	$(BIN)/ruff check compresspipe tests benchmarks
	$(BIN)/lint-imports --no-cache --no-logo
	$(BIN)/python -m pytest -q

# every benchmarks/*.py in full (long), then benchmarks/REPORT.md from benchmarks/results/
bench: $(STAMP)
	@test -d $(FASHION_MNIST) || { echo "make bench needs Fashion-MNIST in $(FASHION_MNIST): apt-get install dataset-fashion-mnist"; exit 2; }
	$(BIN)/python benchmarks/report.py --run

# the same with --quick where a benchmark has it
bench-quick: $(STAMP)
	$(BIN)/python benchmarks/report.py --run --quick

# only REPORT.md, from the results already saved
bench-report: $(STAMP)
	$(BIN)/python benchmarks/report.py

# not CI: 4 pipelines at once on one mlflow server, 10 SIGKILL + --resume rounds, 5000 fuzz
# cases per reader -> benchmarks/results/soak.{json,md}
soak: $(STAMP)
	$(BIN)/python benchmarks/soak.py

# benchmark-only baseline venv for benchmarks/coding_vs_nnc.py: nncodec needs numpy<2, our venv pins
# numpy 2, so NNCodec lives in its own venv (same torch release) and talks to us through files only
NNC_VENV := .venv-nnc
$(NNC_VENV)/.installed:
	$(PYTHON) -m venv $(NNC_VENV)
	$(NNC_VENV)/bin/pip install --quiet --disable-pip-version-check "numpy<2" pybind11 setuptools wheel
	$(NNC_VENV)/bin/pip install --quiet --disable-pip-version-check --no-build-isolation \
		"nncodec==2.1.3" "numpy<2" "torch==2.14.1" "torchvision==0.29.1" "safetensors==0.8.0"
	$(NNC_VENV)/bin/pip freeze > $(NNC_VENV)/freeze.txt
	touch $@

nnc-venv: $(NNC_VENV)/.installed

lint: $(STAMP)
	$(BIN)/ruff check compresspipe tests benchmarks
	$(BIN)/lint-imports --no-cache --no-logo

clean:
	rm -rf runs .pytest_cache .ruff_cache
