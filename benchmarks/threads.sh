#!/usr/bin/env bash
# Threads on a shared machine (docs/EXPERIMENTS.md, "Threads"): captioning 46 photos and three
# training epochs with torch's default threads, one thread, passive OpenMP waiting and captioner's
# own policy (auto), with the machine idle and with one or two other processes spinning.
#
#   benchmarks/threads.sh --data data/flickr8k        # about 25 minutes on 2 cores (LOADS="0 1": fewer)
set -euo pipefail
DATA=""
while [ $# -gt 0 ]; do case $1 in --data) DATA=$2; shift 2;; *) echo "unknown option $1" >&2; exit 2;; esac; done
[ -n "$DATA" ] || { echo "usage: benchmarks/threads.sh --data FLICKR8K_FOLDER" >&2; exit 2; }
WORK=$(mktemp -d); trap 'kill $(jobs -p) 2>/dev/null; rm -rf "$WORK"' EXIT
mkdir "$WORK/photos"
head -46 "$DATA/Flickr_8k.devImages.txt" | while read -r f; do cp "$DATA/Images/$f" "$WORK/photos/"; done
cat > "$WORK/caption.py" <<'PY'
import glob, sys, time
import torch
if sys.argv[2] != "auto": torch.set_num_threads(int(sys.argv[2]))
from captioner import Captioner
c = Captioner.load()
photos = sorted(glob.glob(sys.argv[1] + "/*.jpg"))
c.caption(photos[:4])
times = []
for _ in range(3):
    t = time.perf_counter(); c.caption(photos); times.append(time.perf_counter() - t)
print(f"{torch.get_num_threads()} threads, 46 photos: " + " ".join(f"{x:.2f}" for x in times) + " s", flush=True)
PY
python -c "from captioner.runtime import cpu_has_fast_bf16, cpu_has_amx; import platform, torch; \
print(f'{open(\"/proc/cpuinfo\").read().split(\"model name\")[1].split(\":\")[1].splitlines()[0].strip()}, '\
f'native bf16: {cpu_has_fast_bf16()}, AMX: {cpu_has_amx()}, torch {torch.__version__}')"
DEFAULT=$(python -c "import torch; print(torch.get_num_threads())")  # torch's own: one a physical core
for load in ${LOADS:-0 1 2}; do
  for _ in $(seq "$load"); do python3 -c "while 1: pass" & done
  sleep 2
  for cfg in default one passive auto; do
    env=(); threads=auto
    case $cfg in default) env=(CAPTIONER_THREADS="$DEFAULT"); threads=$DEFAULT;; one) env=(CAPTIONER_THREADS=1); threads=1;;
                 passive) env=(OMP_WAIT_POLICY=PASSIVE CAPTIONER_THREADS="$DEFAULT"); threads=$DEFAULT;; esac
    echo -n "other busy processes $load, $cfg: "
    env "${env[@]}" python "$WORK/caption.py" "$WORK/photos" "$threads"
    rm -rf "$WORK/run"
    env "${env[@]}" captioner train --data "$DATA" --max-images 500 --epochs 3 --space-epochs 1 --out "$WORK/run" \
      --quiet > "$WORK/train.log" 2>&1
    echo "  training epochs: $(tail -n +2 "$WORK/run/metrics.csv" | cut -d, -f8 | tr '\n' ' ')s"
  done
  kill $(jobs -p) 2>/dev/null || true; wait 2>/dev/null || true
done
