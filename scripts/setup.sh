#!/usr/bin/env bash
# Installs what distill-serve needs beyond cargo: the ONNX Runtime shared library, taken out of
# the pinned PyPI `onnxruntime` wheel (the only prebuilt ORT this environment can download),
# checked against its sha256 and unpacked into the cache folder the binary looks in; and the
# OpenAI Python SDK the tests use as a client. Idempotent: a second run changes nothing.
set -euo pipefail

ORT_VERSION=1.32.0
WHEEL=onnxruntime-${ORT_VERSION}-cp311-cp311-manylinux_2_28_x86_64.whl
WHEEL_SHA256=5a34fc4dfeb5a7b4a74c95dcba1e773d722abda720b474edf1b0c419dc6d163d
CACHE=${XDG_CACHE_HOME:-$HOME/.cache}/distill-serve
DEST=$CACHE/onnxruntime-$ORT_VERSION
LIB=$DEST/libonnxruntime.so.$ORT_VERSION

# The official OpenAI Python SDK: the test suite talks to the server with it, as users do.
OPENAI_VERSION=3.57.0
if ! python3 -c "import openai, sys; sys.exit(openai.__version__ != '$OPENAI_VERSION')" 2>/dev/null; then
  echo "setup: installing openai==$OPENAI_VERSION (Python SDK) from PyPI"
  python3 -m pip install --quiet --disable-pip-version-check "openai==$OPENAI_VERSION"
fi

if [ -f "$LIB" ]; then
  echo "setup: ONNX Runtime $ORT_VERSION already at $LIB"
  exit 0
fi

mkdir -p "$CACHE/wheels" "$DEST"
if [ ! -f "$CACHE/wheels/$WHEEL" ]; then
  echo "setup: downloading $WHEEL from PyPI"
  python3 -m pip download --quiet --no-deps --only-binary=:all: \
    --platform manylinux_2_28_x86_64 --python-version 3.11 --implementation cp --abi cp311 \
    "onnxruntime==$ORT_VERSION" -d "$CACHE/wheels"
fi
echo "$WHEEL_SHA256  $CACHE/wheels/$WHEEL" | sha256sum --check --quiet - || {
  echo "setup: sha256 mismatch for $WHEEL; refusing to use it" >&2
  rm -f "$CACHE/wheels/$WHEEL"
  exit 1
}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
python3 - "$CACHE/wheels/$WHEEL" "$tmp" <<'PY'
import sys, zipfile
wheel, out = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(wheel) as z:
    names = [n for n in z.namelist() if n.startswith("onnxruntime/capi/libonnxruntime.so")]
    if not names:
        sys.exit("setup: no libonnxruntime.so in the wheel")
    for n in names:
        z.extract(n, out)
PY
mv "$tmp/onnxruntime/capi/libonnxruntime.so.$ORT_VERSION" "$LIB"
echo "setup: ONNX Runtime $ORT_VERSION installed at $LIB"
