# Sourced by scripts/gpu_checks.sh and scripts/gpu_backbones.sh (with OUT set): the environment of a device run,
# the versions it ran with (-> $OUT/env.txt), and `step NAME LIMIT CMD...`, which runs CMD under a timeout into
# $OUT/NAME.log and prints its exit status, time and last lines, so that every step's output comes back.
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
PY=python3
if [ -d .gpu_site ]; then export PYTHONPATH="$PWD/.gpu_site${PYTHONPATH:+:$PYTHONPATH}"; fi
{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1
  $PY -c "import torch, timm, open_clip; print('torch', torch.__version__, '| timm', timm.__version__,
'| open_clip', open_clip.__version__, '| gpu', torch.cuda.get_device_name() if torch.cuda.is_available() else 'NONE')"
} 2>&1 | tee "$OUT/env.txt"

step() { local name=$1 limit=$2; shift 2; echo "== $name (limit ${limit}s): $*" | tee -a "$OUT/$name.log"
         local t0=$SECONDS; timeout "$limit" "$@" >>"$OUT/$name.log" 2>&1; local rc=$?
         echo "== $name: exit $rc after $((SECONDS - t0)) s" | tee -a "$OUT/$name.log"; tail -n 25 "$OUT/$name.log"; }
