#!/usr/bin/env bash
# The GPU-only paths and the GPU timings, as ONE command for a short lease on a GPU machine (~4 minutes).
#
# Here (a machine with this repo's venv), once:  bash scripts/bench_gpu.sh --prepare     (copies open_clip/timm/...
#   into .gpu_site/, which the device image lacks), then on the GPU machine:  bash scripts/gpu_checks.sh
# (the device tool: run(command="bash scripts/gpu_checks.sh", carry=[".gpu_site"], timeout_s=330)).
#  1. reproduce.py --timing: s/image and minutes per benchmark split, SigLIP2 and OpenCLIP, fp32 (the authors')
#     and bf16 autocast;                                                              -> timing_fp32.log, timing_bf16.log
#  2. distill.py on `tiny` with the paper's GPU defaults (fp16 autocast + GradScaler, fp16 teacher targets,
#     global batch 2 by accumulation);                                                -> distill.log
#  3. evaluate.py on a synthetic VOC21 set, fp32 (default) vs --amp;                   -> evaluate.log
#  4. bench.py, reduced grid (1024x2048 and 4096^2, stride 24).                         -> bench_gpu.md, bench_gpu.log
# Every step has its own timeout so that the outputs always come back. Writes to $OUT (default runs/gpu_checks).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-runs/gpu_checks}"
. scripts/gpu_common.sh  # env.txt and `step`
TMP=$(mktemp -d)

step timing_fp32 100 $PY reproduce.py --timing --device cuda --precision fp32 --out "$TMP/t32"
step timing_bf16 60 $PY reproduce.py --timing --device cuda --precision bf16 --out "$TMP/t16"
step distill 60 $PY distill.py --backbone tiny --out "$TMP/distill"
$PY -c "import json; r = json.load(open('$TMP/distill/settings.json')); print('settings:', {k: r.get(k) for k in
('precision', 'target_dtype', 'batch_size', 'train', 'keep', 'shuffle')})" >>"$OUT/distill.log" 2>&1
step evaluate 60 bash -c "$PY evaluate.py --dataset voc21 --make-synthetic $TMP/voc && \
  $PY evaluate.py --dataset voc21 --root $TMP/voc --backbone tiny --modes single,slide24 --device cuda --out $TMP/e32.json && \
  $PY evaluate.py --dataset voc21 --root $TMP/voc --backbone tiny --modes single,slide24 --device cuda --amp --out $TMP/e16.json"
step bench_gpu 70 $PY bench.py --device cuda --sizes 1024x2048,4096x4096 --strides 24 --warmup 2 --reps 5 \
  --max-call 30 --markdown "$OUT/bench_gpu.md"
exit 0
