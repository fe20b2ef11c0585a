#!/usr/bin/env bash
# Builds the cargo-fuzz targets in fuzz/ (nightly, AddressSanitizer) and runs each for SECONDS
# (default 30) from its committed seeds; any crash, leak or timeout fails the run and leaves
# its input in fuzz/artifacts/<target>/. The test suite runs it briefly; longer runs are
# recorded in the README.
#   bash scripts/fuzz.sh [SECONDS] [TARGET...]
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
seconds=${1:-30}
shift || true

if ! cargo +nightly --version >/dev/null 2>&1; then
  echo "fuzz: installing the nightly toolchain (cargo fuzz needs it)"
  rustup toolchain install nightly --profile minimal
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "fuzz: installing cargo-fuzz"
  cargo install cargo-fuzz --version 0.13.2 --locked
fi

targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
  mapfile -t targets < <(cargo +nightly fuzz list)
fi
# Dev profile: a fraction of the build time of an optimised one, for short runs.
cargo +nightly fuzz build --dev
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
for target in "${targets[@]}"; do
  mkdir -p "$work/$target" "seeds/$target"
  # New inputs go to the scratch corpus (first folder); the committed seeds are read only.
  log="$work/$target.log"
  if ! cargo +nightly fuzz run --dev "$target" "$work/$target" "seeds/$target" -- \
      -max_total_time="$seconds" -timeout=10 -rss_limit_mb=4096 -print_final_stats=1 >"$log" 2>&1; then
    tail -n 40 "$log"
    echo "fuzz: $target FAILED (input in fuzz/artifacts/$target/)"
    exit 1
  fi
  runs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' || echo "?")
  echo "fuzz: $target: $runs executions in ${seconds}s, no crash"
done
