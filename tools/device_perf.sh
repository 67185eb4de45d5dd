#!/usr/bin/env bash
# One batch for the GPU machine (issues 5, 6, 10), everything side by side in one call, in order of
# value, inside a total time budget (BUDGET_S, default 540 s; every step gets min(its limit, what is
# left), so the call always returns with the logs of whatever finished):
#   test_<name> the carried GPU test binaries (tools/device_pack.sh PACK_TESTS) on the real GPU
#   tune         gptaq-studio tune: both GEMM kernels over a shape grid; the table is used below
#   q_<m>_w<b>   quality: gptaq-studio quantize tiny-llama-15m on NSAMPLES × SEQLEN C4 windows
#                (tools/make_calib_ids.py, seed 0 — the windows tools/torch_reference.py uses), sym
#                g128, --eval on the whole WikiText-2 test at SEQLEN (in memory, --no-fp-eval), export
#                to a directory; q_<first>_hf: transformers' perplexity of that export
#                (tools/hf_perplexity.py --gptq, the independent dequantizer)
#   l8b_tc_<m>   the same with GPTAQ_TENSOR_CORES=1 (H/D from f16 operands on cooperative matrices)
#   l8b_<m>      gptaq-studio quantize on a random Llama-3-8B-shaped layer (tools/make_random_llama.py),
#                128 × 2048 tokens, 4-bit sym g128, f16 host streams, 8 GiB plan; nvidia-smi samples
#                the GPU memory every 100 ms alongside (smi_l8b_<m>.log, MiB)
#   prof_<m>     the same layer with GPTAQ_PROFILE=1 on 16 sequences: seconds per phase
#   l8b_perfhint_<m>  l8b_<m> with GPTAQ_MEMORY_HINTS=performance (wgpu's large allocator blocks)
#   l8b_gpu_<m>[_nm][_tc]  l8b_<m> with the streams on the GPU (--gpu-memory L8B_GPU_GIB, 70): no
#                host transfers, MLP activations kept between stages; _nm: --no-metrics (GPTQ as the
#                reference runs it); _tc: --tensor-cores
#   kbench       the Rust kernel benches (GEMM both tiles, Hessian syrk, GPU factor U, whole solve,
#                causal attention at ATTN = heads:kv_heads:hd:seqlen:nseq, Llama-3-8B by default)
#   torch_bench / torch_layer  the PyTorch reference (solve + accumulation / one layer's loops);
#                skipped by default (SKIP) when the same card's numbers are already in BENCHMARKS.md
# At the end tools/perf_summary.py prints one markdown table of every quantize report (s/layer,
# app and nvidia-smi peaks, the plan's choices), the profile phases and the kernel medians.
# Usage on the GPU machine (after `cargo build --release && cargo bench --no-run` and
# `bash tools/device_pack.sh` here):
#   source .device-carry/setup.sh && OUT=$OUT WORK=/tmp/perf bash tools/device_perf.sh
# Knobs: QUALITY ("gptq:3 gptaq:3"), NSAMPLES (128), SEQLEN (512), L8B ("gptaq gptq"), L8B_HINTS
# ("gptaq"), L8B_GPU ("gptq:nm gptaq"), L8B_GPU_GIB (70), LAYERS (1),
# TEST_FILTER / TEST_LIMIT (test-name filters and seconds per test binary), KBENCH_FILTER (criterion
# filter), KBENCH_PROFILE (non-empty: GPTAQ_PROFILE=1 for the kernel benches only, the solve's phases), SIZES (kernel sizes, "4096"), SOLVE ("4096x4096,4096x14336"), ATTN ("32:8:128:2048:1"), SCALING (presets, e.g. "h1024 h2048 h4096"),
# SCALING_NSAMPLES (128), SCALING_GIB (60), SKIP (step names), BUDGET_S.
set -u
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
D=${WORK:-/tmp/perf}
mkdir -p "$D"
B=.device-carry/gptaq-studio
K=.device-carry/kernels-bench
for f in $B $K .device-carry/test-*; do
  case $f in *.xz) xz -d -f "$f"; f=${f%.xz} ;; *) [ -f "$f.xz" ] && xz -d -f "$f.xz" ;; esac
  [ -f "$f" ] && chmod +x "$f"; done
DATA=${GPTAQ_TEST_DATA:-$ROOT/.device-carry/data}
MODEL=$DATA/tiny-llama-15m
WIKI=$DATA/corpora/wikitext-2-raw-v1/wiki.test.raw
C4=$DATA/corpora/c4/c4_validation_2k.jsonl
QUALITY=${QUALITY-gptq:3 gptaq:3}
NSAMPLES=${NSAMPLES:-128}
SEQLEN=${SEQLEN:-512}
L8B=${L8B-gptaq gptq}
SIZES=${SIZES:-4096}
SOLVE=${SOLVE:-4096x4096,4096x14336}
SKIP=${SKIP:-torch_bench torch_layer}
BUDGET_S=${BUDGET_S:-540}
EW=(); [ -n "${EVAL_WINDOWS:-}" ] && EW=(--eval-windows "$EVAL_WINDOWS")   # local smoke tests only
START=$(date +%s)
skip() { case " $SKIP " in *" $1 "*) return 0 ;; esac; return 1; }
# t NAME LIMIT CMD...: run with min(LIMIT, budget left) seconds; log to $D/NAME.log; rc + seconds to steps.txt
t() { local name=$1 lim=$2; shift 2; skip "$name" && return 0
  local left=$(( BUDGET_S - ($(date +%s) - START) )); [ "$left" -lt "$lim" ] && lim=$left
  if [ "$lim" -lt 5 ]; then echo "$name skipped (budget)" | tee -a "$D/steps.txt"; return 0; fi
  local t0; t0=$(date +%s.%N)
  timeout -k 5 "$lim" "$@" > "$D/$name.log" 2>&1; local rc=$?
  echo "$name rc=$rc $(awk "BEGIN{printf \"%.1f\", $(date +%s.%N)-$t0}")s (limit $lim)" | tee -a "$D/steps.txt"; }
# tm NAME LIMIT CMD...: t with nvidia-smi sampling the GPU memory every 100 ms alongside
# (smi_NAME.log), its peak appended to steps.txt.
tm() { local name=$1; skip "$name" && return 0
  nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 100 > "$D/smi_$name.log" 2>&1 &
  local smi=$!
  t "$@"
  kill $smi 2>/dev/null
  echo "$name nvidia-smi peak MiB: $(sort -n "$D/smi_$name.log" | tail -1)" | tee -a "$D/steps.txt"; }
nvidia-smi > "$D/nvidia-smi.txt" 2>&1
"$B" devices > "$D/devices.txt" 2>&1

# --- the GPU test suites on the real GPU (carried test binaries; CI=true: no adapter = failure) ---
for tb in .device-carry/test-*; do
  case $tb in *.xz) continue ;; esac
  [ -x "$tb" ] || continue
  n=${tb##*/test-}
  t "test_$n" "${TEST_LIMIT:-120}" env CI=true "$tb" --test-threads 1 ${TEST_FILTER:-}
  grep -E "^test result|FAILED|panicked" "$D/test_$n.log" | head -5
done

# --- GEMM tuning table for this adapter (later steps use it; the table comes back in $D) ---------
t tune 90 env GPTAQ_CACHE_DIR="$D/cache" "$B" tune
export GPTAQ_CACHE_DIR="$D/cache"

# --- quality on a real checkpoint (same windows as the PyTorch reference rows in BENCHMARKS.md) ---
t calib_ids 60 python3 tools/make_calib_ids.py --tokenizer "$MODEL" --calib "$C4" --nsamples "$NSAMPLES" \
  --seqlen "$SEQLEN" --seed 0 --out "$D/calib_ids.safetensors"
first=1
for mb in $QUALITY; do
  m=${mb%%:*}; b=${mb##*:}
  t "q_${m}_w${b}" 120 "$B" quantize "$MODEL" --calib "$D/calib_ids.safetensors" --nsamples "$NSAMPLES" \
    --seqlen "$SEQLEN" --method "$m" --bits "$b" --group-size 128 --out "$D/q_${m}_w${b}" --force \
    --report "$D/q_${m}_w${b}.json" --eval "$WIKI" --eval-seqlen "$SEQLEN" "${EW[@]}" --no-fp-eval
  grep -E "^perplexity|peak|modules in" "$D/q_${m}_w${b}.log" | tail -3
  if [ $first = 1 ] && [ -d "$D/q_${m}_w${b}" ]; then
    t "q_${m}_w${b}_hf" 90 python3 tools/hf_perplexity.py --gptq "$D/q_${m}_w${b}" --text "$WIKI" \
      --seqlen "$SEQLEN" ${EVAL_WINDOWS:+--max-windows $EVAL_WINDOWS} --native --out "$D/q_${m}_w${b}_hf.json"
    tail -2 "$D/q_${m}_w${b}_hf.log"
  fi
  first=0
done

# --- kernels ----------------------------------------------------------------------------------
t kbench 150 env ${KBENCH_PROFILE:+GPTAQ_PROFILE=1} GPTAQ_BENCH_SIZES="$SIZES" GPTAQ_BENCH_SOLVE="$SOLVE" GPTAQ_BENCH_ATTN="${ATTN:-32:8:128:2048:1}" "$K" --bench --warm-up-time 1 --measurement-time 2 ${KBENCH_FILTER:-}
grep -E "^[a-z_]+/|time:|thrpt:" "$D/kbench.log" | head -60

# --- Llama-3-8B-shaped layer: time split and peak GPU memory under an 8 GiB plan ---------------
# (kept when a warm machine already has it from an earlier call)
[ -f /tmp/l8b/config.json ] && [ -f /tmp/l8b-calib.safetensors ] && SKIP="$SKIP gen"
t gen 120 python3 tools/make_random_llama.py --preset llama3-8b --layers "${LAYERS:-1}" --out /tmp/l8b \
  --calib-out /tmp/l8b-calib.safetensors --nsamples 128 --seqlen 2048
# Where a layer's time goes (GPTAQ_PROFILE=1: phases synchronised, so slower than the plain run;
# 16 sequences are enough, the per-sequence phases scale linearly).
for m in $L8B; do
  t "prof_$m" 90 env GPTAQ_PROFILE=1 "$B" quantize /tmp/l8b --calib /tmp/l8b-calib.safetensors --nsamples 16 \
    --seqlen 2048 --method "$m" --bits 4 --group-size 128 --gpu-memory 8 --stream-dtype f16 \
    --report "$D/prof_$m.json"
  grep -E "phases" "$D/prof_$m.log"
done
for m in $L8B; do
  tm "l8b_$m" 200 "$B" quantize /tmp/l8b --calib /tmp/l8b-calib.safetensors --nsamples 128 --seqlen 2048 \
    --method "$m" --bits 4 --group-size 128 --gpu-memory 8 --stream-dtype f16 --report "$D/l8b_$m.json"
  tail -4 "$D/l8b_$m.log"
done

# The same run with wgpu's default allocator blocks (GPTAQ_MEMORY_HINTS=performance; the app uses
# small blocks since 2026-12-05): how much of nvidia-smi's excess over the app's count they explain.
for m in ${L8B_HINTS-gptaq}; do
  tm "l8b_perfhint_$m" 200 env GPTAQ_MEMORY_HINTS=performance "$B" quantize /tmp/l8b \
    --calib /tmp/l8b-calib.safetensors --nsamples 128 --seqlen 2048 --method "$m" --bits 4 \
    --group-size 128 --gpu-memory 8 --stream-dtype f16 --report "$D/l8b_perfhint_$m.json"
  tail -4 "$D/l8b_perfhint_$m.log"
done

# --- the same layer with the streams on the GPU (issue 10's speed target: the PyTorch reference
# keeps its activations on the GPU too, 19.3 GiB for GPTAQ): no host transfers, the MLP activations
# kept from stage D to E (MemoryPlan::act_streams). Entries are METHOD[:nm] (nm: --no-metrics).
# Entries are METHOD[:nm][:tc]: nm --no-metrics, tc --tensor-cores (forward linears and statistics
# on f16 cooperative matrices).
for spec in ${L8B_GPU-gptq:nm gptaq}; do
  m=${spec%%:*}; extra=(); name="l8b_gpu_$m"
  case ":$spec:" in *:nm:*) extra+=(--no-metrics); name="${name}_nm" ;; esac
  case ":$spec:" in *:tc:*) extra+=(--tensor-cores); name="${name}_tc" ;; esac
  tm "$name" 200 "$B" quantize /tmp/l8b --calib /tmp/l8b-calib.safetensors --nsamples 128 \
    --seqlen 2048 --method "$m" --bits 4 --group-size 128 --gpu-memory "${L8B_GPU_GIB:-70}" \
    "${extra[@]}" --report "$D/$name.json"
  tail -4 "$D/$name.log"
done

# --- scaling table (issue 10): time per layer and peak memory over width, GPTQ and GPTAQ ----------
# SCALING="h1024 h2048" etc. (presets of make_random_llama.py); empty by default (budget). h8192 is
# Llama-3-70B's layer: its 28672² Hessian (3.1 GiB) exceeds NVIDIA's 2 GiB storage binding, so it
# also measures the row-panel path (src/gpu/matrix.rs) at full size (≈22 GiB of n×n matrices for
# GPTAQ: give it SCALING_GIB ≥ 40).
for sp in ${SCALING:-}; do
  t "gen_$sp" 120 python3 tools/make_random_llama.py --preset "$sp" --layers 1 --out "/tmp/$sp" \
    --calib-out "/tmp/$sp-calib.safetensors" --nsamples "${SCALING_NSAMPLES:-128}" --seqlen 2048
  for m in gptq gptaq; do
    tm "scale_${sp}_$m" 200 "$B" quantize "/tmp/$sp" --calib "/tmp/$sp-calib.safetensors" \
      --nsamples "${SCALING_NSAMPLES:-128}" --seqlen 2048 --method "$m" --bits 4 --group-size 128 \
      --gpu-memory "${SCALING_GIB:-60}" --stream-dtype f16 --report "$D/scale_${sp}_$m.json"
  done
done

# --- the same layer with the statistics on tensor cores (GPTAQ_TENSOR_CORES=1, experimental) ----
# Compare its report's module errors and times with l8b_<m>.json: the f16-operand H/D/E path.
for m in ${L8B_TC-gptaq}; do
  tm "l8b_tc_$m" 200 env GPTAQ_TENSOR_CORES=1 "$B" quantize /tmp/l8b --calib /tmp/l8b-calib.safetensors \
    --nsamples 128 --seqlen 2048 --method "$m" --bits 4 --group-size 128 --gpu-memory 8 --stream-dtype f16 \
    --report "$D/l8b_tc_$m.json"
  grep -E "warning: GPTAQ_TENSOR|finished" "$D/l8b_tc_$m.log" | head -3
done

t torch_bench 150 python3 tools/torch_reference.py --bench "$SOLVE" --out "$D/torch_bench.json"
t torch_layer 230 python3 tools/torch_reference.py --bench-layer 4096,14336,32,8 --nsamples 128 --seqlen 2048 \
  --out "$D/torch_layer.json"
cat "$D/steps.txt"
# The numbers for BENCHMARKS.md in the returned output's tail (tools/perf_summary.py).
python3 tools/perf_summary.py "$D" || true
