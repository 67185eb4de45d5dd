//! f64 CPU reference of the decoder layer and the full model, written for clarity (the tests'
//! oracle for every forward kernel). Same layout conventions as the GPU path.

use crate::model::{LayerWeights, Linear, ModelConfig, WeightSource, weights::WeightError};

use super::{LayerDims, rope_tables};

fn rmsnorm(x: &[f64], w: &[f32], eps: f64, out: &mut [f64]) {
    let n = w.len();
    for (xr, or) in x.chunks_exact(n).zip(out.chunks_exact_mut(n)) {
        let ms = xr.iter().map(|v| v * v).sum::<f64>() / n as f64;
        let r = 1.0 / (ms + eps).sqrt();
        for ((o, &v), &g) in or.iter_mut().zip(xr).zip(w) {
            *o = v * r * f64::from(g);
        }
    }
}

/// `y = x·Wᵀ + b` for `t` rows.
fn linear(x: &[f64], lin: &Linear, t: usize) -> Vec<f64> {
    let (o, i) = (lin.out_features, lin.in_features);
    let mut y = vec![0.0; t * o];
    for r in 0..t {
        let xr = &x[r * i..(r + 1) * i];
        for c in 0..o {
            let wr = &lin.weight[c * i..(c + 1) * i];
            let mut acc: f64 = xr.iter().zip(wr).map(|(a, &b)| a * f64::from(b)).sum();
            if let Some(b) = &lin.bias {
                acc += f64::from(b[c]);
            }
            y[r * o + c] = acc;
        }
    }
    y
}

/// RoPE (with optional per-head norm first) in place on `[t, heads·hd]`.
#[allow(clippy::too_many_arguments)]
fn rope(
    x: &mut [f64],
    heads: usize,
    hd: usize,
    seqlen: usize,
    cos: &[f32],
    sin: &[f32],
    norm: Option<&[f32]>,
    eps: f64,
) {
    let half = hd / 2;
    for (row, head) in x.chunks_exact_mut(hd).enumerate() {
        let pos = (row / heads) % seqlen;
        if let Some(w) = norm {
            let src = head.to_vec();
            rmsnorm(&src, w, eps, head);
        }
        for i in 0..half {
            let (a, b) = (head[i], head[i + half]);
            let (c, s) = (
                f64::from(cos[pos * half + i]),
                f64::from(sin[pos * half + i]),
            );
            head[i] = a * c - b * s;
            head[i + half] = b * c + a * s;
        }
    }
}

/// One decoder layer in place on `h` (`nseq` packed sequences of `seqlen` tokens).
pub fn layer_forward(
    cfg: &ModelConfig,
    lw: &LayerWeights,
    h: &mut [f64],
    nseq: usize,
    seqlen: usize,
) {
    let d = LayerDims::of(cfg);
    let t = nseq * seqlen;
    let eps = cfg.rms_norm_eps;
    let (cos, sin) = rope_tables(cfg, seqlen);
    let mut x1 = vec![0.0; t * d.hidden];
    rmsnorm(h, &lw.input_norm, eps, &mut x1);
    let mut q = linear(&x1, &lw.q, t);
    let mut k = linear(&x1, &lw.k, t);
    let v = linear(&x1, &lw.v, t);
    rope(
        &mut q,
        d.heads,
        d.head_dim,
        seqlen,
        &cos,
        &sin,
        lw.q_norm.as_deref(),
        eps,
    );
    rope(
        &mut k,
        d.kv_heads,
        d.head_dim,
        seqlen,
        &cos,
        &sin,
        lw.k_norm.as_deref(),
        eps,
    );
    let attn = causal_attention(&q, &k, &v, d.heads, d.kv_heads, d.head_dim, seqlen);
    let o = linear(&attn, &lw.o, t);
    h.iter_mut().zip(&o).for_each(|(a, b)| *a += b);
    let mut x2 = vec![0.0; t * d.hidden];
    rmsnorm(h, &lw.post_norm, eps, &mut x2);
    let g = linear(&x2, &lw.gate, t);
    let u = linear(&x2, &lw.up, t);
    let act: Vec<f64> = g
        .iter()
        .zip(&u)
        .map(|(g, u)| g / (1.0 + (-g).exp()) * u)
        .collect();
    let dn = linear(&act, &lw.down, t);
    h.iter_mut().zip(&dn).for_each(|(a, b)| *a += b);
}

/// Causal grouped-query attention of packed sequences of `seqlen` tokens: q `[t, heads·hd]`,
/// k, v `[t, kv_heads·hd]` → `[t, heads·hd]`, query head h reading kv head `h / (heads /
/// kv_heads)`, scores scaled by `1/√hd`, softmax over the positions `0..=pos` of its own sequence.
pub fn causal_attention(
    q: &[f64],
    k: &[f64],
    v: &[f64],
    heads: usize,
    kv_heads: usize,
    hd: usize,
    seqlen: usize,
) -> Vec<f64> {
    let (qd, kvd) = (heads * hd, kv_heads * hd);
    let t = q.len() / qd;
    let group = heads / kv_heads;
    let scale = 1.0 / (hd as f64).sqrt();
    let mut attn = vec![0.0; t * qd];
    for tok in 0..t {
        let start = tok - tok % seqlen;
        for head in 0..heads {
            let kvh = head / group;
            let qr = &q[tok * qd + head * hd..][..hd];
            let scores: Vec<f64> = (start..=tok)
                .map(|j| {
                    qr.iter()
                        .zip(&k[j * kvd + kvh * hd..][..hd])
                        .map(|(a, b)| a * b)
                        .sum::<f64>()
                        * scale
                })
                .collect();
            let mx = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let e: Vec<f64> = scores.iter().map(|s| (s - mx).exp()).collect();
            let z: f64 = e.iter().sum();
            let out = &mut attn[tok * qd + head * hd..][..hd];
            for (jj, p) in e.iter().enumerate() {
                let vr = &v[(start + jj) * kvd + kvh * hd..][..hd];
                for (o, vv) in out.iter_mut().zip(vr) {
                    *o += p / z * vv;
                }
            }
        }
    }
    attn
}

/// Full-model logits `[ids.len(), vocab]` of one sequence, in f64.
pub fn logits(source: &dyn WeightSource, ids: &[u32]) -> Result<Vec<f64>, WeightError> {
    let cfg = source.config();
    let t = ids.len();
    let mut h: Vec<f64> = source.embed(ids)?.into_iter().map(f64::from).collect();
    for layer in 0..cfg.num_layers {
        let lw = source.layer(layer)?;
        layer_forward(cfg, &lw, &mut h, 1, t);
    }
    let fnorm = source.final_norm()?;
    let mut xn = vec![0.0; h.len()];
    rmsnorm(&h, &fnorm, cfg.rms_norm_eps, &mut xn);
    let head = source.lm_head_rows(0..cfg.vocab_size)?;
    let lin = Linear {
        weight: head,
        out_features: cfg.vocab_size,
        in_features: cfg.hidden_size,
        bias: None,
    };
    Ok(linear(&xn, &lin, t))
}

/// Mean next-token NLL over windows (each window predicts its tokens 1.. from the previous ones).
pub fn mean_nll(source: &dyn WeightSource, windows: &[Vec<u32>]) -> Result<f64, WeightError> {
    let (mut sum, mut n) = (0.0, 0usize);
    for w in windows {
        let lg = logits(source, w)?;
        let v = source.config().vocab_size;
        for (pos, &target) in w.iter().enumerate().skip(1) {
            let row = &lg[(pos - 1) * v..pos * v];
            let mx = row.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let lse = mx + row.iter().map(|x| (x - mx).exp()).sum::<f64>().ln();
            sum += lse - row[target as usize];
            n += 1;
        }
    }
    Ok(sum / n.max(1) as f64)
}
