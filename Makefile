# spot-supervisor: `make demo` installs and runs the demo; `make test` runs the tests.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# s3rver, the S3-compatible server the tests commit to besides moto (tests/s3rver.py),
# and Azurite, Azure Blob Storage's emulator (daemon/standins/azurite.py), pinned with
# their dependencies in tests/npm/package-lock.json. Needs node and npm.
S3RVER := tests/npm/node_modules/s3rver/package.json

.PHONY: install demo test lint bench chaos clean browser skypilot-check

install: $(VENV)/.installed $(S3RVER)

# Reinstall when the dependencies change. torch is pinned in pyproject.toml: the
# CPU wheel for development and CI (an unpinned torch pulls a CUDA build of several GB).
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -c 'import sys; sys.exit("spot-supervisor needs Python >= 3.10") if sys.version_info < (3, 10) else None'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[trainer,demo,dev,integrations,gcp,azure]'
	touch $@

$(S3RVER): tests/npm/package.json tests/npm/package-lock.json
	@command -v npm >/dev/null || { echo "npm (Node.js) is needed to install s3rver for the tests" >&2; exit 1; }
	npm ci --prefix tests/npm --no-audit --no-fund --loglevel=error
	touch $@

# The demo runs on moto alone: no Node.js needed.
demo: $(VENV)/.installed
	$(BIN)/spot-supervisor demo

# Debian's Chromium: tests/test_report.py opens report.html in a real browser. Installed
# here (as root, as on CI) when missing; otherwise the message says how.
browser:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium; } || { echo "tests/test_report.py needs Debian's chromium: apt-get install chromium" >&2; exit 1; }

test: install browser
	$(BIN)/python -m pytest -q --durations=25

lint: install
	$(BIN)/ruff check daemon trainer tests bench
	$(BIN)/mypy
	$(BIN)/cfn-lint --regions us-east-1 us-west-2 -- deploy/aws/spot-training.yaml

# SkyPilot's own parser on deploy/skypilot/train.yaml. SkyPilot pins packages of its own,
# so it lives in a venv of its own; the schema check in `make test` runs without it.
SKY := .venv-skypilot
$(SKY)/.installed:
	$(PYTHON) -m venv $(SKY)
	$(SKY)/bin/pip install --quiet "skypilot==0.14.1"
	touch $@

skypilot-check: install $(SKY)/.installed
	SKYPILOT_PYTHON=$(SKY)/bin/python $(BIN)/python -m pytest -q tests/test_skypilot_recipe.py

bench: install
	$(BIN)/python -m bench

# One training run under 60 seeded faults (kills, notices, S3 faults); docs/reliability.md.
chaos: install
	$(BIN)/python tests/chaos_run.py

clean:
	rm -rf $(VENV) $(SKY) .mypy_cache .ruff_cache .pytest_cache tests/npm/node_modules
