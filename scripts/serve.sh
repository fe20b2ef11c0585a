#!/usr/bin/env bash
# Builds, sets up and starts the server on the embedded default student (models/default, an
# ICD-10-CM coding student that models/recipe-icd10cm.sh distilled), with
# the ICD-10-CM 2026 release setup.sh installs loaded as terminology `icd10cm`: HTTP on
# 127.0.0.1:8080, gRPC on 127.0.0.1:8081. Extra arguments go to `distill-serve serve`
# (e.g. --http-addr 0.0.0.0:8080 --admin-token secret).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cargo build --release --locked
bin=target/release/distill-serve
icd=${XDG_CACHE_HOME:-$HOME/.cache}/distill-serve/icd10cm-2026/icd10cm_tabular_2026.xml
exec "$bin" serve --model-repository models --terminology "icd10cm=icd10cm-xml:$icd" "$@"
