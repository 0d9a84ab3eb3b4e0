#!/usr/bin/env bash
# Real-size SDXL / SD3-medium DPO step on one GPU (random weights, bf16), baseline vs diffalign,
# SDPA vs xformers when installed. Sized for ~10 minutes on one H200. Needs torch with CUDA,
# diffusers, transformers, peft (install the wheels first when the machine has no network).
set -euo pipefail
cd "$(dirname "$0")/../.."
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
timeout 540 python -m diffalign.benchmarks.perf.gpu_check --steps "${STEPS:-5}" --pairs "${PAIRS:-4}" | tee "${OUT:-gpu_check.log}"
