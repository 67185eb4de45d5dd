#!/usr/bin/env python3
"""Independent check of a GPTQ checkpoint directory (checkpoint_format "gptq", v1).

Written from the format description only (algorithm.md §3), sharing no code with gptaq-studio:

* unpacks every `<prefix>.qweight` / `.qzeros` / `.scales` / `.g_idx` with numpy as a little-endian
  bit stream (b = 2, 3, 4, 8; 3-bit values straddle words), dequantizes
  W[o, i] = scales[g, o] * (q[i, o] - (z[g, o] + 1)),  g = g_idx[i]
  (`--no-wrap` decodes z + 1 like ExLlama/vLLM gptq_gemm; default wraps z + 1 to b bits like
  gptaq-studio, which only differs for asymmetric zero points of 0), and checks shapes;
* `--expect FILE.safetensors`: compares each dequantized weight with `<prefix>.weight` in FILE
  (e.g. the solver's fake-quantized Q) and reports max |diff|;
* `--text FILE`: perplexity of the dequantized model with transformers (a plain float model is built
  from config.json with the dequantized weights, so neither gptqmodel nor optimum is needed);
* `--hf`: additionally try transformers' own GPTQ loading path (needs gptqmodel/optimum; reported
  and skipped when missing) and compare its perplexity.

Runs offline. Usage:
  python tools/gptq_dequant_check.py OUT_DIR [--expect q.safetensors] [--text wiki.txt] [--hf]
"""

import argparse
import json
import math
import os
import sys

import numpy as np


def load_tensors(d):
    from safetensors.numpy import load_file

    idx = os.path.join(d, "model.safetensors.index.json")
    files = (
        sorted(set(json.load(open(idx))["weight_map"].values()))
        if os.path.exists(idx)
        else ["model.safetensors"]
    )
    out = {}
    for f in files:
        out.update(load_file(os.path.join(d, f)))
    return out


def unpack(words, bits, n):
    """n values from a 1-D array of int32 words read as an LSB-first bit stream."""
    w = words.astype(np.int64) & 0xFFFFFFFF
    k = np.arange(n, dtype=np.int64)
    off = k * bits
    wi, sh = off // 32, off % 32
    lo = w[..., wi] >> sh
    nxt = np.minimum(wi + 1, w.shape[-1] - 1)
    hi = np.where(sh + bits > 32, w[..., nxt] << (32 - sh), 0)
    return ((lo | hi) & ((1 << bits) - 1)).astype(np.int64)


def quant_config(d):
    cfg = json.load(open(os.path.join(d, "config.json")))
    q = cfg.get("quantization_config")
    if q is None:
        q = json.load(open(os.path.join(d, "quantize_config.json")))
    fmt = q.get("checkpoint_format", q.get("format", "gptq"))
    if fmt != "gptq":
        sys.exit(f"checkpoint_format {fmt!r}: only 'gptq' (v1) is handled here")
    return cfg, q


def dequantize_all(d, wrap=True):
    cfg, q = quant_config(d)
    bits, gs = q["bits"], q["group_size"]
    t = load_tensors(d)
    maxq = (1 << bits) - 1
    out = {}
    for name in sorted(t):
        if not name.endswith(".qweight"):
            continue
        p = name[: -len(".qweight")]
        qw, qz, sc, gi = t[p + ".qweight"], t[p + ".qzeros"], t[p + ".scales"], t[p + ".g_idx"]
        n_in, r = qw.shape[0] * 32 // bits, qw.shape[1]
        groups = 1 if gs == -1 else -(-n_in // gs)
        assert qw.dtype == np.int32 and qz.dtype == np.int32 and gi.dtype == np.int32, p
        assert qz.shape == (groups, r * bits // 32), (p, qz.shape)
        assert sc.shape == (groups, r), (p, sc.shape)
        assert gi.shape == (n_in,) and gi.min() >= 0 and gi.max() < groups, p
        codes = unpack(qw.T, bits, n_in)  # [r, n_in]
        z = unpack(qz, bits, r) + 1  # [G, r]
        if wrap:
            z &= maxq
        s = sc.astype(np.float32)
        g = gi.astype(np.int64)
        w = s[g, :].T * (codes - z[g, :].T).astype(np.float32)  # [r, n_in]
        out[p] = w
    return cfg, q, t, out


def perplexity(model, ids, seqlen, torch):
    nll, count = 0.0, 0
    for s in range(0, ids.numel() // seqlen):
        x = ids[s * seqlen : (s + 1) * seqlen].unsqueeze(0).to(model.device)
        with torch.no_grad():
            logits = model(x).logits.float()
        lp = torch.log_softmax(logits[0, :-1], -1)
        nll -= lp.gather(1, x[0, 1:].unsqueeze(1)).sum().item()
        count += seqlen - 1
    return math.exp(nll / max(count, 1))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("dir")
    ap.add_argument("--expect", help="safetensors with <prefix>.weight = expected dequantized weights")
    ap.add_argument("--text", help="text file for perplexity (needs torch + transformers + tokenizer files)")
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--hf", action="store_true", help="also load through transformers' GPTQ path")
    ap.add_argument("--no-wrap", action="store_true", help="decode zeros as field+1 without wrapping")
    a = ap.parse_args()

    cfg, q, tensors, deq = dequantize_all(a.dir, wrap=not a.no_wrap)
    print(f"{len(deq)} quantized linears, bits {q['bits']} group_size {q['group_size']} desc_act {q.get('desc_act')} sym {q.get('sym')}")
    bad = 0
    if a.expect:
        from safetensors.numpy import load_file

        exp = load_file(a.expect)
        worst = 0.0
        for p, w in deq.items():
            e = exp.get(p + ".weight")
            if e is None:
                print(f"  {p}: not in --expect")
                bad += 1
                continue
            d = float(np.max(np.abs(w - e.astype(np.float32))))
            worst = max(worst, d)
            if d != 0.0:
                bad += 1
                print(f"  {p}: max |diff| {d:.3e}")
        print(f"expect: {len(deq) - bad}/{len(deq)} linears bit-exact, worst |diff| {worst:.3e}")

    if a.text:
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        tok = AutoTokenizer.from_pretrained(a.dir)
        ids = tok(open(a.text).read(), return_tensors="pt").input_ids[0]
        dev = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = torch.float16 if dev == "cuda" else torch.float32
        conf = AutoConfig.from_pretrained(a.dir)
        if hasattr(conf, "quantization_config"):
            del conf.quantization_config
        model = AutoModelForCausalLM.from_config(conf, torch_dtype=dtype)
        sd = {k: torch.from_numpy(v.astype(np.float32)) for k, v in tensors.items()
              if not k.endswith((".qweight", ".qzeros", ".scales", ".g_idx"))}
        sd.update({p + ".weight": torch.from_numpy(w) for p, w in deq.items()})
        missing, unexpected = model.load_state_dict(sd, strict=False)
        missing = [m for m in missing if not (m == "lm_head.weight" and conf.tie_word_embeddings)]
        if missing or unexpected:
            print(f"state dict: missing {missing[:5]} unexpected {unexpected[:5]}")
        if conf.tie_word_embeddings:
            model.tie_weights()
        model = model.to(dev).eval()
        print(f"perplexity (independent dequant, {dev} {dtype}): {perplexity(model, ids, a.seqlen, torch):.4f}")
        if a.hf:
            try:
                hf = AutoModelForCausalLM.from_pretrained(a.dir, device_map=dev).eval()
                print(f"perplexity (transformers GPTQ path): {perplexity(hf, ids, a.seqlen, torch):.4f}")
            except Exception as e:  # noqa: BLE001 - report whatever the optional stack raises
                print(f"transformers GPTQ path unavailable: {type(e).__name__}: {e}")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
