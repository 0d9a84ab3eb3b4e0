#!/usr/bin/env bash
# Real-size alignment steps through diffalign.train on one GPU (random-weight SDXL UNet, SD3.5-M and
# FLUX.1-dev denoisers built from their hub configs; bf16): Diffusion-DPO with LoRA and full
# fine-tuning, SDPA vs xformers, gradient checkpointing on/off, live vs precomputed reference, and one
# Flow-GRPO step on SD3.5-M. Prints a table of pairs/s, peak memory and MFU per mode
# (benchmarks/perf/gpu_check.py says how each is measured).
#
#   bash benchmarks/perf/gpu_check.sh --fetch-wheels      # here, with network: wheels into .whl/
#   bash benchmarks/perf/gpu_check.sh                     # there: <= 10 minutes on one H200, install included
#   MODES=flux-lora,sd35m-grpo bash benchmarks/perf/gpu_check.sh    # a rerun of some modes
#   MODES=sdxl-lora,sdxl-lora-zero2,sdxl-lora-zero3 bash benchmarks/perf/gpu_check.sh  # DeepSpeed
#       ZeRO-2/3 through accelerate launch (opt-in, not in the default set; ~4 minutes with the install)
#   MODES=flux-lora bash benchmarks/perf/gpu_check.sh --final-checkpoint  # also write and time the
#       final checkpoint + export (off by default: a full FLUX.1-dev one is ~100 GB, the disk 64 GB)
#   (python -m diffalign.benchmarks.perf.gpu_check --list names them all)
#
# The GPU machine has no network: diffusers, xformers and deepspeed (with the pure-Python packages it
# needs that the machine's image lacks) travel as wheels in .whl/ (the device tool's carry: [".whl"];
# ~15 MB) and diffalign is installed from this checkout (editable, no dependencies). The
# whole call keeps inside TOTAL_S (default 570 s; the device tool allows 600): the benchmark gets
# what the install leaves and stops starting modes that would overrun it, so the table is printed even
# when a mode fails (one-line reason) or is skipped; rerun those with MODES=... Everything that comes
# back lands in OUT: gpu_check.md (the table), gpu_check.json, gpu_check.log and the workers' log tails.
set -uo pipefail
SECONDS=0
cd "$(dirname "$0")/../.."

if [ "${1:-}" = "--fetch-wheels" ]; then
    exclude=$(git rev-parse --git-path info/exclude)
    mkdir -p "$(dirname "$exclude")"
    grep -qx '/.whl/' "$exclude" 2>/dev/null || echo '/.whl/' >>"$exclude"
    # xformers 0.0.35 is built against torch's stable ABI (torch >= 2.10; the H200 image has 2.11).
    # deepspeed needs hjson and pydantic (+ pydantic-core, annotated-types, typing-inspection and a
    # typing-extensions >= 4.14.1), which that image lacks; the rest it needs is there (ninja,
    # py-cpuinfo, msgpack, einops, psutil, numpy, packaging, tqdm, nvidia-ml-py)
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .whl diffusers==0.42.1 xformers==0.0.35 hjson==3.1.0 pydantic==2.14.4 pydantic-core==2.50.2 \
        annotated-types==0.8.0 typing-inspection==0.4.5 typing-extensions==4.16.0 || exit
    # deepspeed is published as an sdist only: a pure-Python wheel built here with no ops compiled
    # (DS_BUILD_OPS=0; it would JIT-build an op where one is used, but ZeRO-2/3 with a torch
    # optimizer and no offload, what gpu_check runs, uses none)
    DS_BUILD_OPS=0 exec python3 -m pip wheel --no-deps -w .whl deepspeed==0.19.8
fi

TOTAL=${TOTAL_S:-570}
OUT=${OUT:-runs/gpu_check}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
WORK=${WORK:-/tmp/gpu_check} # models (FLUX: 24 GB) stay out of OUT, whose files travel back
mkdir -p "$WORK"
WORK=$(cd "$WORK" && pwd)
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true

if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
if ! python3 -c "import diffalign.benchmarks.perf.gpu_check" 2>/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . >/dev/null 2>&1 || true
fi
if ! python3 -c "import diffalign.benchmarks.perf.gpu_check" 2>/dev/null; then
    # no editable install: the installed layout (objectives/, rewards/ ... inside diffalign) as links,
    # run from outside the checkout so its own diffalign/ does not shadow them
    pkg=/tmp/diffalign-pkg/diffalign
    mkdir -p "$pkg"
    for f in "$PWD"/diffalign/*; do ln -sfn "$f" "$pkg/"; done
    for d in objectives samplers rewards benchmarks; do ln -sfn "$PWD/$d" "$pkg/$d"; done
    export PYTHONPATH=/tmp/diffalign-pkg${PYTHONPATH:+:$PYTHONPATH}
    cd /tmp
fi
python3 -c "import diffusers" 2>/dev/null ||
    echo "diffusers is missing: every mode will fail (run --fetch-wheels with network, carry .whl)"
python3 -c "import importlib.util as u, sys; sys.exit(u.find_spec('deepspeed') is None)" ||
    echo "deepspeed is missing: the DeepSpeed modes (sdxl-lora-zero2/3) will be skipped"
echo "installed in ${SECONDS} s"

budget=$((TOTAL - SECONDS - 30)) # 30: the benchmark's grace after its budget (20 s) + the table
timeout -k 5 $((budget + 25)) python3 -u -m diffalign.benchmarks.perf.gpu_check --budget-s "$budget" \
    --out "$OUT" --work "$WORK" ${MODES:+--modes "$MODES"} "$@" 2>&1 | tee "$OUT/gpu_check.log"
