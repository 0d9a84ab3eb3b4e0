#!/usr/bin/env bash
# The toy-video base on one GPU, then the video alignment benchmark on it, in one go (issue #8).
#
#   OUT=/path/to/out VIDEO_MINUTES=7 bash benchmarks/toyworlds/device_video.sh
#
# A 2-core CPU trains the video model at ~5-9 clips/s and got no further than ghost copies of the
# mover after 26k clips (benchmarks/RESULTS.md); a GPU is data-bound at ~170 rendered clips/s,
# i.e. ~70k clips in 7 minutes. Sized for ~12 minutes on one H200 (a device session has 15 in
# all): pretraining VIDEO_MINUTES, then Syn-Pic + DPO + RankDPO + judged evaluation (seed 0).
# Smoke test on a CPU: DEVICE=cpu VIDEO_MINUTES=0.1 EVAL_PROMPTS=2 BENCH_ARGS="--n-train 2 --k 2 --steps 2
# --n-eval 2 --per-prompt 1 --sample-steps 2" bash benchmarks/toyworlds/device_video.sh
# Needs the [test] dependencies (install the wheels first when the machine has no network).
# Everything lands under OUT: the exported pipeline (copy it to diffalign/assets/toy-video to
# ship it), the training log and the benchmark's report and results.json.
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-runs/device-video}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
python -m diffalign.cli toy pretrain --stages video --video-freeze-spatial --device "${DEVICE:-cuda}" \
    --av-minutes "${VIDEO_MINUTES:-7}" 0 0 0 --work "$OUT/work" --out "$OUT/models" 2>&1 | tail -n 5
cp "$OUT/work/video.log" "$OUT/video-training.jsonl"
python -m diffalign.cli eval --model "$OUT/models/toy-video" --toy-video train --n-prompts "${EVAL_PROMPTS:-40}" --per-prompt 2 \
    --out "$OUT/train-split" 2>&1 | tail -n 8
python -m diffalign.benchmarks.toyworlds.av_bench video --base "$OUT/models/toy-video" --out "$OUT/bench" \
    --objectives diffusion_dpo rankdpo --seed "${SEED:-0}" ${BENCH_ARGS:-} 2>&1 | tail -n 12
