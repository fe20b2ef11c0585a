#!/usr/bin/env bash
# The GPU checks of our own CUDA kernels (kernels/, issue 15), in two halves:
#   scripts/gpu-check.sh --build   here (cargo): release builds of the kernel tests (with the
#                                  GPU checks of tests/gpu_checks/) and of the device-sampling
#                                  and native engine benches, stripped, and the ONNX Runtime CPU
#                                  library, gzipped, into target/gpu-check/ (about 30 MB: small
#                                  enough to carry to a GPU machine);
#   scripts/gpu-check.sh           on the GPU machine (no cargo needed): runs them, NVRTC and
#                                  the driver taken from the system's CUDA, and writes the log to
#                                  $OUT (or target/gpu-check/) with the GPU's name and the date.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=target/gpu-check

if [ "${1:-}" = --build ]; then
  mkdir -p "$BIN"
  executable() {  # the executable cargo built for `$@` (JSON messages on stdin)
    python3 -c 'import json,sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == sys.argv[1]:
        print(m["executable"])' "$1" | tail -1
  }
  built=$(cargo test --release --locked --no-run --test kernels --message-format=json 2>/dev/null | executable kernels)
  cp "$built" "$BIN/kernels-tests"
  built=$(cargo bench --locked --no-run --bench native_engine --message-format=json 2>/dev/null | executable native_engine)
  cp "$built" "$BIN/native_engine-bench"
  built=$(cargo bench --locked --no-run --bench device_sampling --message-format=json 2>/dev/null | executable device_sampling)
  cp "$built" "$BIN/device-sampling"
  strip "$BIN"/kernels-tests "$BIN"/native_engine-bench "$BIN"/device-sampling
  # The ONNX Runtime CPU library (the engine check against it), compressed to fit the carry.
  ort=$(ls "${XDG_CACHE_HOME:-$HOME/.cache}"/distill-serve/onnxruntime-[0-9]*/libonnxruntime.so.* | head -1)
  mkdir -p "$BIN/$(basename "$(dirname "$ort")")"
  gzip -c "$ort" > "$BIN/$(basename "$(dirname "$ort")")/$(basename "$ort").gz"
  ls -laR "$BIN"
  exit 0
fi

LOG=${OUT:-$BIN}/gpu-check.log
mkdir -p "$(dirname "$LOG")"
# The carried ONNX Runtime library where the tests look for what setup installs (a cache of our
# own, keeping any NVRTC setup put in the usual one).
setup_cache=${XDG_CACHE_HOME:-$HOME/.cache}/distill-serve
export XDG_CACHE_HOME=${TMPDIR:-/tmp}/distill-serve-gpu-check
mkdir -p "$XDG_CACHE_HOME/distill-serve"
for dir in "$setup_cache"/cuda-*; do
  [ -d "$dir" ] && ln -sfn "$dir" "$XDG_CACHE_HOME/distill-serve/"
done
for packed in "$BIN"/onnxruntime-*/*.gz; do
  [ -f "$packed" ] || continue
  dest="$XDG_CACHE_HOME/distill-serve/$(basename "$(dirname "$packed")")"
  mkdir -p "$dest"
  gunzip -c "$packed" > "$dest/$(basename "$packed" .gz)"
done
# The system's CUDA libraries (NVRTC): wherever the toolkit put them.
for dir in /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib /usr/local/cuda-13*/lib64; do
  [ -d "$dir" ] && export LD_LIBRARY_PATH="$dir${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
done
# Every step runs (the machine is lent for minutes); failures are counted and logged.
failures=0
step() {
  "$@" || { echo "gpu-check: FAILED (exit $?): $*"; failures=$((failures + 1)); }
}
{
  echo "# gpu-check $(date -u +%Y-%m-%dT%H:%MZ)"
  nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv || true
  step "$BIN/kernels-tests" --test-threads 1 --nocapture
  step "$BIN/device-sampling" --rows 32 --steps 50
  step "$BIN/device-sampling" --rows 32 --steps 50 --top-n 5
  step "$BIN/device-sampling" --rows 64 --steps 50
  step "$BIN/native_engine-bench" --work-dir "${TMPDIR:-/tmp}/distill-serve-bench"
  echo "# gpu-check: $failures failed step(s)"
  [ "$failures" = 0 ]
} 2>&1 | tee "$LOG"
