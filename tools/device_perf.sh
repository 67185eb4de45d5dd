#!/usr/bin/env bash
# Speed and memory batch for the GPU machine (issue 10), everything side by side in one call:
#   kbench       the Rust kernel benches (GEMM both tiles, Hessian syrk, GPU factor U, whole solve)
#   torch_bench  tools/torch_reference.py --bench: the PyTorch reference solve + accumulation
#   l8b_<m>      gptaq-studio quantize on a random Llama-3-8B-shaped layer (tools/make_random_llama.py),
#                128 × 2048 tokens, 4-bit sym g128, f16 host streams, 8 GiB plan; nvidia-smi samples
#                the GPU memory every 100 ms alongside (smi_<m>.log, MiB)
#   torch_layer  tools/torch_reference.py --bench-layer on the same shape (reference loops)
# Usage on the GPU machine (after `bash tools/device_pack.sh` here):
#   source .device-carry/setup.sh && OUT=$OUT bash tools/device_perf.sh
# Knobs: SIZES (kernel sizes, "1024,4096"), SOLVE ("4096x4096,4096x14336"), LAYERS (1), SKIP (steps).
set -u
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
D=${WORK:-/tmp/perf}
mkdir -p "$D"
B=.device-carry/gptaq-studio
K=.device-carry/kernels-bench
for f in $B $K; do [ -f "$f.xz" ] && xz -d -f "$f.xz"; [ -f "$f" ] && chmod +x "$f"; done
SIZES=${SIZES:-1024,4096}
SOLVE=${SOLVE:-4096x4096,4096x14336}
SKIP=${SKIP:-}
skip() { case " $SKIP " in *" $1 "*) return 0 ;; esac; return 1; }
t() { local name=$1 lim=$2; shift 2; skip "$name" && return 0; local t0; t0=$(date +%s.%N)
  timeout -k 5 "$lim" "$@" > "$D/$name.log" 2>&1; local rc=$?
  echo "$name rc=$rc $(awk "BEGIN{printf \"%.1f\", $(date +%s.%N)-$t0}")s" | tee -a "$D/steps.txt"; }
nvidia-smi > "$D/nvidia-smi.txt" 2>&1
"$B" devices > "$D/devices.txt" 2>&1
t kbench 260 env GPTAQ_BENCH_SIZES="$SIZES" GPTAQ_BENCH_SOLVE="$SOLVE" "$K" --bench --warm-up-time 1 --measurement-time 2
grep -E "^[a-z_]+/|time:|thrpt:" "$D/kbench.log" | head -60
t torch_bench 150 python3 tools/torch_reference.py --bench "$SOLVE" --out "$D/torch_bench.json"
t gen 120 python3 tools/make_random_llama.py --preset llama3-8b --layers "${LAYERS:-1}" --out /tmp/l8b \
  --calib-out /tmp/l8b-calib.safetensors --nsamples 128 --seqlen 2048
for m in gptq gptaq; do
  nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 100 > "$D/smi_$m.log" 2>&1 &
  smi=$!
  t "l8b_$m" 240 "$B" quantize /tmp/l8b --calib /tmp/l8b-calib.safetensors --nsamples 128 --seqlen 2048 \
    --method "$m" --bits 4 --group-size 128 --gpu-memory 8 --stream-dtype f16 --report "$D/l8b_$m.json"
  kill $smi 2>/dev/null
  echo "l8b_$m nvidia-smi peak MiB: $(sort -n "$D/smi_$m.log" | tail -1)" | tee -a "$D/steps.txt"
  tail -3 "$D/l8b_$m.log"
done
t torch_layer 230 python3 tools/torch_reference.py --bench-layer 4096,14336,32,8 --nsamples 128 --seqlen 2048 \
  --out "$D/torch_layer.json"
tail -5 "$D/torch_layer.log"
cat "$D/steps.txt"
