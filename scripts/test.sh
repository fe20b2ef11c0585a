#!/usr/bin/env bash
# The whole test suite, as CI runs it: set-up, formatting, lints, then every test.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --all-features --locked -- -D warnings
cargo nextest run --workspace --locked --no-fail-fast
