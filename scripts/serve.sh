#!/usr/bin/env bash
# Builds, sets up and starts the server on the embedded default student (models/default), with
# the ICD-10-CM 2026 release setup.sh installs loaded as terminology `icd10cm`: HTTP on
# 127.0.0.1:8080, gRPC on 127.0.0.1:8081. Extra arguments go to `distill-serve serve`
# (e.g. --http-addr 0.0.0.0:8080 --admin-token secret).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cargo build --release --locked
bin=target/release/distill-serve
if [ ! -f models/default/1/model.onnx ]; then
  # Until the trained demo student exists: a tiny random-weight student, made here. Its
  # checkpoint stays beside the ONNX files, where refresh jobs fine-tune it.
  checkpoint=models/default/1/checkpoint
  "$bin" tiny --family qwen2 --seed 0 --out "$checkpoint"
  "$bin" export --checkpoint "$checkpoint" --out models/default/1 --int8 >/dev/null
  echo "serve: made models/default/1 (a tiny random-weight INT8 student)"
fi
icd=${XDG_CACHE_HOME:-$HOME/.cache}/distill-serve/icd10cm-2026/icd10cm_tabular_2026.xml
exec "$bin" serve --model-repository models --terminology "icd10cm=icd10cm-xml:$icd" "$@"
