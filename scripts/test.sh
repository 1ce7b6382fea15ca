#!/usr/bin/env bash
# Set up (.venv with the dev tools) and run the whole CPU test suite. GPU tests skip without CUDA.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --dev
exec .venv/bin/python -m pytest -q "$@"
