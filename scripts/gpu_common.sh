# Sourced by scripts/gpu_*.sh with a run name: works from the repository root and writes the run's logs
# and JSON to a folder outside $OUT, packed into one archive, $OUT/<name>.tgz (OUT: the device tool's
# folder, or ./gpu_out), after each step (`pack`) and on exit: a device call brings back at most 8
# files, and a call stopped at its time limit kills the script before any exit trap runs.
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
RESULTS=${OUT:-$PWD/gpu_out}
RUN_NAME=$1
OUT=$(mktemp -d "/tmp/$RUN_NAME.XXXX")
mkdir -p "$RESULTS"
pack() { tar czf "$RESULTS/$RUN_NAME.tgz" -C "$OUT" .; }
trap pack EXIT
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
