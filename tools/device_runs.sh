#!/usr/bin/env bash
# Named quantize runs on the GPU machine, each with nvidia-smi sampling the memory every 100 ms and
# its report kept; a lighter companion of tools/device_perf.sh for A/B comparisons in one call.
# Usage there (after `cargo build --release` and `bash tools/device_pack.sh` here; run from the
# repository root with `source .device-carry/setup.sh` done):
#   TBINS="forward gpu_kernels" TESTS="coop" \
#   RUNS="tc::--gpu-memory,70,--method,gptq,--no-metrics,--tensor-cores nopool:GPTAQ_POOL=0:--gpu-memory,70,--method,gptq" \
#   KB="gemm_coop" OUT=$OUT bash tools/device_runs.sh
# RUNS entries are NAME:ENV1=a,ENV2=b:ARG,ARG,... (a NAME starting old_ runs .device-carry/gptaq-studio-old,
# an earlier build carried for an A/B) on /tmp/l8b2 (a random Llama-3-8B-shaped model
# of two layers, tools/make_random_llama.py, 128 × 2048 calibration tokens, 4-bit g128); TBINS
# the carried test binaries to run (default gpu_kernels forward pipeline; TBINS="" runs none;
# TESTS: libtest filters, TLIM seconds each, TENV their environment, e.g. GPTAQ_POISON_SCRATCH=1
# for the NaN fill of reused scratch that debug builds do); KB a kernel-bench filter (KBENV: environment for
# it; KBLIM its seconds, default 150 — the whole f32 lab file at three shapes needs more; with
# GPTAQ_PROFILE=1 in KBENV the solve bench synchronises every phase of every timed solve, so take
# medians without it); LIM seconds per run; SCALE the scaling table, TORCH_LAYER the PyTorch
# reference layer and SOLVE the solve beside PyTorch's (all below). Results land in $OUT/p.
set -u
cd .device-carry; for f in *.xz; do xz -d -f $f; done; chmod +x gptaq-studio* kernels-bench test-* 2> /dev/null; cd ..
export GPTAQ_TEST_DATA=$PWD/.device-carry/data
D=$OUT/p; mkdir -p $D; B=.device-carry/gptaq-studio
for t in ${TBINS-gpu_kernels forward pipeline}; do
  env ${TENV:-} CI=true timeout ${TLIM:-150} .device-carry/test-$t --test-threads 1 ${TESTS:-} > $D/test_$t.log 2>&1
  echo "test_$t: $(grep -E 'test result' $D/test_$t.log)"; grep -E "FAILED|panicked" -A3 $D/test_$t.log | head -8
done
# The random two-layer 8B model and its calibration, made once for RUNS and LAB.
l8b2() {
  [ -f /tmp/l8b2/config.json ] || python3 tools/make_random_llama.py --preset llama3-8b --layers 2 --out /tmp/l8b2 \
    --calib-out /tmp/l8b-calib.safetensors --nsamples 128 --seqlen 2048 > $D/gen.log 2>&1
}
[ -z "${RUNS:-}" ] || l8b2
Q="quantize /tmp/l8b2 --calib /tmp/l8b-calib.safetensors --nsamples 128 --seqlen 2048 --bits 4 --group-size 128"
run() { local name=$1; shift
  nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 100 > $D/smi_$name.log 2>&1 & local s=$!
  local t0=$(date +%s.%N); timeout ${LIM:-150} "$@" --report $D/$name.json > $D/$name.log 2>&1; local rc=$?; kill $s
  echo "== $name rc=$rc $(awk "BEGIN{printf \"%.1f\", $(date +%s.%N)-$t0}")s smi_peak=$(sort -n $D/smi_$name.log | tail -1)"
  grep -E "phases|done in|finished|warning|[Ee]rror" $D/$name.log | grep -v "^stats .*mirror" | cut -c1-420
  # With GPTAQ_KERNEL_TIMES=1 / --kernel-times: the per-scope sums, idle and host totals.
  grep -E "\(all kernels of the scope\)|^all kernels|GPU idle between|host time in GPU" $D/$name.log | cut -c1-120; }
for spec in ${RUNS:-}; do
  IFS=: read -r name envs args <<< "$spec"
  q=$Q; case ",$args," in *,--nsamples,*) q=${Q/--nsamples 128/} ;; esac   # a run's own --nsamples
  # A run named old_… takes .device-carry/gptaq-studio-old: an earlier build carried beside the
  # current one for an A/B on the same card in the same call.
  b=$B; case $name in old_*) b=$B-old ;; esac
  run $name env ${envs//,/ } $b $q ${args//,/ }
done
# The layer lab's GPU re-solves at 4096 wide and more: LAB="q_proj down_proj" runs `lab` on layer
# LAB_LAYER (default 1) of /tmp/l8b2 for each module (capture with --gpu-memory 70 and LAB_ARGS, then
# GPTQ, GPTAQ and the α sweep), printing its solves' seconds (`solves_secs` in lab_<module>.json).
# LAB_OLD=1 runs each module with .device-carry/gptaq-studio-old too (lab_old_<module>.json).
for m in ${LAB:-}; do
  l8b2
  for v in ${LAB_OLD:+old_ }new_; do
    b=$B; [ $v = old_ ] && b=$B-old; f=lab_${v#new_}$m
    t0=$(date +%s.%N)
    timeout ${LIM:-150} $b lab /tmp/l8b2 --calib /tmp/l8b-calib.safetensors --nsamples ${LAB_NS:-128} --seqlen 2048 \
      --layer ${LAB_LAYER:-1} --module $m --gpu-memory 70 ${LAB_ARGS:-} --json > $D/$f.json 2> $D/$f.log
    echo "== $f rc=$? $(awk "BEGIN{printf \"%.1f\", $(date +%s.%N)-$t0}")s $(grep -oE '"(solver|solves_secs|rows|cols)": [^,]*' $D/$f.json | tr '\n' ' ')"
  done
done
# Issue 10's scaling table: SCALE="h1024 h2048 …" (make_random_llama.py presets, SCALE_LAYERS layers
# each, default 2: layer 0 pays the weight upload and the first-use pipeline compilation;
# SCALE_NS sequences of 2048 tokens, default 128) quantized with every SCALE_RUNS entry
# (NAME:ENVS:ARGS as RUNS, default GPTQ and GPTAQ, --no-metrics --tensor-cores, 70 GiB).
for sp in ${SCALE:-}; do
  ns=${SCALE_NS:-128}
  [ -f /tmp/$sp/config.json ] || python3 tools/make_random_llama.py --preset $sp --layers ${SCALE_LAYERS:-2} --out /tmp/$sp \
    --calib-out /tmp/$sp-calib.safetensors --nsamples $ns --seqlen 2048 > $D/gen_$sp.log 2>&1
  for spec in ${SCALE_RUNS:-gptq::--method,gptq gptaq::--method,gptaq}; do
    IFS=: read -r name envs args <<< "$spec"
    run ${sp}_$name env ${envs//,/ } $B quantize /tmp/$sp --calib /tmp/$sp-calib.safetensors --nsamples $ns \
      --seqlen 2048 --bits 4 --group-size 128 --gpu-memory 70 --no-metrics --tensor-cores ${args//,/ }
  done
done
# The PyTorch reference loops on the same card in the same call (issue 10): TORCH_LAYER="4096,14336,32,8"
# (hidden, intermediate, heads, kv heads; tools/torch_reference.py --bench-layer), 128 × 2048 tokens.
if [ -n "${TORCH_LAYER:-}" ]; then
  timeout ${TORCH_LIM:-230} python3 tools/torch_reference.py --bench-layer "$TORCH_LAYER" --nsamples 128 --seqlen 2048 \
    --out $D/torch_layer.json > $D/torch_layer.log 2>&1
  echo "== torch_layer rc=$?"; grep -E "bench-layer\] (gptq|gptaq):|Error" $D/torch_layer.log | tail -3
fi
if [ -n "${KB:-}" ]; then
  # KBENV after the default size, so that its own GPTAQ_BENCH_SIZES wins (env takes the last).
  env GPTAQ_BENCH_SIZES=4096 ${KBENV:-} timeout ${KBLIM:-150} .device-carry/kernels-bench --bench --warm-up-time 1 --measurement-time 2 "$KB" > $D/kb.log 2>&1
  grep -E "phases|^[a-z_]+/.*|time:" $D/kb.log | grep -v Benchmarking | cut -c1-300
fi
# Issue 5's solve side by side: SOLVE="4096x4096,4096x14336" times `kernels-bench quant_solve`
# (unprofiled: GPTAQ_PROFILE would synchronise every phase) once per SOLVE_ENVS entry
# (NAME:ENV1=a,ENV2=b, e.g. "base: nopool:GPTAQ_BENCH_POOL_GIB=0 chol128:GPTAQ_CHOL_PANEL=128
# p4:GPTAQ_P_BLOCKS=4"; default "base:"), then tools/torch_reference.py --bench on the same
# shapes. The `… codes` entries are the pipeline's solve (W on the GPU, no Q on the host);
# SOLVE_FILTER="quant_solve/.*codes" times only those.
# CHOL="32 128": the factor's Cholesky panel (GPTAQ_CHOL_PANEL) A/B — one synchronised solve per
# method, twice, at CHOL_SHAPE (default 4096x14336), printing its phases (read `factor`).
if [ -n "${SOLVE:-}" ]; then
  for spec in ${SOLVE_ENVS:-base:}; do
    IFS=: read -r name envs <<< "$spec"
    env ${envs//,/ } GPTAQ_BENCH_SOLVE=$SOLVE timeout ${SOLVE_LIM:-150} .device-carry/kernels-bench --bench \
      --warm-up-time 1 --measurement-time 3 "${SOLVE_FILTER:-quant_solve}" > $D/solve_$name.log 2>&1
    echo "== solve $name ($envs)"
    awk '/^quant_solve\//{id=$0; sub(/ +time:.*/, "", id)} /time:/{t=$0; sub(/.*time: +/, "", t); print id, t}' \
      $D/solve_$name.log
    # GPTAQ_KERNEL_TIMES=1 in the entry's environment: each solve's table header and totals.
    grep -E "GPU time per kernel|^all kernels|GPU idle between|host time in GPU" $D/solve_$name.log | cut -c1-120
  done
  # SOLVE_TORCH=0: ours only (an A/B of our own variants; PyTorch's side was measured before).
  if [ "${SOLVE_TORCH:-1}" != 0 ]; then
    timeout ${TORCH_LIM:-230} python3 tools/torch_reference.py --bench "$SOLVE" --out $D/torch_bench.json > $D/torch_bench.log 2>&1
    echo "== torch_bench rc=$?"; grep -E "^\[bench\]" $D/torch_bench.log
  fi
fi
for cp in ${CHOL:-}; do
  sh=${CHOL_SHAPE:-4096x14336}
  GPTAQ_CHOL_PANEL=$cp GPTAQ_PROFILE=1 GPTAQ_BENCH_SOLVE=$sh,$sh timeout ${CHOL_LIM:-60} .device-carry/kernels-bench \
    --bench "quant_solve/none" > $D/chol_$cp.log 2>&1
  echo "== GPTAQ_CHOL_PANEL=$cp"; grep phases $D/chol_$cp.log | cut -c1-300
done
