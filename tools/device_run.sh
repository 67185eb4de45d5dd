#!/usr/bin/env bash
# One batch of measurements for the GPU machine (see tools/README.md).
#
# What it runs, each step guarded (a failing or missing step never stops the rest; every step has a
# timeout and logs to $OUT/<step>.log; rc and seconds go to $OUT/steps.tsv; $OUT/summary.json
# collects the numbers at the end):
#   devices           gptaq-studio devices --json
#   fp_ppl_py_512     FP perplexity, hf_perplexity.py (expect 118.82; fp_ppl_py_256 at the end: 102.78)
#   fp_ppl_rust       gptaq-studio eval MODEL --text wiki.test.raw --seqlen 512
#   torch_bench       torch_reference.py --bench (solve 4096x4096, 4096x14336; accumulation)
#   kernels_bench     .device-carry/kernels-bench --bench (if carried)
#   (end) torch_layer_bench  torch_reference.py --bench-layer: GPTQ/GPTAQ reference driver on one
#                     random fp16 Llama-3-8B-shaped layer, 128 x 2048 tokens: time split + peak memory
#   calib_ids         make_calib_ids.py: NSAMPLES x SEQLEN C4 windows -> $OUT/calib_ids.safetensors
#   rust_<m>_w<b>     gptaq-studio quantize (GPTQ/GPTAQ/RTN, W4/W3, g128) on those windows, --report
#   rust_<m>_w<b>_eval / _hfgptq   eval of the export with gptaq-studio eval and hf_perplexity.py --gptq
#   ref_<m>_w<b>      torch_reference.py quality run (same windows), + hf_perplexity.py --gptq of its export
#
# Environment (all optional): OUT (default ./device-out), GPTAQ_BIN, GPTAQ_KBENCH, GPTAQ_TEST_DATA
# (set by .device-carry/setup.sh), MODEL, NSAMPLES (128), SEQLEN (512), METHODS ("gptq gptaq rtn"),
# BITS_LIST ("4 3"), GS (128), CALIB_MODE (ids|jsonl), BENCH_SHAPES, BUDGET_S (total seconds, 540),
# PYTHON, DRY_RUN=1 (print the commands only), SKIP ("space separated step-name prefixes to skip"),
# EVAL_MAX_WINDOWS / BENCH_TOKENS (smoke tests on a CPU machine only; not for real numbers).
set -u
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
OUT=${OUT:-$ROOT/device-out}
mkdir -p "$OUT"
DRY_RUN=${DRY_RUN:-0}
if [ "$DRY_RUN" != 1 ] && [ -f "$ROOT/.device-carry/setup.sh" ] && [ -z "${GPTAQ_NO_SETUP:-}" ]; then
  # shellcheck disable=SC1091
  source "$ROOT/.device-carry/setup.sh" > "$OUT/setup.log" 2>&1 || echo "setup.sh failed (see setup.log)"
fi
BIN=${GPTAQ_BIN:-$ROOT/.device-carry/gptaq-studio}
KBENCH=${GPTAQ_KBENCH:-$ROOT/.device-carry/kernels-bench}
DATA=${GPTAQ_TEST_DATA:-$ROOT/../shared/data}
MODEL=${MODEL:-$DATA/tiny-llama-15m}
WIKI=${WIKI:-$DATA/corpora/wikitext-2-raw-v1/wiki.test.raw}
C4=${C4:-$DATA/corpora/c4/c4_validation_2k.jsonl}
NSAMPLES=${NSAMPLES:-128}
SEQLEN=${SEQLEN:-512}
METHODS=${METHODS:-gptq gptaq rtn}
BITS_LIST=${BITS_LIST:-4 3}
GS=${GS:-128}
CALIB_MODE=${CALIB_MODE:-ids}
BENCH_SHAPES=${BENCH_SHAPES:-4096x4096,4096x14336}
BUDGET_S=${BUDGET_S:-540}
SKIP=${SKIP:-}
PY=${PYTHON:-python3}
# smoke-test knobs (local CPU runs): cut the Python evaluations / the accumulation bench
MW=()
[ -n "${EVAL_MAX_WINDOWS:-}" ] && MW=(--max-windows "$EVAL_MAX_WINDOWS")
BENCH_TOKENS=${BENCH_TOKENS:-262144}
LAYER_BENCH=${LAYER_BENCH-4096,14336,32,8}   # issue 10's Llama-3-8B-shaped layer, 128 x 2048 tokens; empty = skip
WORK=${TMPDIR:-/tmp}/gptaq-device-$$
mkdir -p "$WORK"
START=$(date +%s)
printf 'step\trc\tsecs\n' > "$OUT/steps.tsv"
{
  echo "root=$ROOT out=$OUT bin=$BIN data=$DATA model=$MODEL nsamples=$NSAMPLES seqlen=$SEQLEN"
  echo "methods=$METHODS bits=$BITS_LIST gs=$GS calib_mode=$CALIB_MODE budget=${BUDGET_S}s dry_run=$DRY_RUN"
  nconf=$(( $(echo $METHODS | wc -w) * $(echo $BITS_LIST | wc -w) ))
  # rough H100 estimate for the Python steps (tiny-llama-15m, 128 x 512): env 10, FP evals 2 x 20,
  # bench 70, calib 5, per setting reference ~20 + dequant eval ~10, layer bench ~60
  echo "estimate: ~$((10 + 40 + 70 + 5 + nconf * 30 + 60))s for the Python steps + the Rust steps (per setting: quantize + 2 evals)"
  date -u
} | tee "$OUT/run_info.txt"

# step NAME TIMEOUT_S CMD...  — runs CMD with a timeout (cut to the remaining budget), logs, records.
step() {
  local name=$1 limit=$2
  shift 2
  for p in $SKIP; do
    case "$name" in "$p"*) printf '%s\tskipped\t0\n' "$name" >> "$OUT/steps.tsv"; return 0 ;; esac
  done
  local now left
  now=$(date +%s)
  left=$((BUDGET_S - (now - START)))
  if [ "$left" -le 5 ]; then
    echo "[skip] $name: time budget used up"
    printf '%s\tbudget\t0\n' "$name" >> "$OUT/steps.tsv"
    return 0
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "[run ] $name (limit ${limit}s): $*"
  if [ "$DRY_RUN" = 1 ]; then
    printf '%s\tdry\t0\n' "$name" >> "$OUT/steps.tsv"
    return 0
  fi
  local t0 t1 rc
  t0=$(date +%s.%N)
  { echo "+ $*"; timeout -k 5 "$limit" "$@"; } > "$OUT/$name.log" 2>&1
  rc=$?
  t1=$(date +%s.%N)
  local secs
  secs=$(awk "BEGIN{printf \"%.1f\", $t1-$t0}")
  printf '%s\t%s\t%s\n' "$name" "$rc" "$secs" >> "$OUT/steps.tsv"
  echo "[done] $name rc=$rc ${secs}s (elapsed $(( $(date +%s) - START ))s)"
  [ "$rc" = 0 ] || tail -n 5 "$OUT/$name.log" | sed 's/^/       /'
  return 0
}

have_bin() { [ -x "$BIN" ] || [ "$DRY_RUN" = 1 ]; }

# --- environment -------------------------------------------------------------------------------
step env 30 bash -c "nvidia-smi; $PY -c 'import torch, transformers, safetensors; print(torch.__version__, transformers.__version__, torch.cuda.get_device_name(0) if torch.cuda.is_available() else \"no cuda\")'"
if have_bin; then step devices 60 "$BIN" devices --json; fi

# --- FP perplexity -----------------------------------------------------------------------------
step fp_ppl_py_512 90 $PY tools/hf_perplexity.py --model "$MODEL" --text "$WIKI" --seqlen 512 "${MW[@]}" --out "$OUT/fp_ppl_py_512.json"
if have_bin; then step fp_ppl_rust 120 "$BIN" eval "$MODEL" --text "$WIKI" --seqlen 512; fi

# --- timing baselines ------------------------------------------------------------------------------
step torch_bench 180 $PY tools/torch_reference.py --bench "$BENCH_SHAPES" --tokens "$BENCH_TOKENS" --out "$OUT/torch_bench.json"
if [ -x "$KBENCH" ]; then step kernels_bench 180 "$KBENCH" --bench; else echo "[skip] no kernels bench at $KBENCH"; fi

# --- calibration windows shared by both tools ----------------------------------------------------
CALIB_IDS=$OUT/calib_ids.safetensors
step calib_ids 60 $PY tools/make_calib_ids.py --tokenizer "$MODEL" --calib "$C4" --nsamples "$NSAMPLES" --seqlen "$SEQLEN" --seed 0 --out "$CALIB_IDS"
if [ "$CALIB_MODE" = ids ]; then RUST_CALIB=$CALIB_IDS; else RUST_CALIB=$C4; fi

# --- per setting: Rust quantize + evals of its export, then the PyTorch reference (same windows) ---
have_bin || echo "[skip] no binary at $BIN: Rust steps skipped"
for b in $BITS_LIST; do for m in $METHODS; do
  if have_bin; then
    d=$WORK/rust_${m}_w${b}
    step "rust_${m}_w${b}" 150 "$BIN" quantize "$MODEL" --calib "$RUST_CALIB" --nsamples "$NSAMPLES" --seqlen "$SEQLEN" \
      --method "$m" --bits "$b" --group-size "$GS" --out "$d" --force --report "$OUT/rust_${m}_w${b}.json"
    if [ -d "$d" ] || [ "$DRY_RUN" = 1 ]; then
      step "rust_${m}_w${b}_eval" 90 "$BIN" eval "$d" --text "$WIKI" --seqlen "$SEQLEN"
      step "rust_${m}_w${b}_hfgptq" 90 $PY tools/hf_perplexity.py --gptq "$d" --text "$WIKI" --seqlen "$SEQLEN" "${MW[@]}" --native --out "$OUT/rust_${m}_w${b}_hfgptq.json"
    fi
  fi
  d=$WORK/ref_${m}_w${b}
  step "ref_${m}_w${b}" 150 $PY tools/torch_reference.py --model "$MODEL" --calib-ids "$CALIB_IDS" --nsamples "$NSAMPLES" --seqlen "$SEQLEN" \
    --method "$m" --bits "$b" --group-size "$GS" --eval-text "$WIKI" --eval-seqlen "$SEQLEN" "${MW[@]}" --export "$d" --out "$OUT/ref_${m}_w${b}.json"
  if [ -d "$d" ] || [ "$DRY_RUN" = 1 ]; then
    step "ref_${m}_w${b}_hfgptq" 60 $PY tools/hf_perplexity.py --gptq "$d" --text "$WIKI" --seqlen "$SEQLEN" "${MW[@]}" --out "$OUT/ref_${m}_w${b}_hfgptq.json"
  fi
done; done

# --- lower priority -------------------------------------------------------------------------
if [ -n "$LAYER_BENCH" ]; then
  step torch_layer_bench 200 $PY tools/torch_reference.py --bench-layer "$LAYER_BENCH" --nsamples 128 --seqlen 2048 --out "$OUT/torch_layer_bench.json"
fi
step fp_ppl_py_256 90 $PY tools/hf_perplexity.py --model "$MODEL" --text "$WIKI" --seqlen 256 "${MW[@]}" --out "$OUT/fp_ppl_py_256.json"

# --- summary -----------------------------------------------------------------------------------
if [ "$DRY_RUN" != 1 ]; then
  $PY - "$OUT" <<'PYEOF' > "$OUT/summary.log" 2>&1
import csv, glob, json, os, re, sys
out = sys.argv[1]
def load(p):
    try:
        with open(p) as f:
            return json.load(f)
    except Exception as e:  # noqa: BLE001
        return None
def rust_ppl(log):
    try:
        txt = open(log).read()
    except OSError:
        return None
    m = re.findall(r"perplexity[^0-9\n]*([0-9]+\.[0-9]+)", txt, re.I)
    return float(m[-1]) if m else None
s = {"steps": list(csv.DictReader(open(os.path.join(out, "steps.tsv")), delimiter="\t"))}
for sl in (512, 256):
    r = load(os.path.join(out, f"fp_ppl_py_{sl}.json"))
    s[f"fp_ppl_py_{sl}"] = r and r.get("perplexity")
s["fp_ppl_rust_512"] = rust_ppl(os.path.join(out, "fp_ppl_rust.log"))
rows = []
for p in sorted(glob.glob(os.path.join(out, "ref_*_w*.json"))):
    name = os.path.basename(p)[:-5]
    if name.endswith("_hfgptq"):
        continue
    _, m, b = name.split("_")
    ref = load(p) or {}
    q = ref.get("quality", {})
    row = {"method": m, "bits": int(b[1:]),
           "ref_ppl": q.get("perplexity"),
           "ref_export_hf_ppl": (load(os.path.join(out, f"{name}_hfgptq.json")) or {}).get("perplexity"),
           "ref_quantize_secs": q.get("quantize_secs"),
           "rust_eval_ppl": rust_ppl(os.path.join(out, f"rust_{m}_{b}_eval.log")),
           "rust_export_hf_ppl": (load(os.path.join(out, f"rust_{m}_{b}_hfgptq.json")) or {}).get("perplexity"),
           "rust_report_secs": (load(os.path.join(out, f"rust_{m}_{b}.json")) or {}).get("secs")}
    rows.append(row)
s["quality"] = rows
b = load(os.path.join(out, "torch_bench.json"))
if b and "bench" in b:
    s["bench"] = [{"shape": f"{r['r']}x{r['n']}", "gptq_s": r["gptq_solve"]["median_s"], "gptaq_s": r["gptaq_solve"]["median_s"],
                   "ratio": r["gptaq_over_gptq"], "p_build_s": r["p_build"]["median_s"]} for r in b["bench"]["shapes"]]
    s["accumulation"] = [{"n": r["n"], "tokens": r["tokens"], "h_s": r["h_only"]["median_s"], "hd_s": r["h_and_d"]["median_s"],
                          "h_tflops": r["h_tflops"]} for r in b["bench"]["accumulation"]]
lb = load(os.path.join(out, "torch_layer_bench.json"))
if lb and "bench_layer" in lb:
    s["layer_bench"] = lb["bench_layer"]
json.dump(s, open(os.path.join(out, "summary.json"), "w"), indent=1)
print(json.dumps({k: v for k, v in s.items() if k != "steps"}, indent=1))
PYEOF
  cat "$OUT/summary.log"
fi
echo "total $(( $(date +%s) - START ))s; results in $OUT"
rm -rf "$WORK"
