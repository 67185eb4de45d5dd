#!/usr/bin/env python3
"""A random-weight Llama-shaped checkpoint (config.json + model.safetensors, no tokenizer) and random
calibration token ids, for speed and memory runs at real model shapes (issue 10: "random weights are
fine for timing"). Weights ~ N(0, 0.02²) (HF's initializer_range), norms = 1. With
`--preset llama3-8b` the layer shapes are Llama-3-8B's (hidden 4096, intermediate 14336, 32 heads,
8 kv heads); the vocabulary is cut to --vocab (default 32000) since only the decoder layers are timed.

    python3 tools/make_random_llama.py --preset llama3-8b --layers 1 --out /tmp/l8b \
        --calib-out /tmp/l8b-calib.safetensors --nsamples 128 --seqlen 2048
"""
import argparse
import json
import os

import torch
from safetensors.torch import save_file

PRESETS = {
    "llama3-8b": dict(hidden=4096, intermediate=14336, heads=32, kv_heads=8, rope_theta=500000.0),
    "tiny": dict(hidden=256, intermediate=640, heads=4, kv_heads=2, rope_theta=10000.0),
}
# Issue 10's scaling table: Llama-3 proportions (intermediate 3.5×hidden, head dim 128, 4 query
# heads per KV head; h8192 is Llama-3-70B's layer shape).
for _h in (1024, 2048, 4096, 8192):
    PRESETS[f"h{_h}"] = dict(hidden=_h, intermediate=_h * 7 // 2, heads=_h // 128,
                              kv_heads=max(1, min(8, _h // 512)), rope_theta=500000.0)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    ap.add_argument("--hidden", type=int)
    ap.add_argument("--intermediate", type=int)
    ap.add_argument("--heads", type=int)
    ap.add_argument("--kv-heads", type=int)
    ap.add_argument("--layers", type=int, default=1)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--dtype", choices=["float16", "bfloat16", "float32"], default="float16")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", required=True)
    ap.add_argument("--calib-out", help="also write random input_ids [nsamples, seqlen] here")
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=2048)
    a = ap.parse_args(argv)
    p = dict(PRESETS[a.preset])
    for k in ("hidden", "intermediate", "heads", "kv_heads"):
        v = getattr(a, k)
        if v is not None:
            p[k] = v
    h, i, nh, nkv = p["hidden"], p["intermediate"], p["heads"], p["kv_heads"]
    hd = h // nh
    dt = getattr(torch, a.dtype)
    g = torch.Generator(device=a.device).manual_seed(a.seed)

    def rnd(*shape):
        return (torch.randn(*shape, generator=g, device=a.device, dtype=torch.float32) * 0.02).to(dt).cpu()

    t = {"model.embed_tokens.weight": rnd(a.vocab, h), "model.norm.weight": torch.ones(h, dtype=dt),
         "lm_head.weight": rnd(a.vocab, h)}
    for l in range(a.layers):
        pre = f"model.layers.{l}."
        t[pre + "self_attn.q_proj.weight"] = rnd(nh * hd, h)
        t[pre + "self_attn.k_proj.weight"] = rnd(nkv * hd, h)
        t[pre + "self_attn.v_proj.weight"] = rnd(nkv * hd, h)
        t[pre + "self_attn.o_proj.weight"] = rnd(h, nh * hd)
        t[pre + "mlp.gate_proj.weight"] = rnd(i, h)
        t[pre + "mlp.up_proj.weight"] = rnd(i, h)
        t[pre + "mlp.down_proj.weight"] = rnd(h, i)
        t[pre + "input_layernorm.weight"] = torch.ones(h, dtype=dt)
        t[pre + "post_attention_layernorm.weight"] = torch.ones(h, dtype=dt)
    os.makedirs(a.out, exist_ok=True)
    save_file(t, os.path.join(a.out, "model.safetensors"), metadata={"format": "pt"})
    cfg = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": h,
        "intermediate_size": i, "num_attention_heads": nh, "num_key_value_heads": nkv,
        "num_hidden_layers": a.layers, "vocab_size": a.vocab, "max_position_embeddings": max(8192, a.seqlen),
        "rms_norm_eps": 1e-5, "rope_theta": p["rope_theta"], "hidden_act": "silu",
        "tie_word_embeddings": False, "torch_dtype": a.dtype, "bos_token_id": 1, "eos_token_id": 2,
    }
    with open(os.path.join(a.out, "config.json"), "w") as f:
        json.dump(cfg, f, indent=1)
    if a.calib_out:
        ids = torch.randint(0, a.vocab, (a.nsamples, a.seqlen), generator=torch.Generator().manual_seed(a.seed + 1))
        save_file({"input_ids": ids.to(torch.int64)}, a.calib_out)
    n = sum(v.numel() for v in t.values())
    print(json.dumps({"out": a.out, "params": n, "shape": p, "layers": a.layers, "dtype": a.dtype}))


if __name__ == "__main__":
    main()
