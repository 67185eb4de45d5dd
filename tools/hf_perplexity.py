#!/usr/bin/env python3
"""Perplexity of a Hugging Face Llama checkpoint (FP or GPTQ) with PyTorch + transformers.

What it measures: WikiText-2-style perplexity by the GPTQ-paper protocol — the whole text file is
tokenized once with the model's ``tokenizer.json`` *without* BOS (Hugging Face ``tokenizers``,
``add_special_tokens=False``), cut into non-overlapping windows of ``--seqlen`` tokens (tail
dropped), each window run through the model independently; per window the mean next-token NLL over
its ``seqlen-1`` predictions; perplexity = ``exp(mean over windows)``, which is GPTQ's
``exp(sum(nll_i * seqlen) / (n * seqlen))``. fp32 everywhere, TF32 off, batch 1 unless
``--batch``. Reference (data/README, reference.json): tiny-llama-15m FP = 118.82 at 512, 102.78 at
256.

Modes:

* ``--model DIR``: FP checkpoint loaded with ``AutoModelForCausalLM.from_pretrained`` (fp32).
* ``--gptq DIR``: a GPTQ checkpoint (algorithm.md §3) loaded WITHOUT gptqmodel/optimum: every
  ``<prefix>.qweight/qzeros/scales/g_idx`` quadruple is unpacked and dequantized here
  (``W[o,i] = scales[g,o] * (q[i,o] - z[g,o])``, ``g = g_idx[i]``, ``z = zstore + 1`` for
  ``checkpoint_format "gptq"`` (v1), ``z = zstore`` for ``"gptq_v2"``; codes packed LSB-first as a
  continuous little-endian bit stream, which is exactly the 2/4/8-bit layout and the irregular
  3-bit 3-words-per-32-values layout), written into a plain ``LlamaForCausalLM`` built from the
  config (``quantization_config`` removed) and evaluated in fp32. With ``--native`` it also tries a
  native transformers load (needs gptqmodel or optimum+auto_gptq; availability is reported) and
  compares.

Output: a JSON object (perplexity, windows, tokens, timings, package availability) to ``--out``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import numpy as np

# ----------------------------------------------------------------------------------------------
# GPTQ packing / unpacking (pure numpy so the unit tests need no GPU)
# ----------------------------------------------------------------------------------------------


def pack_bits(values: np.ndarray, bits: int) -> np.ndarray:
    """Packs non-negative codes along axis 0 (length a multiple of 32) into int32 words along axis 0.

    Bit stream layout: value k of a run of 32 occupies bits ``[b*k, b*k+b)`` of the concatenation
    of ``b`` consecutive 32-bit words, LSB first. For b in {2,4,8} this is
    ``word = sum(v[j] << (b*j))``; for b = 3 it is the 3-word layout of algorithm.md §3.2.
    Shape ``[m, ...] -> [m*b/32, ...]``.
    """
    v = np.asarray(values).astype(np.uint64)
    m = v.shape[0]
    if np.any(v >> np.uint64(bits)):
        raise ValueError(f"pack_bits: value out of range for {bits} bits")
    rest = v.shape[1:]
    if 32 % bits == 0:  # 2/4/8 bits: whole values per word, only m % (32/b) == 0 needed
        pf = 32 // bits
        if m % pf:
            raise ValueError(f"pack_bits: length {m} is not a multiple of {pf}")
        v = v.reshape((m // pf, pf) + rest)
        words = np.zeros((m // pf,) + rest, dtype=np.uint64)
        for j in range(pf):
            words |= v[:, j] << np.uint64(bits * j)
        return words.astype(np.uint32).view(np.int32)
    if m % 32:
        raise ValueError(f"pack_bits: length {m} is not a multiple of 32")
    v = v.reshape((m // 32, 32) + rest)
    words = np.zeros((m // 32, bits) + rest, dtype=np.uint64)
    for k in range(32):
        off = bits * k
        w, s = divmod(off, 32)
        words[:, w] |= (v[:, k] << np.uint64(s)) & np.uint64(0xFFFFFFFF)
        if s + bits > 32:  # straddles into the next word
            words[:, w + 1] |= v[:, k] >> np.uint64(32 - s)
    return words.reshape((m // 32 * bits,) + rest).astype(np.uint32).view(np.int32)


def unpack_bits(words: np.ndarray, bits: int) -> np.ndarray:
    """Inverse of :func:`pack_bits`: int32 words ``[m*b/32, ...]`` -> int64 codes ``[m, ...]``."""
    w = np.asarray(words).astype(np.int64) & 0xFFFFFFFF
    nw = w.shape[0]
    mask = (1 << bits) - 1
    if 32 % bits == 0:
        pf = 32 // bits
        out = np.stack([(w >> (bits * j)) & mask for j in range(pf)], axis=1)
        return out.reshape((nw * pf,) + w.shape[1:])
    if nw % bits:
        raise ValueError(f"unpack_bits: {nw} words is not a multiple of bits={bits}")
    rest = w.shape[1:]
    w = w.reshape((nw // bits, bits) + rest)
    out = np.zeros((nw // bits, 32) + rest, dtype=np.int64)
    for k in range(32):
        off = bits * k
        i, s = divmod(off, 32)
        val = w[:, i] >> s
        if s + bits > 32:
            val = val | (w[:, i + 1] << (32 - s))
        out[:, k] = val & mask
    return out.reshape((nw // bits * 32,) + rest)


def dequantize_gptq(qweight, qzeros, scales, g_idx, bits: int, fmt: str = "gptq") -> np.ndarray:
    """Dense fp32 weight ``[r, n]`` from GPTQ tensors (numpy arrays; see the module docstring).

    ``fmt``: "gptq" (v1, stored zero = zero - 1) or "gptq_v2". The v1 ``+1`` is applied without
    wrap-around (as AutoGPTQ's torch path does), so a wrapped asym zero (stored maxq for a true 0)
    decodes as maxq+1.
    """
    q = unpack_bits(qweight, bits)  # [n, r]
    z = unpack_bits(np.asarray(qzeros).T, bits).T  # qzeros [G, r*b/32] packed along the output dim
    if fmt in ("gptq", "v1"):
        z = z + 1
    elif fmt not in ("gptq_v2", "v2"):
        raise ValueError(f"unknown checkpoint_format {fmt!r}")
    s = np.asarray(scales).astype(np.float32)  # [G, r]
    g = np.asarray(g_idx).astype(np.int64)  # [n]
    n, r = q.shape
    if s.shape[1] != r or z.shape[1] != r or g.shape[0] != n:
        raise ValueError(f"shape mismatch: codes {q.shape}, scales {s.shape}, zeros {z.shape}, g_idx {g.shape}")
    w = s[g] * (q - z[g]).astype(np.float32)  # [n, r]
    return np.ascontiguousarray(w.T)


def pack_gptq(codes_rn: np.ndarray, zeros_gr: np.ndarray, scales_gr: np.ndarray, g_idx: np.ndarray, bits: int,
              fmt: str = "gptq") -> dict:
    """GPTQ tensors from integer codes ``[r, n]``, zeros ``[G, r]`` (true zero points), scales ``[G, r]``."""
    zs = np.asarray(zeros_gr).astype(np.int64)
    if fmt in ("gptq", "v1"):
        zs = zs - 1
        if np.any(zs < 0):
            raise ValueError("v1 format cannot store zero point 0 (asym); use gptq_v2")
    return {
        "qweight": pack_bits(np.asarray(codes_rn).T, bits),
        "qzeros": np.ascontiguousarray(pack_bits(zs.T, bits).T),
        "scales": np.asarray(scales_gr).astype(np.float16),
        "g_idx": np.asarray(g_idx).astype(np.int32),
    }


# ----------------------------------------------------------------------------------------------
# evaluation
# ----------------------------------------------------------------------------------------------


def setup_torch(seed: int = 0, threads: int = 0):
    import torch

    torch.manual_seed(seed)
    if threads > 0:
        torch.set_num_threads(threads)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        torch.set_float32_matmul_precision("highest")
    except Exception:
        pass
    return torch


def pick_device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def tokenize_text(tokenizer_path: str, text_path: str) -> list[int]:
    from tokenizers import Tokenizer

    if os.path.isdir(tokenizer_path):
        tokenizer_path = os.path.join(tokenizer_path, "tokenizer.json")
    tok = Tokenizer.from_file(tokenizer_path)
    with open(text_path, "r", encoding="utf-8") as f:
        text = f.read()
    return tok.encode(text, add_special_tokens=False).ids


def perplexity(model, ids: list[int], seqlen: int, device, max_windows: int | None = None, batch: int = 1) -> dict:
    """GPTQ protocol perplexity of ``model`` on the token list ``ids``."""
    import torch

    total = len(ids) // seqlen
    n = total if max_windows is None else min(total, max_windows)
    t = torch.tensor(ids[: total * seqlen], dtype=torch.long).view(total, seqlen)[:n]
    nlls = []
    t0 = time.time()
    model.eval()
    with torch.no_grad():
        for i in range(0, n, batch):
            x = t[i : i + batch].to(device)
            logits = model(input_ids=x, use_cache=False).logits.float()
            lp = torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="none"
            ).view(x.shape[0], -1)
            nlls.append(lp.mean(dim=1).double().cpu())
    if device.type == "cuda":
        torch.cuda.synchronize()
    nll = torch.cat(nlls)
    return {
        "perplexity": float(math.exp(nll.mean().item())),
        "mean_nll": float(nll.mean().item()),
        "windows": n,
        "total_windows": total,
        "seqlen": seqlen,
        "tokens": len(ids),
        "dropped_tokens": len(ids) - total * seqlen,
        "eval_secs": time.time() - t0,
    }


def load_fp_model(model_dir: str, device):
    import torch
    from transformers import AutoModelForCausalLM

    try:
        m = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    except TypeError:
        m = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32)
    return m.to(device).eval()


def read_safetensors_dir(d: str) -> dict:
    """All tensors of all ``*.safetensors`` in ``d`` as numpy (floating point -> fp32, bf16 included)."""
    import torch
    from safetensors.torch import load_file

    files = sorted(f for f in os.listdir(d) if f.endswith(".safetensors"))
    if not files:
        raise SystemExit(f"{d}: no .safetensors files")
    out = {}
    for f in files:
        for k, v in load_file(os.path.join(d, f)).items():
            if k in out:
                raise SystemExit(f"{d}: tensor {k} appears in more than one shard")
            if v.is_floating_point() and k.endswith(".scales"):
                out[k] = v.to(torch.float16).numpy()
            elif v.is_floating_point():
                out[k] = v.to(torch.float32).numpy()
            else:
                out[k] = v.numpy()
    return out


def gptq_state_dict(d: str) -> tuple[dict, dict, dict]:
    """Dense fp32 state dict (numpy) from a GPTQ directory; returns (state, config, qcfg)."""
    with open(os.path.join(d, "config.json")) as f:
        cfg = json.load(f)
    qcfg = cfg.get("quantization_config")
    if qcfg is None and os.path.exists(os.path.join(d, "quantize_config.json")):
        with open(os.path.join(d, "quantize_config.json")) as f:
            qcfg = json.load(f)
    if qcfg is None:
        raise SystemExit(f"{d}: no quantization_config in config.json and no quantize_config.json")
    bits = int(qcfg["bits"])
    fmt = qcfg.get("checkpoint_format") or qcfg.get("format") or "gptq"
    tensors = read_safetensors_dir(d)
    state = {}
    prefixes = sorted(k[: -len(".qweight")] for k in tensors if k.endswith(".qweight"))
    for p in prefixes:
        missing = [s for s in ("qzeros", "scales", "g_idx") if f"{p}.{s}" not in tensors]
        if missing:
            raise SystemExit(f"{d}: {p} has qweight but no {missing}")
        w = dequantize_gptq(tensors[f"{p}.qweight"], tensors[f"{p}.qzeros"], tensors[f"{p}.scales"],
                            tensors[f"{p}.g_idx"], bits, fmt)
        state[f"{p}.weight"] = w
    for k, v in tensors.items():
        if any(k == f"{p}.{s}" for p in prefixes for s in ("qweight", "qzeros", "scales", "g_idx")):
            continue
        state[k] = np.asarray(v, dtype=np.float32) if np.asarray(v).dtype.kind == "f" else np.asarray(v)
    return state, cfg, {"bits": bits, "format": fmt, "group_size": qcfg.get("group_size"),
                        "desc_act": qcfg.get("desc_act"), "sym": qcfg.get("sym"), "quantized_modules": len(prefixes)}


def load_gptq_dequantized(d: str, device):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    state, cfg, info = gptq_state_dict(d)
    cfg = dict(cfg)
    cfg.pop("quantization_config", None)
    model_type = cfg.pop("model_type", "llama")
    config = AutoConfig.for_model(model_type, **cfg)
    try:
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    except TypeError:
        model = AutoModelForCausalLM.from_config(config, torch_dtype=torch.float32)
    sd = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state.items()}
    res = model.load_state_dict(sd, strict=False)
    missing = [k for k in res.missing_keys if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if "lm_head.weight" not in sd and "model.embed_tokens.weight" in sd and config.tie_word_embeddings:
        model.tie_weights()
    if "model.embed_tokens.weight" not in sd and "lm_head.weight" in sd:
        model.model.embed_tokens.weight.data.copy_(sd["lm_head.weight"])
        missing = [k for k in missing if k != "model.embed_tokens.weight"]
    if missing or res.unexpected_keys:
        raise SystemExit(f"{d}: state dict mismatch: missing {missing}, unexpected {res.unexpected_keys}")
    return model.to(device).eval(), info


def native_availability() -> dict:
    out = {}
    for mod in ("gptqmodel", "optimum", "auto_gptq"):
        try:
            m = __import__(mod)
            out[mod] = getattr(m, "__version__", "present")
        except Exception as e:  # noqa: BLE001
            out[mod] = f"unavailable: {type(e).__name__}: {e}"[:200]
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="FP Hugging Face model directory")
    src.add_argument("--gptq", help="GPTQ checkpoint directory (dequantized here, no GPTQ kernels needed)")
    ap.add_argument("--text", required=True, help="evaluation text, e.g. wikitext-2-raw-v1/wiki.test.raw")
    ap.add_argument("--tokenizer", default=None, help="tokenizer.json or dir (default: the model dir)")
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--max-windows", type=int, default=None)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:0 ...")
    ap.add_argument("--native", action="store_true", help="also try transformers' native GPTQ load (needs gptqmodel)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0,
                    help="CPU threads for torch (0 = torch default; 1 is much faster on a busy CPU)")
    ap.add_argument("--out", default=None, help="write the JSON result here")
    args = ap.parse_args(argv)

    torch = setup_torch(args.seed, args.threads)
    device = pick_device(args.device)
    src_dir = args.model or args.gptq
    tok_path = args.tokenizer or src_dir
    t0 = time.time()
    ids = tokenize_text(tok_path, args.text)
    result = {"tool": "hf_perplexity", "text": os.path.abspath(args.text), "device": str(device),
              "torch": torch.__version__, "tokenize_secs": time.time() - t0}
    try:
        import transformers

        result["transformers"] = transformers.__version__
    except Exception:  # noqa: BLE001
        pass
    t0 = time.time()
    if args.model:
        model = load_fp_model(args.model, device)
        result.update({"mode": "fp", "model": os.path.abspath(args.model)})
    else:
        model, info = load_gptq_dequantized(args.gptq, device)
        result.update({"mode": "gptq-dequantized", "model": os.path.abspath(args.gptq), "gptq": info})
    result["load_secs"] = time.time() - t0
    result.update(perplexity(model, ids, args.seqlen, device, args.max_windows, args.batch))
    del model
    if args.gptq:
        result["native_packages"] = native_availability()
        if args.native:
            try:
                from transformers import AutoModelForCausalLM

                nm = AutoModelForCausalLM.from_pretrained(args.gptq).to(device).eval()
                r = perplexity(nm, ids, args.seqlen, device, args.max_windows, args.batch)
                result["native"] = r
                result["native_minus_dequantized_ppl"] = r["perplexity"] - result["perplexity"]
            except Exception as e:  # noqa: BLE001
                result["native"] = {"error": f"{type(e).__name__}: {e}"[:2000]}
    js = json.dumps(result, indent=1)
    print(js)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            f.write(js)
    return 0


if __name__ == "__main__":
    sys.exit(main())
