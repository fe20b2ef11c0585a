#!/usr/bin/env bash
# The GPU figures of the README, on this machine's GPU (a T4, or any CUDA 13 driver): the
# student with DeepSeek-R1-Distill-Qwen-1.5B's dimensions (random weights) in the GPU form,
# through ONNX Runtime's CUDA provider (FP16 weights, and INT8 weights with FP16 activations),
# then through TensorRT (FP16) where TensorRT 10 is installed. Prints, per batch size 1..64,
# prefill time, decode tokens/s and requests/s, and the time to open each session (TensorRT
# builds its engine then, and again for each new shape on its first run).
#
#   scripts/gpu-bench.sh                       # all of it
#   scripts/gpu-bench.sh --batch 1,8 --decode-steps 32
#
# Extra arguments go to every run. The first run exports the student (about 6 GB of
# checkpoint and 3 GB per form under target/bench-models). TensorRT INT8 is not measured: its
# ONNX parser takes neither MatMulInteger nor MatMulNBits, and this exporter writes no QDQ form.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/setup.sh --gpu
if ! command -v nvidia-smi >/dev/null || ! nvidia-smi -L >/dev/null 2>&1; then
  echo "gpu-bench: no NVIDIA GPU here (nvidia-smi lists none); nothing to measure" >&2
  exit 1
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader

cargo bench --features cuda,tensorrt --bench gpu -- --provider cuda "$@"
if ldconfig -p | grep -q 'libnvinfer\.so\.10'; then
  cargo bench --features cuda,tensorrt --bench gpu -- --provider tensorrt --forms fp16 "$@"
else
  echo "gpu-bench: TensorRT 10 (libnvinfer.so.10) is not installed: TensorRT not measured (README: GPU)"
fi
