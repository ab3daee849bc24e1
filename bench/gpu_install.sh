#!/usr/bin/env bash
# Install a GPU-check wheelhouse folder (made by `make gpu-wheelhouse`) on the GPU test machine, offline.
#
#   bash bench/gpu_install.sh .whl1 && export PYTHONPATH=/tmp/site:$PWD
#
# Everything goes into one --target directory (RTF_SITE, default /tmp/site) that PYTHONPATH puts before
# the machine's own site-packages; Ray's worker processes inherit PYTHONPATH from the driver, so they see
# the same packages. --no-deps: the folder holds exactly what the machine lacks; --no-index: it has no
# network. deepspeed arrives as a wheel built by `make gpu-wheelhouse` (DS_BUILD_OPS=0: no op compiled
# ahead of time; one that is used compiles just in time with the machine's nvcc). Should a folder hold an
# sdist instead, pip builds it here with the machine's setuptools and torch (--no-build-isolation), no op
# compiled either. Everything goes through one pip call, so one --target move holds it all.
set -euo pipefail
dir=${1:?usage: bash bench/gpu_install.sh .whl1|.whl2}
site=${RTF_SITE:-/tmp/site}
py=${RTF_GPU_PYTHON:-python3}
[[ -d $dir ]] || { echo "gpu_install: $dir not found: run 'make gpu-wheelhouse' here and carry $dir" >&2; exit 2; }
shopt -s nullglob
wheels=("$dir"/*.whl)
sdists=("$dir"/*.tar.gz)
((${#wheels[@]} + ${#sdists[@]})) || { echo "gpu_install: $dir holds no wheels" >&2; exit 2; }
t0=$SECONDS
DS_BUILD_OPS=0 PIP_DISABLE_PIP_VERSION_CHECK=1 "$py" -m pip install -q --no-index --no-deps --no-compile \
  --no-cache-dir --upgrade --no-build-isolation --target "$site" "${wheels[@]}" "${sdists[@]}"
echo "gpu_install: ${#wheels[@]} wheel(s) and ${#sdists[@]} sdist(s) from $dir into $site in $((SECONDS - t0))s" >&2
