#!/usr/bin/env bash
# The whole test suite, as CI runs it: set-up, formatting, lints, every test, then a short run of
# every fuzz target.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --all-features --locked -- -D warnings
cargo nextest run --workspace --locked --no-fail-fast
# Each cargo-fuzz target for a bounded time (nightly; the build takes about 4 minutes).
bash scripts/fuzz.sh "${FUZZ_SECONDS:-15}"
