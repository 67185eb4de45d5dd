#!/usr/bin/env python3
"""Write a pre-tokenized calibration file (safetensors, ``input_ids`` int64 ``[N, L]``).

What it does: tokenizes a calibration source with the model's ``tokenizer.json`` (Hugging Face
``tokenizers``, no special tokens, i.e. no BOS) and samples ``N`` random windows of ``L`` tokens
the way the GPTQ reference does:

* plain text (``.txt .raw .tokens .text .md``), GPTQ ``get_wikitext2`` style: the whole file is
  tokenized once; each sample is ``tokens[i:i+L]`` with ``i`` uniform in ``[0, len-L]``;
* JSON lines (``.jsonl .ndjson``, field ``text``), GPTQ ``get_c4`` style: every document is
  tokenized on its own; each sample draws documents uniformly until one has ``>= L`` tokens, then a
  window start uniform in ``[0, len_d-L]``.

This mirrors ``src/calib.rs::calibration_windows`` (same procedure, same inclusive ranges), but the
random numbers come from ``numpy.random.default_rng(seed)`` (PCG64), not from rand_chacha's
ChaCha8, so the *windows differ* from the Rust app's for the same seed. That is why this file
exists: give the written safetensors to both tools (``gptaq-studio quantize --calib FILE`` and
``tools/torch_reference.py --calib-ids FILE``) and they see identical windows. Deterministic in
``--seed``. A JSON summary (counts, seed, sha256 of the ids) is written to ``--out-json``.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys

import numpy as np

TEXT_EXTS = {".txt", ".raw", ".tokens", ".text", ".md"}
JSONL_EXTS = {".jsonl", ".ndjson"}


def load_tokenizer(path: str):
    """``tokenizers.Tokenizer`` from a tokenizer.json file or a model directory holding one."""
    from tokenizers import Tokenizer

    if os.path.isdir(path):
        path = os.path.join(path, "tokenizer.json")
    return Tokenizer.from_file(path)


def encode(tok, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False).ids


def read_documents(path: str) -> tuple[str, list[str]]:
    """Returns (kind, documents): kind "text" (one document) or "jsonl"."""
    ext = os.path.splitext(path)[1].lower()
    with open(path, "r", encoding="utf-8") as f:
        data = f.read()
    if ext in TEXT_EXTS:
        return "text", [data]
    if ext in JSONL_EXTS:
        docs = []
        for line in data.splitlines():
            if not line.strip():
                continue
            v = json.loads(line)
            t = v.get("text") if isinstance(v, dict) else None
            if isinstance(t, str):
                docs.append(t)
        if not docs:
            raise SystemExit(f"{path}: no line has a string `text` field")
        return "jsonl", docs
    raise SystemExit(f"{path}: unsupported extension {ext!r} (text: {sorted(TEXT_EXTS)}, jsonl)")


def sample_windows(tok, path: str, nsamples: int, seqlen: int, seed: int) -> tuple[np.ndarray, dict]:
    """GPTQ-style random windows (see the module docstring). Returns (ids [N, L] int64, info)."""
    kind, docs = read_documents(path)
    rng = np.random.default_rng(seed)
    out = np.zeros((nsamples, seqlen), dtype=np.int64)
    if kind == "text":
        ids = encode(tok, docs[0])
        if len(ids) < seqlen:
            raise SystemExit(f"{path}: only {len(ids)} tokens, fewer than seqlen {seqlen}")
        for s in range(nsamples):
            i = int(rng.integers(0, len(ids) - seqlen, endpoint=True))
            out[s] = ids[i : i + seqlen]
        info = {"kind": kind, "available_tokens": len(ids), "documents": 1}
    else:
        enc = [encode(tok, d) for d in docs]
        eligible = sum(1 for e in enc if len(e) >= seqlen)
        if eligible == 0:
            raise SystemExit(f"{path}: no document has {seqlen} tokens")
        for s in range(nsamples):
            while True:
                d = enc[int(rng.integers(0, len(enc)))]
                if len(d) >= seqlen:
                    break
            i = int(rng.integers(0, len(d) - seqlen, endpoint=True))
            out[s] = d[i : i + seqlen]
        info = {
            "kind": kind,
            "available_tokens": int(sum(len(e) for e in enc)),
            "documents": len(docs),
            "eligible_documents": eligible,
        }
    info.update(
        {
            "source": os.path.abspath(path),
            "nsamples": nsamples,
            "seqlen": seqlen,
            "seed": seed,
            "rng": "numpy.random.default_rng (PCG64)",
            "sha256_int64_le": hashlib.sha256(out.astype("<i8").tobytes()).hexdigest(),
        }
    )
    return out, info


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokenizer", required=True, help="tokenizer.json or a model dir containing one")
    ap.add_argument("--calib", required=True, help="calibration text (.txt/.raw/...) or .jsonl with `text`")
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True, help="output .safetensors (tensor `input_ids` int64 [N, L])")
    ap.add_argument("--out-json", default=None, help="write a JSON summary here (default: OUT.json)")
    args = ap.parse_args(argv)

    from safetensors.numpy import save_file

    tok = load_tokenizer(args.tokenizer)
    ids, info = sample_windows(tok, args.calib, args.nsamples, args.seqlen, args.seed)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    save_file({"input_ids": ids}, args.out, metadata={"seed": str(args.seed), "source": os.path.basename(args.calib)})
    info["out"] = os.path.abspath(args.out)
    js = args.out_json or (os.path.splitext(args.out)[0] + ".json")
    with open(js, "w") as f:
        json.dump(info, f, indent=1)
    print(json.dumps(info), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
