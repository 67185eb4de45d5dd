#!/usr/bin/env python3
"""PyTorch fp32 reference of GPTQ (IST-DASLab ``fasterquant``) and GPTAQ (official repo), with a
timing benchmark and a layer-wise quality driver for Hugging Face Llama checkpoints.

Everything follows ../shared/reference/algorithm.md: §1.1 Hessian accumulation
(``H = 2/N · Σ x xᵀ``, N counted in sequences, running rescale), §1.2 ``fasterquant`` step by step
(dead columns, static groups, act-order, relative damping, ``U = chol(chol_inverse(chol(H)))ᵀ``,
blocked sweep with rank-1 in-block updates and the lazy cross-block GEMM, group parameters read from
``W`` at the group start — the stale-W quirk for gs < B is kept), §1.3 quantizer (min/max incl. 0,
sym zero 2^(b−1), optional MSE grid, round-half-to-even via ``torch.round``), §2.1 ``D = 2/N ·
Σ (x_fp − x_q) x_qᵀ``, §2.2 ``P = α·triu₁(D Uᵀ) U`` with the in-block term using the
pre-quantization ``w`` and the cross-block term the block's final values ``W1`` (α = 0.25).
fp32 throughout, TF32 OFF (``allow_tf32 = False`` as in the reference).

Deliberate, documented choices (same as the Rust app, issue 5):
* GPTAQ uses the GPTQ quantizer (exportable, like GPTQModel's GPTAQ), not QuaRot's signed grid.
* Modules sharing an input (q/k/v, up/gate) share the accumulated H (and D) — bit-identical to
  per-module accumulation — but each module factorises its own copy, so damping never compounds
  (the official GPTAQ repo's in-place shared H compounds it; ``--compound-damping`` reproduces that).

Modes
-----
``--bench 4096x4096,4096x14336`` (shapes r×n): random ``W ~ N(0, 0.02²)``; calibration features
``X = Z·diag(s)`` with ``Z ~ N(0,1)`` and per-feature scales ``s = exp(0.5·N(0,1))`` (heavy-ish
spread like real activations), ``T = max(2n, 8192)`` tokens, ``H = 2/N·XᵀX`` with N = T/2048
"sequences"; for GPTAQ ``X_fp = X + 0.1·N(0,1)`` gives D. Timed (``cuda.synchronize``, ``--warmup``
runs, median of ``--repeat``): full GPTQ solve (``fasterquant`` incl. factorisation), full GPTAQ
solve, the P build alone, the factorisation alone; and statistics accumulation for ``--tokens``
tokens fed in chunks of ``--chunk-tokens`` through ``add_batch`` (H only vs H + D) for each distinct
n. W4 sym g128 B128 by default (``--bits --group-size``).

``--model DIR --calib-ids FILE | --calib FILE`` quality oracle: the layer-wise driver of §1.4
(GPTQ, true-sequential groups [k,v,q] [o] [up,gate] [down], one sequence per forward, quantized
stream) / §2.3 (GPTAQ: FP stream in lock-step, FP inputs of every linear cached per layer) / RTN,
then WikiText-2 perplexity by the GPTQ protocol (see hf_perplexity.py) of the fake-quantized model.
``--export DIR`` also writes the result as a GPTQ v1 checkpoint (integer codes from the sweep,
fp16 scales) so ``hf_perplexity.py --gptq DIR`` can be checked against it. All output as JSON.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)


# ----------------------------------------------------------------------------------------------
# quantizer (IST quant.py, per-channel weights)
# ----------------------------------------------------------------------------------------------


def quantize_codes(x, scale, zero, maxq):
    return torch.clamp(torch.round(x / scale) + zero, 0, maxq)


def quantize(x, scale, zero, maxq):
    q = quantize_codes(x, scale, zero, maxq)
    return scale * (q - zero)


class Quantizer:
    """Per-row scale/zero as in IST ``quant.py`` (``find_params`` on a block of columns)."""

    def __init__(self, bits: int, sym: bool = True, mse: bool = False, norm: float = 2.4, grid: int = 100,
                 maxshrink: float = 0.8):
        self.bits, self.sym, self.mse = bits, sym, mse
        self.norm, self.grid, self.maxshrink = norm, grid, maxshrink
        self.maxq = torch.tensor(2**bits - 1)
        self.scale = None
        self.zero = None

    def ready(self) -> bool:
        return self.scale is not None

    def find_params(self, x):
        maxq = self.maxq.to(x.device)
        tmp = torch.zeros(x.shape[0], device=x.device, dtype=x.dtype)
        xmin = torch.minimum(x.min(1).values, tmp)
        xmax = torch.maximum(x.max(1).values, tmp)
        if self.sym:
            xmax = torch.maximum(torch.abs(xmin), xmax)
            neg = xmin < 0
            if torch.any(neg):
                xmin[neg] = -xmax[neg]
        deg = (xmin == 0) & (xmax == 0)
        xmin[deg] = -1
        xmax[deg] = +1
        scale = (xmax - xmin) / maxq
        if self.sym:
            zero = torch.full_like(scale, (maxq.item() + 1) / 2)
        else:
            zero = torch.round(-xmin / scale)
        if self.mse:
            best = torch.full([x.shape[0]], float("inf"), device=x.device, dtype=x.dtype)
            for i in range(int(self.maxshrink * self.grid)):
                p = 1 - i / self.grid
                xmin1, xmax1 = p * xmin, p * xmax
                scale1 = (xmax1 - xmin1) / maxq
                zero1 = torch.round(-xmin1 / scale1) if not self.sym else zero
                q = quantize(x, scale1.unsqueeze(1), zero1.unsqueeze(1), maxq)
                err = (q - x).abs_().pow_(self.norm).sum(1)
                better = err < best
                if torch.any(better):
                    best[better] = err[better]
                    scale[better] = scale1[better]
                    zero[better] = zero1[better]
        self.scale = scale.unsqueeze(1)
        self.zero = zero.unsqueeze(1)

    def params(self):
        return self.scale.clone(), self.zero.clone()

    def set_params(self, scale, zero):
        self.scale, self.zero = scale, zero


# ----------------------------------------------------------------------------------------------
# statistics (§1.1, §2.1)
# ----------------------------------------------------------------------------------------------


class Stats:
    """Running H (and D) exactly as ``add_batch``; ``nsamples`` counts sequences."""

    def __init__(self, n: int, device, with_d: bool):
        self.H = torch.zeros((n, n), device=device, dtype=torch.float32)
        self.D = torch.zeros((n, n), device=device, dtype=torch.float32) if with_d else None
        self.nsamples = 0

    def add_batch(self, inp, inp_fp=None, nseq: int | None = None):
        """inp: [batch, seq, n] or [tokens, n] (then one sequence unless ``nseq``)."""
        if inp.dim() == 2:
            b = 1 if nseq is None else nseq
            inp = inp.unsqueeze(0)
            if inp_fp is not None:
                inp_fp = inp_fp.unsqueeze(0)
        else:
            b = inp.shape[0]
        x = inp.reshape(-1, inp.shape[-1]).t().float()
        self.H *= self.nsamples / (self.nsamples + b)
        if self.D is not None:
            self.D *= self.nsamples / (self.nsamples + b)
        self.nsamples += b
        x = math.sqrt(2 / self.nsamples) * x
        self.H += x.matmul(x.t())
        if self.D is not None:
            xf = inp_fp.reshape(-1, inp_fp.shape[-1]).t().float()
            dx = math.sqrt(2 / self.nsamples) * xf - x
            self.D += dx.matmul(x.t())


# ----------------------------------------------------------------------------------------------
# fasterquant (§1.2) with the GPTAQ terms (§2.2)
# ----------------------------------------------------------------------------------------------


def inverse_factor(H):
    """U upper with H⁻¹ = UᵀU, the reference's three factorisations."""
    L = torch.linalg.cholesky(H)
    Hinv = torch.cholesky_inverse(L)
    return torch.linalg.cholesky(Hinv, upper=True)


def build_p(D, U, alpha: float):
    return alpha * (D.matmul(U.t())).triu(diagonal=1).matmul(U)


def fasterquant(W, H, *, bits: int = 4, group_size: int = -1, sym: bool = True, actorder: bool = False,
                static_groups: bool = False, blocksize: int = 128, percdamp: float = 0.01, mse: bool = False,
                D=None, alpha: float = 0.25, inplace_h: bool = False, timings: dict | None = None):
    """Returns dict(Q [r,n] fake-quantized (original column order), codes, scales [G,r], zeros [G,r],
    g_idx [n], losses [r,n], proxy_loss = Σ losses). ``D`` given ⇒ GPTAQ with ``alpha``.

    ``H`` is cloned unless ``inplace_h`` (then it is modified as the reference does: dead diag = 1,
    damping added — only without act-order, since act-order permutes into a new tensor).
    """
    dev = W.device
    # fp32 like the reference; float64 inputs (the unit tests) stay float64
    W = W.clone().to(torch.float64 if H.dtype == torch.float64 else torch.float32)
    if not inplace_h:
        H = H.clone()
    if D is not None:
        D = D.clone()
    r, n = W.shape
    gs = group_size if group_size != -1 else n
    quantizer = Quantizer(bits, sym, mse)
    maxq = quantizer.maxq.to(dev)
    if not quantizer.ready():
        quantizer.find_params(W)

    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    if D is not None:
        D[:, dead] = 0

    groups = None
    if static_groups and group_size != -1:
        groups = []
        for i in range(0, n, group_size):
            qz = Quantizer(bits, sym, mse)
            qz.find_params(W[:, i : i + group_size])
            groups.append(qz.params())

    perm = invperm = None
    if actorder:
        perm = torch.argsort(torch.diag(H), descending=True)
        W = W[:, perm]
        H = H[perm][:, perm]
        if D is not None:
            D = D[perm][:, perm]
        invperm = torch.argsort(perm)

    Losses = torch.zeros_like(W)
    Q = torch.zeros_like(W)
    codes = torch.zeros_like(W)

    damp = percdamp * torch.mean(torch.diag(H))
    diag = torch.arange(n, device=dev)
    H[diag, diag] += damp
    t0 = _now(dev)
    U = inverse_factor(H)
    if timings is not None:
        timings["factor_secs"] = _now(dev) - t0
    P = None
    if D is not None:
        t0 = _now(dev)
        P = build_p(D, U, alpha)
        del D
        if timings is not None:
            timings["p_secs"] = _now(dev) - t0

    # scales/zeros per processing-order group (dynamic) or per original group (static)
    n_groups = (n + gs - 1) // gs
    g_scales = [None] * n_groups
    g_zeros = [None] * n_groups
    if group_size == -1:
        g_scales[0], g_zeros[0] = quantizer.params()

    for i1 in range(0, n, blocksize):
        i2 = min(i1 + blocksize, n)
        count = i2 - i1
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        C1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Losses1 = torch.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        P1 = P[i1:i2, i1:i2] if P is not None else None
        for i in range(count):
            w = W1[:, i]
            d = U1[i, i]
            if group_size != -1:
                if groups is None:
                    if (i1 + i) % group_size == 0:
                        quantizer.find_params(W[:, (i1 + i) : (i1 + i + group_size)])
                        g_scales[(i1 + i) // group_size], g_zeros[(i1 + i) // group_size] = quantizer.params()
                else:
                    idx = i1 + i
                    if actorder:
                        idx = int(perm[idx])
                    quantizer.set_params(*groups[idx // group_size])
            c = quantize_codes(w.unsqueeze(1), quantizer.scale, quantizer.zero, maxq).flatten()
            q = (quantizer.scale * (c.unsqueeze(1) - quantizer.zero)).flatten()
            Q1[:, i] = q
            C1[:, i] = c
            Losses1[:, i] = (w - q) ** 2 / d**2
            err1 = (w - q) / d
            if P1 is None:
                W1[:, i:] -= err1.unsqueeze(1).matmul(U1[i, i:].unsqueeze(0))
            else:
                W1[:, i:] -= err1.unsqueeze(1).matmul(U1[i, i:].unsqueeze(0)) - w.unsqueeze(1).matmul(
                    P1[i, i:].unsqueeze(0))
            Err1[:, i] = err1
        Q[:, i1:i2] = Q1
        codes[:, i1:i2] = C1
        Losses[:, i1:i2] = Losses1 / 2
        if P is None:
            W[:, i2:] -= Err1.matmul(U[i1:i2, i2:])
        else:
            W[:, i2:] -= Err1.matmul(U[i1:i2, i2:]) - W1.matmul(P[i1:i2, i2:])

    if groups is not None:
        scales = torch.cat([g[0] for g in groups], dim=1).t()
        zeros = torch.cat([g[1] for g in groups], dim=1).t()
        g_idx = torch.arange(n, device=dev) // group_size
    else:
        scales = torch.cat(g_scales, dim=1).t()  # [G, r]
        zeros = torch.cat(g_zeros, dim=1).t()
        g_idx = torch.arange(n, device=dev) // gs  # processing position -> group
        if actorder:
            g_idx = g_idx[invperm]
    if actorder:
        Q = Q[:, invperm]
        codes = codes[:, invperm]
        Losses = Losses[:, invperm]
    return {"Q": Q, "codes": codes.to(torch.int64), "scales": scales, "zeros": zeros.to(torch.int64),
            "g_idx": g_idx.to(torch.int64), "losses": Losses, "proxy_loss": float(Losses.sum().item())}


def rtn(W, *, bits: int = 4, group_size: int = -1, sym: bool = True, mse: bool = False):
    """Round-to-nearest with the same quantizer, per group of original columns."""
    W = W if W.dtype == torch.float64 else W.float()
    r, n = W.shape
    gs = group_size if group_size != -1 else n
    qz = Quantizer(bits, sym, mse)
    maxq = qz.maxq.to(W.device)
    Q = torch.zeros_like(W)
    codes = torch.zeros_like(W)
    scales, zeros = [], []
    for i in range(0, n, gs):
        qz.find_params(W[:, i : i + gs])
        c = quantize_codes(W[:, i : i + gs], qz.scale, qz.zero, maxq)
        codes[:, i : i + gs] = c
        Q[:, i : i + gs] = qz.scale * (c - qz.zero)
        scales.append(qz.scale.t())
        zeros.append(qz.zero.t())
    return {"Q": Q, "codes": codes.to(torch.int64), "scales": torch.cat(scales), "zeros": torch.cat(zeros).to(torch.int64),
            "g_idx": torch.arange(n, device=W.device) // gs, "losses": None, "proxy_loss": None}


def _now(dev) -> float:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    return time.perf_counter()


# ----------------------------------------------------------------------------------------------
# benchmark
# ----------------------------------------------------------------------------------------------


def _timed(fn, dev, warmup: int, repeat: int):
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(repeat):
        t0 = _now(dev)
        fn()
        ts.append(_now(dev) - t0)
    return {"median_s": statistics.median(ts), "min_s": min(ts), "all_s": ts}


def bench(args, dev) -> dict:
    shapes = []
    for s in args.bench.split(","):
        r, n = (int(v) for v in s.lower().split("x"))
        shapes.append((r, n))
    g = torch.Generator(device=dev).manual_seed(args.seed)
    out = {"shapes": [], "accumulation": [], "config": {
        "bits": args.bits, "group_size": args.group_size, "blocksize": args.blocksize, "sym": not args.asym,
        "percdamp": args.damp, "alpha": args.alpha, "warmup": args.warmup, "repeat": args.repeat,
        "tokens": args.tokens, "chunk_tokens": args.chunk_tokens, "tf32": torch.backends.cuda.matmul.allow_tf32}}
    hd_cache = {}
    for r, n in shapes:
        if n not in hd_cache:
            T = max(2 * n, 8192)
            s = torch.exp(0.5 * torch.randn(n, device=dev, generator=g))
            X = torch.randn(T, n, device=dev, generator=g) * s
            Xfp = X + 0.1 * torch.randn(T, n, device=dev, generator=g)
            st = Stats(n, dev, with_d=True)
            st.add_batch(X, Xfp, nseq=max(1, T // 2048))
            hd_cache[n] = (st.H, st.D)
            del X, Xfp
        H, D = hd_cache[n]
        W = 0.02 * torch.randn(r, n, device=dev, generator=g)
        kw = dict(bits=args.bits, group_size=args.group_size, sym=not args.asym, blocksize=args.blocksize,
                  percdamp=args.damp, actorder=args.act_order)
        tg = _timed(lambda: fasterquant(W, H, **kw), dev, args.warmup, args.repeat)
        ta = _timed(lambda: fasterquant(W, H, D=D, alpha=args.alpha, **kw), dev, args.warmup, args.repeat)
        Hd = H.clone()
        Hd.diagonal().add_(args.damp * Hd.diagonal().mean())
        tf = _timed(lambda: inverse_factor(Hd), dev, args.warmup, args.repeat)
        U = inverse_factor(Hd)
        tp = _timed(lambda: build_p(D, U, args.alpha), dev, args.warmup, args.repeat)
        row = {"r": r, "n": n, "gptq_solve": tg, "gptaq_solve": ta, "factor": tf, "p_build": tp,
               "gptaq_over_gptq": ta["median_s"] / tg["median_s"]}
        out["shapes"].append(row)
        print(f"[bench] {r}x{n}: GPTQ {tg['median_s']:.3f}s GPTAQ {ta['median_s']:.3f}s "
              f"ratio {row['gptaq_over_gptq']:.2f} factor {tf['median_s']:.3f}s P {tp['median_s']:.3f}s",
              file=sys.stderr, flush=True)
        del W
    for n in sorted({n for _, n in shapes}):
        chunk = min(args.chunk_tokens, args.tokens)
        nchunks = max(1, args.tokens // chunk)
        X = torch.randn(chunk, n, device=dev, generator=g)
        Xfp = X + 0.1 * torch.randn(chunk, n, device=dev, generator=g)
        seq_per_chunk = max(1, chunk // 2048)

        def acc(with_d):
            st = Stats(n, dev, with_d)
            for _ in range(nchunks):
                st.add_batch(X, Xfp if with_d else None, nseq=seq_per_chunk)
            return st

        th = _timed(lambda: acc(False), dev, args.warmup, args.repeat)
        thd = _timed(lambda: acc(True), dev, args.warmup, args.repeat)
        flops = 2.0 * n * n * chunk * nchunks
        row = {"n": n, "tokens": chunk * nchunks, "chunks": nchunks, "h_only": th, "h_and_d": thd,
               "hd_over_h": thd["median_s"] / th["median_s"],
               "h_tflops": flops / th["median_s"] / 1e12}
        out["accumulation"].append(row)
        print(f"[bench] accumulate n={n} T={chunk * nchunks}: H {th['median_s']:.3f}s H+D {thd['median_s']:.3f}s "
              f"({row['h_tflops']:.1f} TFLOP/s for H)", file=sys.stderr, flush=True)
        del X, Xfp
    return out


# ----------------------------------------------------------------------------------------------
# layer-wise driver on a HF Llama model (§1.4, §2.3)
# ----------------------------------------------------------------------------------------------

SEQ_GROUPS = [["self_attn.k_proj", "self_attn.v_proj", "self_attn.q_proj"], ["self_attn.o_proj"],
              ["mlp.up_proj", "mlp.gate_proj"], ["mlp.down_proj"]]


class _Catcher(torch.nn.Module):
    def __init__(self, layer, store):
        super().__init__()
        self.layer = layer
        self.store = store
        # some transformers versions read attributes (e.g. attention_type) off the layer
        for a in ("attention_type", "layer_idx"):
            if hasattr(layer, a):
                setattr(self, a, getattr(layer, a))

    def forward(self, hidden_states, *args, **kwargs):
        self.store["inps"].append(hidden_states.detach())
        if "kwargs" not in self.store:
            self.store["args"] = args
            self.store["kwargs"] = kwargs
        raise ValueError("caught")


def _layer_out(layer, x, args, kwargs):
    y = layer(x, *args, **kwargs)
    return y[0] if isinstance(y, (tuple, list)) else y


def capture_inputs(model, windows, dev):
    layers = model.model.layers
    store = {"inps": []}
    orig = layers[0]
    layers[0] = _Catcher(orig, store)
    try:
        for w in windows:
            try:
                model(input_ids=w.unsqueeze(0).to(dev), use_cache=False)
            except ValueError as e:
                if str(e) != "caught":
                    raise
    finally:
        layers[0] = orig
    return store["inps"], store["args"], store["kwargs"]


def load_calibration(args, model_dir):
    if args.calib_ids:
        from safetensors.torch import load_file

        ids = load_file(args.calib_ids)["input_ids"].to(torch.int64)
        if ids.dim() == 1:
            ids = ids.unsqueeze(0)
        if ids.shape[0] < args.nsamples or ids.shape[1] < args.seqlen:
            raise SystemExit(f"{args.calib_ids}: input_ids {list(ids.shape)} smaller than {args.nsamples}x{args.seqlen}")
        return ids[: args.nsamples, : args.seqlen], f"{args.calib_ids}: pre-tokenized, first {args.nsamples} rows"
    from make_calib_ids import load_tokenizer, sample_windows

    tok = load_tokenizer(args.tokenizer or model_dir)
    ids, info = sample_windows(tok, args.calib, args.nsamples, args.seqlen, args.seed)
    return torch.from_numpy(ids), f"{args.calib}: sampled with numpy seed {args.seed} ({info['kind']})"


def quantize_model(model, windows, args, dev, log):
    """Quantizes all decoder linears in place (weights ← fake-quantized Q). Returns per-module results."""
    method = args.method
    layers = model.model.layers
    inps, largs, lkwargs = capture_inputs(model, windows, dev)
    fp_inps = [x.clone() for x in inps] if method == "gptaq" else None
    results = []
    timing = {"forward_secs": 0.0, "stats_secs": 0.0, "solve_secs": 0.0}
    for li, layer in enumerate(layers):
        mods = dict(layer.named_modules())
        t_layer = time.time()
        if method == "rtn":
            for group in SEQ_GROUPS:
                for name in group:
                    m = mods[name]
                    t0 = _now(dev)
                    res = rtn(m.weight.data, bits=args.bits, group_size=args.group_size, sym=not args.asym, mse=args.mse)
                    m.weight.data = res["Q"].to(m.weight.dtype)
                    results.append(_module_row(li, name, m, res, _now(dev) - t0, args))
            continue
        fp_cache = None
        if method == "gptaq":
            fp_cache = {g[0]: [] for g in SEQ_GROUPS}
            hooks = [mods[g[0]].register_forward_hook(
                lambda mod, inp, out, k=g[0]: fp_cache[k].append(inp[0].detach())) for g in SEQ_GROUPS]
            t0 = _now(dev)
            with torch.no_grad():
                for j in range(len(fp_inps)):
                    fp_inps[j] = _layer_out(layer, fp_inps[j], largs, lkwargs)
            timing["forward_secs"] += _now(dev) - t0
            for h in hooks:
                h.remove()
        for group in SEQ_GROUPS:
            first = mods[group[0]]
            n = first.in_features
            st = Stats(n, dev, with_d=method == "gptaq")
            tstat = [0.0]

            def hook(mod, inp, out, st=st, key=group[0]):
                t0 = _now(dev)
                xfp = fp_cache[key].pop(0) if fp_cache is not None else None
                st.add_batch(inp[0].detach(), xfp)
                tstat[0] += _now(dev) - t0

            h = first.register_forward_hook(hook)
            t0 = _now(dev)
            with torch.no_grad():
                for j in range(len(inps)):
                    _layer_out(layer, inps[j], largs, lkwargs)
            timing["forward_secs"] += _now(dev) - t0 - tstat[0]
            timing["stats_secs"] += tstat[0]
            h.remove()
            shared_h = st.H
            for name in group:
                m = mods[name]
                t0 = _now(dev)
                res = fasterquant(m.weight.data, shared_h, D=st.D, alpha=args.alpha, bits=args.bits,
                                  group_size=args.group_size, sym=not args.asym, actorder=args.act_order,
                                  static_groups=args.static_groups, blocksize=args.blocksize,
                                  percdamp=args.damp, mse=args.mse, inplace_h=args.compound_damping)
                dt = _now(dev) - t0
                timing["solve_secs"] += dt
                res["nsamples"] = st.nsamples
                m.weight.data = res["Q"].to(m.weight.dtype)
                results.append(_module_row(li, name, m, res, dt, args))
        t0 = _now(dev)
        with torch.no_grad():
            for j in range(len(inps)):
                inps[j] = _layer_out(layer, inps[j], largs, lkwargs)
        timing["forward_secs"] += _now(dev) - t0
        hid = None
        if fp_inps is not None:
            num = sum(float((a - b).float().pow(2).sum()) for a, b in zip(inps, fp_inps))
            den = sum(float(b.float().pow(2).sum()) for b in fp_inps)
            hid = math.sqrt(num / den)
        log(f"layer {li} done in {time.time() - t_layer:.2f}s" + (f", |h_q-h_fp|/|h_fp| = {hid:.4f}" if hid else ""))
        if hid is not None:
            results.append({"layer": li, "hidden_rel_error": hid})
    return results, timing


def _module_row(li, name, m, res, secs, args):
    row = {"layer": li, "module": name, "rows": m.out_features, "cols": m.in_features, "secs": secs}
    if res.get("proxy_loss") is not None:
        row["proxy_loss_sum"] = res["proxy_loss"]
        row["proxy_loss_per_seq"] = res["proxy_loss"] / max(1, res.get("nsamples", 1))
    if args.export:
        m._gptq_export = {k: res[k].detach().cpu() for k in ("codes", "scales", "zeros", "g_idx")}
    return row


def export_gptq(model, src_dir, out_dir, args):
    """Writes a GPTQ v1 checkpoint of the fake-quantized model (codes from the sweep, fp16 scales)."""
    import shutil

    from safetensors.torch import save_file

    from hf_perplexity import pack_gptq

    os.makedirs(out_dir, exist_ok=True)
    fmt = "gptq_v2" if args.asym else "gptq"
    tensors = {}
    for name, m in model.named_modules():
        if hasattr(m, "_gptq_export"):
            e = m._gptq_export
            packed = pack_gptq(e["codes"].numpy(), e["zeros"].numpy(), e["scales"].numpy(), e["g_idx"].numpy(),
                               args.bits, fmt)
            for k, v in packed.items():
                tensors[f"{name}.{k}"] = torch.from_numpy(np.ascontiguousarray(v))
    sd = model.state_dict()
    seen = set()  # tied weights (lm_head = embed_tokens) are stored once, like save_pretrained
    for k, v in sd.items():
        prefix = k.rsplit(".", 1)[0]
        if f"{prefix}.qweight" in tensors and k.endswith(".weight"):
            continue
        if v.data_ptr() in seen:
            continue
        seen.add(v.data_ptr())
        tensors[k] = v.detach().cpu().contiguous()
    save_file(tensors, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    act = bool(args.act_order and not args.static_groups)
    qcfg = {"bits": args.bits, "group_size": args.group_size, "desc_act": act, "sym": not args.asym,
            "lm_head": False, "static_groups": args.static_groups, "true_sequential": True,
            "damp_percent": args.damp, "quant_method": "gptq", "checkpoint_format": fmt, "format": fmt,
            "pack_dtype": "int32", "meta": {"quantizer": ["torch_reference.py"], "method": args.method,
                                            "alpha": args.alpha}}
    with open(os.path.join(src_dir, "config.json")) as f:
        cfg = json.load(f)
    cfg["quantization_config"] = qcfg
    cfg["dtype"] = "float32"
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(cfg, f, indent=1)
    with open(os.path.join(out_dir, "quantize_config.json"), "w") as f:
        json.dump(qcfg, f, indent=1)
    for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "special_tokens_map.json"):
        if os.path.exists(os.path.join(src_dir, f)):
            shutil.copy(os.path.join(src_dir, f), out_dir)


def bench_layer(args, dev) -> dict:
    """Per-layer time and peak memory of the reference drivers on a random Llama-shaped layer.

    One decoder layer (``--bench-layer hidden,intermediate,heads,kv_heads``, default Llama-3-8B
    4096,14336,32,8), random init (transformers' initializer, seed ``--seed``), fp16 weights and
    hidden states (forwards on tensor cores, statistics and solves in fp32 as in the reference),
    ``--nsamples`` random token windows of ``--seqlen``. Runs the GPTQ driver and the GPTAQ driver
    (FP stream + cached FP group inputs on the GPU) from the same initial weights; reports
    forward / statistics / solve seconds and ``torch.cuda.max_memory_allocated``.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    h, inter, heads, kv = (int(v) for v in args.bench_layer.split(","))
    cfg = LlamaConfig(hidden_size=h, intermediate_size=inter, num_attention_heads=heads, num_key_value_heads=kv,
                      num_hidden_layers=1, vocab_size=32000, max_position_embeddings=max(4096, args.seqlen))
    torch.manual_seed(args.seed)
    with torch.device(dev):
        model = LlamaForCausalLM(cfg)
    model = model.to(torch.float16).eval()
    init = {k: v.detach().clone() for k, v in model.model.layers[0].state_dict().items()}
    g = torch.Generator().manual_seed(args.seed)
    windows = torch.randint(0, cfg.vocab_size, (args.nsamples, args.seqlen), generator=g)
    out = {"hidden": h, "intermediate": inter, "heads": heads, "kv_heads": kv, "nsamples": args.nsamples,
           "seqlen": args.seqlen, "dtype": "float16", "bits": args.bits, "group_size": args.group_size, "runs": []}
    log = lambda s: print(f"[bench-layer] {s}", file=sys.stderr, flush=True)  # noqa: E731
    for method in ("gptq", "gptaq"):
        model.model.layers[0].load_state_dict(init)
        a = argparse.Namespace(**vars(args))
        a.method, a.export = method, None
        if dev.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(dev)
        t0 = _now(dev)
        _, timing = quantize_model(model, windows, a, dev, log)
        total = _now(dev) - t0
        peak = torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else None
        row = {"method": method, "total_secs": total, **timing, "peak_gib": peak / 2**30 if peak else None}
        out["runs"].append(row)
        log(f"{method}: {total:.2f}s (forward {timing['forward_secs']:.2f}, stats {timing['stats_secs']:.2f}, "
            f"solve {timing['solve_secs']:.2f}), peak {row['peak_gib'] or 0:.2f} GiB")
    if len(out["runs"]) == 2:
        out["gptaq_over_gptq"] = out["runs"][1]["total_secs"] / out["runs"][0]["total_secs"]
    return out


def quality(args, dev) -> dict:
    from hf_perplexity import load_fp_model, perplexity, tokenize_text

    log = lambda s: print(f"[quality] {s}", file=sys.stderr, flush=True)  # noqa: E731
    t_all = time.time()
    model = load_fp_model(args.model, dev)
    out = {"model": os.path.abspath(args.model), "method": args.method, "bits": args.bits,
           "group_size": args.group_size, "sym": not args.asym, "act_order": args.act_order,
           "static_groups": args.static_groups, "damp": args.damp, "alpha": args.alpha if args.method == "gptaq" else None,
           "blocksize": args.blocksize, "mse": args.mse, "nsamples": args.nsamples, "seqlen": args.seqlen,
           "compound_damping": args.compound_damping}
    if args.method != "fp":
        windows, desc = load_calibration(args, args.model)
        out["calibration"] = desc
        out["calibration_sha256_int64_le"] = __import__("hashlib").sha256(
            windows.numpy().astype("<i8").tobytes()).hexdigest()
        t0 = time.time()
        modules, timing = quantize_model(model, windows, args, dev, log)
        out["quantize_secs"] = time.time() - t0
        out["timing"] = timing
        out["modules"] = modules
        proxies = [m["proxy_loss_per_seq"] for m in modules if "proxy_loss_per_seq" in m]
        out["proxy_loss_per_seq_total"] = sum(proxies) if proxies else None
        if args.export:
            export_gptq(model, args.model, args.export, args)
            out["export"] = os.path.abspath(args.export)
    if args.eval_text:
        ids = tokenize_text(args.tokenizer or args.model, args.eval_text)
        for sl in args.eval_seqlen:
            r = perplexity(model, ids, sl, dev, args.max_windows)
            out.setdefault("eval", []).append(r)
            log(f"{args.method} w{args.bits} g{args.group_size}: ppl@{sl} = {r['perplexity']:.4f} ({r['windows']} windows)")
        out["perplexity"] = out["eval"][0]["perplexity"]
    out["total_secs"] = time.time() - t_all
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bench", default=None, help="comma-separated r×n shapes, e.g. 4096x4096,4096x14336")
    ap.add_argument("--tokens", type=int, default=128 * 2048, help="bench: tokens for the accumulation timing")
    ap.add_argument("--chunk-tokens", type=int, default=16384, help="bench: tokens per add_batch call")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--bench-layer", default=None, metavar="H,I,HEADS,KV",
                    help="per-layer driver timing on a random fp16 Llama layer, e.g. 4096,14336,32,8 "
                         "(uses --nsamples/--seqlen; issue 10's baseline: 128 x 2048)")
    ap.add_argument("--model", default=None, help="HF Llama model dir (quality mode)")
    ap.add_argument("--calib", default=None, help="calibration text/jsonl (sampled like make_calib_ids.py)")
    ap.add_argument("--calib-ids", default=None, help="pre-tokenized safetensors with input_ids [N, L] (preferred)")
    ap.add_argument("--tokenizer", default=None)
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--method", choices=["gptq", "gptaq", "rtn", "fp"], default="gptq")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--asym", action="store_true")
    ap.add_argument("--act-order", action="store_true")
    ap.add_argument("--static-groups", action="store_true")
    ap.add_argument("--mse", action="store_true")
    ap.add_argument("--damp", type=float, default=0.01)
    ap.add_argument("--alpha", type=float, default=0.25)
    ap.add_argument("--blocksize", type=int, default=128)
    ap.add_argument("--compound-damping", action="store_true",
                    help="official-GPTAQ shared in-place H (damping compounds within a group)")
    ap.add_argument("--eval-text", default=None, help="perplexity text (wiki.test.raw)")
    ap.add_argument("--eval-seqlen", type=int, nargs="+", default=None, help="default: --seqlen")
    ap.add_argument("--max-windows", type=int, default=None)
    ap.add_argument("--export", default=None, help="write a GPTQ checkpoint of the result here")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0,
                    help="CPU threads for torch (0 = torch default; 1 is much faster on a busy CPU)")
    ap.add_argument("--out", default=None, help="JSON result path")
    args = ap.parse_args(argv)

    from hf_perplexity import pick_device, setup_torch

    setup_torch(args.seed, args.threads)
    dev = pick_device(args.device)
    res = {"tool": "torch_reference", "torch": torch.__version__, "device": str(dev),
           "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
           "tf32": torch.backends.cuda.matmul.allow_tf32}
    if args.bench:
        res["bench"] = bench(args, dev)
    if args.bench_layer:
        res["bench_layer"] = bench_layer(args, dev)
    if args.model:
        if args.method != "fp" and not (args.calib or args.calib_ids):
            raise SystemExit("--calib or --calib-ids is required for a quantization method")
        if args.eval_seqlen is None:
            args.eval_seqlen = [args.seqlen]
        res["quality"] = quality(args, dev)
    if not args.bench and not args.model and not args.bench_layer:
        ap.error("nothing to do: give --bench, --bench-layer and/or --model")
    js = json.dumps(res, indent=1)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            f.write(js)
    print(js if len(js) < 4000 else js[:2000] + "\n... (truncated; see --out)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
