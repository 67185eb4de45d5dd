#!/usr/bin/env python3
"""Fast CPU checks of the Python tools (``python3 -m pytest tools/test_tools.py`` or
``python3 tools/test_tools.py``).

What it checks and how:
* GPTQ bit packing of ``hf_perplexity.py`` against hand-computed words (4-bit codes 0..7 ->
  0x76543210, sym v1 zeros 0x77777777 / 0x7F7F7F7F / 0x55555555 / 3-bit 0xDB6DB6DB 0xB6DB6DB6
  0x6DB6DB6D, the 3-bit straddling fields v10 and v21 bit by bit), round trips for 2/3/4/8 bits, and
  the dequantizer (v1 ``+1``, g_idx, scales) against a direct formula.
* ``torch_reference.fasterquant`` (blocked, lazy batch updates) equals a straightforward unblocked
  OBS loop in float64 on small random problems (gs -1/32/128 with B=128; gs=B=16 blocks; act-order).
* GPTAQ with alpha = 0 equals GPTQ exactly; GPTAQ with D = 0 equals GPTQ; GPTAQ (alpha=1) lowers the
  asymmetric objective vs GPTQ on its own calibration data.
* make_calib_ids sampling is deterministic in the seed.
Seeds are fixed; float64 is used where exact comparisons are made.
"""
from __future__ import annotations

import os
import sys
import tempfile
import unittest

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import hf_perplexity as hp  # noqa: E402
import torch_reference as tr  # noqa: E402

torch.set_num_threads(1)  # tiny problems: threading only adds contention


def u32(x: int) -> int:
    return np.uint32(x).view(np.int32).item()


class PackTests(unittest.TestCase):
    def test_4bit_word(self):
        codes = np.tile(np.arange(32) % 8, (1,)).reshape(32, 1)  # 0..7,0..7,...
        w = hp.pack_bits(codes, 4)
        self.assertEqual(w.shape, (4, 1))
        self.assertEqual([int(x) for x in w[:, 0]], [u32(0x76543210)] * 4)

    def test_sym_zero_words(self):
        for bits, words in [(4, [0x77777777]), (8, [0x7F7F7F7F]), (2, [0x55555555]),
                            (3, [0xDB6DB6DB, 0xB6DB6DB6, 0x6DB6DB6D])]:
            z = np.full((32, 1), 2 ** (bits - 1) - 1)
            w = hp.pack_bits(z, bits)[:, 0]
            per = len(words)
            self.assertEqual([int(x) for x in w[:per]], [u32(x) for x in words], f"bits={bits}")

    def test_3bit_layout_by_hand(self):
        # v10 = 0b101 -> word0 bits 30,31 = 01 (b0=1,b1=0); word1 bit0 = 1
        v = np.zeros((32, 1), dtype=np.int64)
        v[10] = 0b101
        w = hp.pack_bits(v, 3)[:, 0].view(np.uint32)
        self.assertEqual(int(w[0]), 1 << 30)
        self.assertEqual(int(w[1]), 1)
        self.assertEqual(int(w[2]), 0)
        # v21 = 0b110 -> word1 bit31 = 0; word2 bits0-1 = 11
        v[:] = 0
        v[21] = 0b110
        w = hp.pack_bits(v, 3)[:, 0].view(np.uint32)
        self.assertEqual([int(x) for x in w], [0, 0, 0b11])
        v[21] = 0b111
        w = hp.pack_bits(v, 3)[:, 0].view(np.uint32)
        self.assertEqual([int(x) for x in w], [0, 1 << 31, 0b11])
        # v0 at bits 0-2, v11 at word1 bits 1-3, v22 at word2 bits 2-4
        v[:] = 0
        v[0], v[11], v[22], v[31] = 5, 7, 3, 6
        w = hp.pack_bits(v, 3)[:, 0].view(np.uint32)
        self.assertEqual(int(w[0]), 5)
        self.assertEqual(int(w[1]), 7 << 1)
        self.assertEqual(int(w[2]), (3 << 2) | (6 << 29))

    def test_roundtrip_all_bits(self):
        rng = np.random.default_rng(0)
        for bits in (2, 3, 4, 8):
            for shape in [(32, 1), (64, 3), (128, 96)] + ([(32 // bits, 5)] if 32 % bits == 0 else []):
                c = rng.integers(0, 2**bits, size=shape)
                w = hp.pack_bits(c, bits)
                self.assertEqual(w.dtype, np.int32)
                self.assertEqual(w.shape[0], shape[0] * bits // 32)
                np.testing.assert_array_equal(hp.unpack_bits(w, bits), c)

    def test_dequantize(self):
        rng = np.random.default_rng(1)
        for bits in (2, 3, 4, 8):
            r, n, gs = 64, 96, 32
            G = n // gs
            codes = rng.integers(0, 2**bits, size=(r, n))
            zeros = rng.integers(1, 2**bits, size=(G, r))
            scales = (rng.random((G, r)) + 0.01).astype(np.float16).astype(np.float32)
            g_idx = rng.permutation(np.arange(n) // gs)
            t = hp.pack_gptq(codes, zeros, scales, g_idx, bits, "gptq")
            self.assertEqual(t["qweight"].shape, (n * bits // 32, r))
            self.assertEqual(t["qzeros"].shape, (G, r * bits // 32))
            W = hp.dequantize_gptq(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], bits, "gptq")
            ref = np.empty((r, n), dtype=np.float32)
            for o in range(r):
                for i in range(n):
                    g = g_idx[i]
                    ref[o, i] = np.float32(scales[g, o]) * np.float32(codes[o, i] - zeros[g, o])
            np.testing.assert_array_equal(W, ref)
            t2 = hp.pack_gptq(codes, zeros, scales, g_idx, bits, "gptq_v2")
            W2 = hp.dequantize_gptq(t2["qweight"], t2["qzeros"], t2["scales"], t2["g_idx"], bits, "gptq_v2")
            np.testing.assert_array_equal(W2, ref)

    def test_v1_sym_zero_decodes(self):
        qz = np.full((1, 1), u32(0x77777777), dtype=np.int32)  # 8 output channels, 4-bit
        qw = np.full((1, 8), u32(0x76543210), dtype=np.int32)  # 8 inputs x 8 outputs
        W = hp.dequantize_gptq(qw, qz, np.ones((1, 8), np.float16), np.zeros(8, np.int32), 4)
        np.testing.assert_array_equal(W[0], np.arange(8) - 8.0)


def unblocked_gptq(W, H, bits, gs, sym, percdamp=0.01, D=None, alpha=0.0, actorder=False, B=128):
    """Textbook column-by-column OBS update (no lazy batching, no block GEMMs), float64.

    The reference's two block-related details are stated explicitly instead of arising from the
    data flow: group parameters are read from a snapshot of W taken at the start of the block that
    holds the group's first column (the stale-W quirk of §1.2 for gs < B); the GPTAQ correction of a
    later column k by column j uses the pre-quantization w_j if k is in j's block, else q_j (§2.2).
    """
    W = W.clone().double()
    H = H.clone().double()
    r, n = W.shape
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    if D is not None:
        D = D.clone().double()
        D[:, dead] = 0
    perm = torch.arange(n)
    if actorder:
        perm = torch.argsort(torch.diag(H), descending=True)
        W, H = W[:, perm], H[perm][:, perm]
        if D is not None:
            D = D[perm][:, perm]
    H += percdamp * torch.mean(torch.diag(H)) * torch.eye(n, dtype=H.dtype)
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    P = alpha * (D @ U.t()).triu(1) @ U if D is not None else torch.zeros_like(U)
    qz = tr.Quantizer(bits, sym)
    qz.find_params(W)
    Q = torch.zeros_like(W)
    snap = W.clone()
    for j in range(n):
        if j % B == 0:
            snap = W.clone()
        if gs != -1 and j % gs == 0:
            qz.find_params(snap[:, j : j + gs])
        w = W[:, j].clone()
        q = tr.quantize(w.unsqueeze(1), qz.scale, qz.zero, qz.maxq).flatten()
        Q[:, j] = q
        e = (w - q) / U[j, j]
        W[:, j:] -= torch.outer(e, U[j, j:])
        end = min((j // B + 1) * B, n)
        W[:, j + 1 : end] += torch.outer(w, P[j, j + 1 : end])
        W[:, end:] += torch.outer(q, P[j, end:])
    if actorder:
        Q = Q[:, torch.argsort(perm)]
    return Q


class SweepTests(unittest.TestCase):
    def setUp(self):
        torch.manual_seed(0)

    def problem(self, r, n, T=None, dead=()):
        T = T or 3 * n
        X = torch.randn(T, n, dtype=torch.float64) * torch.exp(0.5 * torch.randn(n, dtype=torch.float64))
        for j in dead:
            X[:, j] = 0
        Xfp = X + 0.2 * torch.randn(T, n, dtype=torch.float64)
        st = tr.Stats(n, "cpu", with_d=True)
        st.H = st.H.double()
        st.D = st.D.double()
        st.add_batch(X, Xfp, nseq=4)
        W = torch.randn(r, n, dtype=torch.float64)
        return W, st.H, st.D, X, Xfp

    def test_blocked_equals_unblocked(self):
        cases = [(16, 256, 4, -1, True, 128), (16, 256, 3, 128, True, 128), (8, 256, 4, 32, False, 128),
                 (12, 96, 4, 16, True, 16), (8, 200, 2, 40, False, 40), (10, 130, 4, -1, True, 32)]
        for r, n, bits, gs, sym, B in cases:
            W, H, _, _, _ = self.problem(r, n, dead=(3,))
            got = tr.fasterquant(W, H, bits=bits, group_size=gs, sym=sym, blocksize=B)["Q"]
            ref = unblocked_gptq(W, H, bits, gs, sym, B=B)
            np.testing.assert_allclose(got.numpy(), ref.numpy(), atol=1e-9, err_msg=f"{(r, n, bits, gs, sym, B)}")

    def test_gptaq_blocked_equals_unblocked(self):
        for r, n, bits, gs, B, alpha, act in [(16, 256, 4, 128, 128, 0.25, False), (8, 200, 3, -1, 64, 1.0, False),
                                              (8, 256, 4, 64, 128, 0.25, True), (6, 96, 2, 32, 32, 0.5, False)]:
            W, H, D, _, _ = self.problem(r, n, dead=(5,))
            got = tr.fasterquant(W, H, bits=bits, group_size=gs, blocksize=B, D=D, alpha=alpha, actorder=act)["Q"]
            ref = unblocked_gptq(W, H, bits, gs, True, D=D, alpha=alpha, actorder=act, B=B)
            np.testing.assert_allclose(got.numpy(), ref.numpy(), atol=1e-9, err_msg=f"{(r, n, bits, gs, B, alpha)}")

    def test_actorder_equals_unblocked(self):
        W, H, _, _, _ = self.problem(8, 256)
        got = tr.fasterquant(W, H, bits=4, group_size=64, actorder=True)
        ref = unblocked_gptq(W, H, 4, 64, True, actorder=True)
        np.testing.assert_allclose(got["Q"].numpy(), ref.numpy(), atol=1e-9)
        # g_idx: positions in processing order // gs, reindexed by invperm; dequant must give Q
        s, z, g = got["scales"], got["zeros"], got["g_idx"]
        deq = s[g].t() * (got["codes"] - z[g].t())
        np.testing.assert_allclose(deq.numpy(), got["Q"].numpy(), atol=1e-12)

    def test_codes_scales_reconstruct_q(self):
        W, H, _, _, _ = self.problem(8, 256)
        for kw in [dict(group_size=128), dict(group_size=-1), dict(group_size=64, actorder=True, static_groups=True)]:
            res = tr.fasterquant(W, H, bits=3, **kw)
            s, z, g = res["scales"], res["zeros"], res["g_idx"]
            deq = s[g].t() * (res["codes"] - z[g].t())
            np.testing.assert_allclose(deq.numpy(), res["Q"].numpy(), atol=1e-12, err_msg=str(kw))

    def test_gptaq_alpha0_equals_gptq(self):
        for gs, act in [(128, False), (-1, False), (64, True)]:
            W, H, D, _, _ = self.problem(16, 256)
            a = tr.fasterquant(W, H, bits=4, group_size=gs, actorder=act)
            b = tr.fasterquant(W, H, bits=4, group_size=gs, actorder=act, D=D, alpha=0.0)
            np.testing.assert_array_equal(a["Q"].numpy(), b["Q"].numpy())
            c = tr.fasterquant(W, H, bits=4, group_size=gs, actorder=act, D=torch.zeros_like(D), alpha=0.25)
            np.testing.assert_array_equal(a["Q"].numpy(), c["Q"].numpy())

    def test_gptaq_lowers_asym_objective(self):
        W, H, D, X, Xfp = self.problem(32, 128, T=2048)
        a = tr.fasterquant(W, H, bits=3, group_size=-1)["Q"]
        b = tr.fasterquant(W, H, bits=3, group_size=-1, D=D, alpha=1.0)["Q"]
        obj = lambda Q: float(((X @ Q.t()) - (Xfp @ W.t())).pow(2).sum())  # noqa: E731
        self.assertLess(obj(b), obj(a))

    def test_p_row_is_least_squares(self):
        # §2.2: row j of P/alpha = D[j, F'] (H_F'F')^-1, F' = j+1..n-1 (damped H)
        W, H, D, _, _ = self.problem(4, 64)
        Hd = H.clone()
        Hd.diagonal().add_(0.01 * Hd.diagonal().mean())
        U = tr.inverse_factor(Hd)
        P = tr.build_p(D, U, 1.0)
        for j in (0, 10, 40, 62):
            F = slice(j + 1, 64)
            ref = D[j, F] @ torch.linalg.inv(Hd[F, F])
            np.testing.assert_allclose(P[j, F].numpy(), ref.numpy(), rtol=1e-8, atol=1e-10)

    def test_rtn_matches_quantizer(self):
        W = torch.randn(8, 256, dtype=torch.float64)
        res = tr.rtn(W, bits=4, group_size=128)
        s, z, g = res["scales"], res["zeros"], res["g_idx"]
        np.testing.assert_allclose((s[g].t() * (res["codes"] - z[g].t())).numpy(), res["Q"].numpy(), atol=1e-12)
        self.assertTrue(torch.all(res["zeros"] == 8))


DATA = os.environ.get("GPTAQ_TEST_DATA", os.path.join(HERE, "..", "..", "shared", "data"))


@unittest.skipUnless(os.path.isdir(os.path.join(DATA, "stories260K")), "GPTAQ_TEST_DATA/stories260K not found")
class EndToEndTests(unittest.TestCase):
    """stories260K (hidden 64, intermediate 172: only 8-bit packs it): quantize with the reference
    driver, export, reload through the dequantizer, same perplexity (up to fp16 scale rounding)."""

    def test_export_reload_same_ppl(self):
        import json

        import make_calib_ids as mc

        model = os.path.join(DATA, "stories260K")
        text = os.path.join(DATA, "corpora", "tinystories", "cs336_tinystories_sample.txt")
        with tempfile.TemporaryDirectory() as d:
            ids, _ = mc.sample_windows(mc.load_tokenizer(model), text, 4, 64, 0)
            from safetensors.numpy import save_file

            save_file({"input_ids": ids}, os.path.join(d, "c.safetensors"))
            for method, extra in [("gptq", ["--act-order"]), ("gptaq", []), ("rtn", [])]:
                exp = os.path.join(d, f"exp_{method}")
                out = os.path.join(d, f"{method}.json")
                tr.main(["--model", model, "--calib-ids", os.path.join(d, "c.safetensors"), "--nsamples", "4",
                         "--seqlen", "64", "--method", method, "--bits", "8", "--group-size", "-1",
                         "--eval-text", text, "--eval-seqlen", "64", "--max-windows", "4", "--device", "cpu",
                         "--export", exp, "--out", out] + extra)
                ref = json.load(open(out))["quality"]["perplexity"]
                hout = os.path.join(d, f"{method}_hf.json")
                hp.main(["--gptq", exp, "--text", text, "--seqlen", "64", "--max-windows", "4", "--device", "cpu",
                         "--out", hout])
                got = json.load(open(hout))["perplexity"]
                self.assertAlmostEqual(got, ref, delta=1e-3 * ref, msg=method)


class CalibTests(unittest.TestCase):
    def test_deterministic(self):
        import make_calib_ids as mc

        class Tok:
            def encode(self, text, add_special_tokens=False):
                class E:
                    ids = [ord(c) for c in text]

                return E()

        with tempfile.TemporaryDirectory() as d:
            p = os.path.join(d, "c.jsonl")
            with open(p, "w") as f:
                for i in range(20):
                    f.write('{"text": "%s"}\n' % ("abcdefghij" * (i + 1)))
            a, ia = mc.sample_windows(Tok(), p, 8, 50, 3)
            b, _ = mc.sample_windows(Tok(), p, 8, 50, 3)
            c, _ = mc.sample_windows(Tok(), p, 8, 50, 4)
            np.testing.assert_array_equal(a, b)
            self.assertFalse(np.array_equal(a, c))
            self.assertEqual(a.shape, (8, 50))
            self.assertEqual(ia["eligible_documents"], 16)


if __name__ == "__main__":
    unittest.main()
