#!/usr/bin/env bash
# The GPU path proven in one call on a bare device machine (issue 22; bench/gpu_device.md).
#
#   bash bench/gpu_device.sh [bench/gpu_device.py options]   # on the device: wheels, then the plan
#   bash bench/gpu_device.sh --dry-run                       # here, on a CPU: the same plan, tiny
#
# 1. Wheels: the parts that earlier calls left in /tmp/whparts plus any carried in .devwheels/*/
#    (../shared/tools/device-wheels.sh) are joined and installed into /tmp/site, unless DALI
#    and webdataset already import (a dry run here, or a second call on a warm machine). If they
#    still do not import after that, the call stops (exit 3) before any section runs.
# 2. python3 bench/gpu_device.py: quick -> decode -> e2e, each in its time box, one JSON in $OUT,
#    the boxes ending within the command's 600 s limit counted from this script's start.
set -uo pipefail
started=$(date +%s)
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu-device-out}
export OUT PYTHONUNBUFFERED=1
mkdir -p "$OUT"
PY=${PYTHON:-python3}
# nvimgcodec / nvjpeg from the wheels, where DALI looks for them
for d in /tmp/site/nvidia/cu13/lib /tmp/site/nvidia/nvimgcodec /tmp/site/nvidia/nvjpeg/lib; do
  export LD_LIBRARY_PATH=$d${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
done
export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
have() { "$PY" -c 'import nvidia.dali, webdataset' 2>"$OUT/import-check.txt"; }
if ! have; then
  mkdir -p /tmp/whparts /tmp/wheels
  if compgen -G ".devwheels/*/*" >/dev/null; then cp .devwheels/*/* /tmp/whparts/; fi
  if ! compgen -G "/tmp/whparts/*.part-00" >/dev/null; then
    echo "gpu_device.sh: nvidia.dali / webdataset do not import and no wheel parts are in /tmp/whparts or" \
         ".devwheels/*/ (bench/gpu_device.md, steps 1-2): $(tail -1 "$OUT/import-check.txt")" >&2
    exit 3
  fi
  t0=$(date +%s)
  for first in /tmp/whparts/*.part-00; do
    w=$(basename "${first%.part-00}")
    cat /tmp/whparts/"$w".part-* > /tmp/wheels/"$w"
  done
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    /tmp/wheels/*.whl || { echo "gpu_device.sh: installing the wheels from /tmp/whparts failed" >&2; exit 3; }
  echo "wheels: $(ls /tmp/wheels | wc -l) installed into /tmp/site in $(( $(date +%s) - t0 )) s" >&2
  if ! have; then
    echo "gpu_device.sh: the wheels are installed but nvidia.dali / webdataset still do not import:" \
         "$(tail -1 "$OUT/import-check.txt")" >&2
    exit 3
  fi
fi
export PYTHONPATH=$PWD:$PYTHONPATH
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv >&2
exec "$PY" bench/gpu_device.py --out "$OUT" --started-at "$started" "$@"
