#!/usr/bin/env bash
# The GPU run of bench.py (issue 5: single pass vs sliding window against the hardware limit), as ONE command.
#
# Here (a machine with this repo's venv), once:      bash scripts/bench_gpu.sh --prepare
#   copies the pure-Python packages the device image lacks (open_clip + ftfy + wcwidth, and timm so that its
#   version matches ours) into .gpu_site/ (ignored through .git/info/exclude; ~27 MB).
# Then on the device machine:                        bash scripts/bench_gpu.sh
#   e.g. the device tool's run(command="bash scripts/bench_gpu.sh", carry=[".gpu_site"], timeout_s=540).
# Writes env.txt, bench_gpu.log, bench_gpu.md and bench_gpu.json to $OUT (or runs/bench_gpu/ when OUT is unset).
# Expected wall time on one H100/H200: about 4 minutes (model build ~20 s, single pass ~20 s, teachers ~3 min,
# training steps ~10 s); the benchmark itself is capped at 450 s so that the outputs always come back.
set -uo pipefail
cd "$(dirname "$0")/.."

if [ "${1:-}" = "--prepare" ]; then
  python - <<'PY' || exit 1
import importlib, os, shutil
dst = ".gpu_site"
shutil.rmtree(dst, ignore_errors=True)
os.makedirs(dst)
for name in ("open_clip", "timm", "ftfy", "wcwidth"):
    src = os.path.dirname(importlib.import_module(name).__file__)
    shutil.copytree(src, os.path.join(dst, name), ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    print(f"copied {name} from {src}")
PY
  mkdir -p .git/info && touch .git/info/exclude
  grep -qx '/.gpu_site/' .git/info/exclude || echo '/.gpu_site/' >> .git/info/exclude
  du -sh .gpu_site
  exit 0
fi

OUT="${OUT:-runs/bench_gpu}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
PY=python3
if [ -d .gpu_site ]; then export PYTHONPATH="$PWD/.gpu_site${PYTHONPATH:+:$PYTHONPATH}"; fi
if ! $PY -c "import open_clip" 2>/dev/null; then
  echo "error: open_clip is not importable; run 'bash scripts/bench_gpu.sh --prepare' here and carry .gpu_site" >&2
  exit 2
fi
{
  date -u
  nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version,clocks.sm,clocks.max.sm,temperature.gpu \
    --format=csv 2>&1
  $PY -c "import torch, timm, open_clip, platform; print('python', platform.python_version(), '| torch',
torch.__version__, 'cuda', torch.version.cuda, '| timm', timm.__version__, '| open_clip', open_clip.__version__,
'| gpu', torch.cuda.get_device_name() if torch.cuda.is_available() else 'NONE')"
} 2>&1 | tee "$OUT/env.txt"

# The full grid (bench.py's CUDA defaults): siglip2-b16, pretrained=None, bf16 autocast; sizes 1024x2048, 512^2,
# 1024^2, 2048^2, 2048x4096, 4096^2; strides 512, 256, 128, 48, 24; training step at 1024x2048.
timeout 450 $PY bench.py --device cuda --max-call 120 \
  --json "$OUT/bench_gpu.json" --markdown "$OUT/bench_gpu.md" 2>&1 | tee "$OUT/bench_gpu.log"
rc=${PIPESTATUS[0]}
nvidia-smi --query-gpu=clocks.sm,temperature.gpu,memory.used --format=csv 2>&1 | tee -a "$OUT/env.txt"
exit "$rc"
