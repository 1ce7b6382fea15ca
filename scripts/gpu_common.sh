# Sourced by scripts/gpu_*.sh with a run name: works from the repository root and puts the run's logs
# and JSON in $OUT/<name>/ (OUT: the device tool's folder, or ./gpu_out), packed on exit into one
# archive, $OUT/<name>.tgz, because a device call brings back at most 8 files.
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
RESULTS=${OUT:-$PWD/gpu_out}
OUT=$RESULTS/$1
mkdir -p "$OUT"
trap 'tar czf "$RESULTS/$(basename "$OUT").tgz" -C "$OUT" . && rm -rf "$OUT"' EXIT
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
