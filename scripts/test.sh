#!/usr/bin/env bash
# Set up (.venv with the dev tools), lint (ruff, configured in pyproject.toml), then run the whole CPU
# test suite. GPU tests skip without CUDA.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --dev
.venv/bin/ruff check .
exec .venv/bin/python -m pytest -q "$@"
