#!/usr/bin/env bash
# Issue 22's GPU timings, as ONE command for a short lease on a GPU machine (~5 minutes): the DINOv3.txt ViT-L/16
# and SigLIP2 NaFlex B/16 rows of bench.py and reproduce.py --timing at 1024x2048 (Cityscapes) and 672x896 (VOC,
# Context), random weights (speed does not depend on them).
#
# Here (a machine with this repo's venv), once:  bash scripts/bench_gpu.sh --prepare     (copies open_clip/timm/...
#   into .gpu_site/, which the device image lacks), then on the GPU machine:  bash scripts/gpu_backbones.sh
# (the device tool: run(command="bash scripts/gpu_backbones.sh", carry=[".gpu_site"], timeout_s=420)).
#  1. reproduce.py --timing for dinov3-l16 and siglip2-naflex-b16, fp32 (the authors') -> timing.log, timing/timing.json
#  2. bench.py, dinov3-l16: single pass and stride-24 teacher, both sizes            -> bench_dinov3.md / .log
#  3. bench.py, siglip2-naflex-b16: single pass at the 256 budget and at 'all'        -> bench_naflex_*.md / .log
# Every step has its own timeout so that the outputs always come back. Writes to $OUT (default runs/gpu_backbones).
# SMOKE=1 runs the same steps on the CPU at toy sizes (a check of this script, not a measurement).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-runs/gpu_backbones}"
. scripts/gpu_common.sh  # env.txt and `step`
DEV=cuda SIZES=1024x2048,672x896 QUICK=() REPS=(--warmup 2 --reps 5)
if [ "${SMOKE:-0}" = 1 ]; then DEV=cpu SIZES=64x128 QUICK=(--quick) REPS=(--warmup 0 --reps 1); fi

step timing 150 $PY reproduce.py --timing --device "$DEV" --precision fp32 --backbones dinov3-l16,siglip2-naflex-b16 \
  "${QUICK[@]}" --out "$OUT/timing"
step bench_dinov3 120 $PY bench.py --device "$DEV" --backbone dinov3-l16 --sizes "$SIZES" --strides 24 --no-train \
  "${REPS[@]}" --max-call 30 --markdown "$OUT/bench_dinov3.md"
for budget in 256 all; do
  step "bench_naflex_$budget" 60 $PY bench.py --device "$DEV" --backbone siglip2-naflex-b16 --sizes "$SIZES" \
    --naflex-patches "$budget" --no-train "${REPS[@]}" --markdown "$OUT/bench_naflex_$budget.md"
done
exit 0
