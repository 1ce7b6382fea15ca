#!/usr/bin/env bash
# Set up (.venv with the dev tools), lint (ruff, configured in pyproject.toml), then run the whole CPU
# test suite. GPU tests skip without CUDA.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --dev
.venv/bin/ruff check .
# Two test processes (pytest-xdist; PYTEST_WORKERS for another count, 0 for one process), each test file whole
# in one of them (its module fixtures, a local Ray session, are built once): 18 minutes instead of 30 on two cores,
# where much of an end-to-end test's time is a subprocess starting or a single-threaded step.
exec .venv/bin/python -m pytest -q -n "${PYTEST_WORKERS:-2}" --dist loadfile "$@"
