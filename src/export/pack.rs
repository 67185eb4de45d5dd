//! Bit packing of GPTQ integer codes and zero points (algorithm.md §3.1–§3.3).
//!
//! All four widths use one rule: a sequence of `b`-bit values is a **little-endian bit stream**,
//! value `k` occupying stream bits `b·k .. b·k+b−1`, word `w` holding stream bits `32w .. 32w+31`.
//! For b = 2, 4, 8 this is exactly §3.2's `word = Σ_j v[pf·w + j] << (b·j)`. For b = 3 it is the
//! "irregular" 3-word layout of §3.2: v10 occupies stream bits 30..32 (bits 30–31 of word 0 and bit 0
//! of word 1), v21 occupies bits 63..65 (bit 31 of word 1, bits 0–1 of word 2), and every other value
//! sits inside one word — the shift tables `[0,3,…,27,30]`, `[1,4,…,31]`, `[2,5,…,29]` of
//! AutoGPTQ/GPTQModel/vLLM are this stream cut into 32-bit words.
//!
//! A sequence can be packed only if `len·b` is a multiple of 32 (b = 2: len % 16, b = 3: len % 32,
//! b = 4: len % 8, b = 8: len % 4): the checkpoint shapes `[n·b/32, r]` and `[G, r·b/32]` have no
//! room for a partial word, and every consumer computes them with exact division (GPTQModel allocates
//! with `ceil`, but its loaders and vLLM then disagree on the shape; §3.1).
//!
//! Words are handled as `u32` bit patterns and stored as `i32` (safetensors `I32`, the only
//! `pack_dtype` vLLM reads); the sign of a stored word is meaningless.

/// Bit widths the GPTQ format (and every consumer in §3.6) supports.
pub const SUPPORTED_BITS: [u32; 4] = [2, 3, 4, 8];

/// Why packing or unpacking refused its input.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PackError {
    #[error("{bits}-bit packing is not supported by the GPTQ format (supported: 2, 3, 4, 8)")]
    UnsupportedBits { bits: u32 },
    #[error(
        "{what}: {len} values of {bits} bits do not fill whole 32-bit words ({len}·{bits} is not a multiple of 32; the packed dimension must be a multiple of {})",
        multiple_for(*.bits)
    )]
    PartialWord { what: String, len: usize, bits: u32 },
    #[error("{what}: value {value} at index {index} does not fit in {bits} bits (max {})", max_value(*.bits))]
    ValueOutOfRange {
        what: String,
        index: usize,
        value: u32,
        bits: u32,
    },
    #[error("{what}: expected {expected} elements, got {got}")]
    Length {
        what: String,
        expected: usize,
        got: usize,
    },
}

/// Smallest length whose `len·bits` is a multiple of 32 (the packing granule).
pub fn multiple_for(bits: u32) -> usize {
    match bits {
        2 => 16,
        3 => 32,
        4 => 8,
        8 => 4,
        // Not a supported width; callers check `bits` first. 32 is the granule that always works.
        _ => 32,
    }
}

fn max_value(bits: u32) -> u64 {
    (1u64 << bits.min(63)) - 1
}

fn check_bits(bits: u32) -> Result<(), PackError> {
    if SUPPORTED_BITS.contains(&bits) {
        Ok(())
    } else {
        Err(PackError::UnsupportedBits { bits })
    }
}

/// Number of 32-bit words holding `len` values of `bits` bits.
pub fn packed_words(len: usize, bits: u32, what: &str) -> Result<usize, PackError> {
    check_bits(bits)?;
    if !len.is_multiple_of(multiple_for(bits)) {
        return Err(PackError::PartialWord {
            what: what.to_string(),
            len,
            bits,
        });
    }
    Ok(len * bits as usize / 32)
}

/// Packs `vals` (each `< 2^bits`) into a little-endian bit stream of 32-bit words.
pub fn pack_stream(vals: &[u32], bits: u32, what: &str) -> Result<Vec<u32>, PackError> {
    let nwords = packed_words(vals.len(), bits, what)?;
    let mut words = vec![0u32; nwords];
    pack_stream_into(vals.iter().copied(), bits, what, &mut words)?;
    Ok(words)
}

/// Packs an iterator of values into `words` (already zeroed, already the right length).
fn pack_stream_into(
    vals: impl Iterator<Item = u32>,
    bits: u32,
    what: &str,
    words: &mut [u32],
) -> Result<(), PackError> {
    let maxq = (1u32 << bits) - 1;
    for (k, v) in vals.enumerate() {
        if v > maxq {
            return Err(PackError::ValueOutOfRange {
                what: what.to_string(),
                index: k,
                value: v,
                bits,
            });
        }
        let off = k * bits as usize;
        let (w, s) = (off / 32, (off % 32) as u32);
        words[w] |= v << s;
        // A value straddling two words (3-bit v10 / v21 of each 32-group): its high bits start
        // the next word.
        if s + bits > 32 {
            words[w + 1] |= v >> (32 - s);
        }
    }
    Ok(())
}

/// Inverse of [`pack_stream`]: `len` values from the bit stream `words`.
pub fn unpack_stream(
    words: &[u32],
    bits: u32,
    len: usize,
    what: &str,
) -> Result<Vec<u32>, PackError> {
    let nwords = packed_words(len, bits, what)?;
    if words.len() != nwords {
        return Err(PackError::Length {
            what: what.to_string(),
            expected: nwords,
            got: words.len(),
        });
    }
    Ok((0..len).map(|k| stream_value(words, bits, k)).collect())
}

/// Value `k` of a bit stream (caller guarantees the words exist).
#[inline]
fn stream_value(words: &[u32], bits: u32, k: usize) -> u32 {
    let maxq = (1u32 << bits) - 1;
    let off = k * bits as usize;
    let (w, s) = (off / 32, (off % 32) as u32);
    let mut v = words[w] >> s;
    if s + bits > 32 {
        v |= words[w + 1] << (32 - s);
    }
    v & maxq
}

/// `qweight` I32 `[cols·bits/32, rows]` from codes row-major `[rows, cols]` (`rows` = out_features).
///
/// §3.1/§3.2: packed along the **input** dimension, so output row `o` of the codes (all its input
/// columns, in original column order) becomes column `o` of `qweight`.
pub fn pack_qweight(
    codes: &[u8],
    rows: usize,
    cols: usize,
    bits: u32,
) -> Result<Vec<i32>, PackError> {
    let what = "qweight (in_features)";
    let nw = packed_words(cols, bits, what)?;
    expect_len("codes", rows.checked_mul(cols), codes.len())?;
    let mut out = vec![0i32; nw * rows];
    let mut col_words = vec![0u32; nw];
    for o in 0..rows {
        col_words.fill(0);
        let row = &codes[o * cols..(o + 1) * cols];
        pack_stream_into(
            row.iter().map(|&c| u32::from(c)),
            bits,
            "codes",
            &mut col_words,
        )
        .map_err(|e| reindex(e, o * cols))?;
        for (w, &word) in col_words.iter().enumerate() {
            out[w * rows + o] = word as i32;
        }
    }
    Ok(out)
}

/// Inverse of [`pack_qweight`]: codes row-major `[rows, cols]`.
pub fn unpack_qweight(
    qweight: &[i32],
    rows: usize,
    cols: usize,
    bits: u32,
) -> Result<Vec<u8>, PackError> {
    let nw = packed_words(cols, bits, "qweight (in_features)")?;
    expect_len("qweight", nw.checked_mul(rows), qweight.len())?;
    let mut codes = vec![0u8; rows * cols];
    let mut col_words = vec![0u32; nw];
    for o in 0..rows {
        for (w, cw) in col_words.iter_mut().enumerate() {
            *cw = qweight[w * rows + o] as u32;
        }
        for (i, c) in codes[o * cols..(o + 1) * cols].iter_mut().enumerate() {
            // ≤ 8 bits by construction.
            *c = stream_value(&col_words, bits, i) as u8;
        }
    }
    Ok(codes)
}

/// `qzeros` I32 `[groups, rows·bits/32]` from TRUE zero points `[groups, rows]`, in checkpoint_format
/// "gptq" (v1): every field stores `zero − 1` (§3.3).
///
/// A zero point of 0 (possible only for asymmetric quantization) cannot be stored as −1 in `b` bits.
/// It is wrapped **field-wise** to `maxq` (`(zero − 1) mod 2^b`), leaving neighbouring fields intact —
/// unlike AutoGPTQ's packer, whose −1 (0xFFFFFFFF) ORed into the word sets every higher field to
/// all-ones. [`unpack_qzeros`] (and so [`super::GptqModel`]) undoes the wrap exactly; consumers that
/// decode `field + 1` without wrapping (ExLlama, vLLM `gptq_gemm`, Triton) read such a zero as
/// `maxq + 1`, so the exporter reports how many zeros are affected (see `writer.rs`).
pub fn pack_qzeros(
    zeros: &[u32],
    groups: usize,
    rows: usize,
    bits: u32,
) -> Result<Vec<i32>, PackError> {
    check_bits(bits)?;
    let maxq = (1u32 << bits) - 1;
    expect_len("zeros", groups.checked_mul(rows), zeros.len())?;
    if let Some((i, &z)) = zeros.iter().enumerate().find(|&(_, &z)| z > maxq) {
        return Err(PackError::ValueOutOfRange {
            what: "zero points".into(),
            index: i,
            value: z,
            bits,
        });
    }
    let nw = packed_words(rows, bits, "qzeros (out_features)")?;
    let mut out = vec![0i32; groups * nw];
    let mut words = vec![0u32; nw];
    for g in 0..groups {
        words.fill(0);
        let stored = zeros[g * rows..(g + 1) * rows]
            .iter()
            .map(|&z| z.wrapping_sub(1) & maxq);
        pack_stream_into(stored, bits, "zero points", &mut words)?;
        for (w, &word) in words.iter().enumerate() {
            out[g * nw + w] = word as i32;
        }
    }
    Ok(out)
}

/// The stored fields of a v1 `qzeros` `[groups, rows·bits/32]` (i.e. `zero − 1`, wrapped), `[groups, rows]`.
pub fn unpack_qzeros_raw(
    qzeros: &[i32],
    groups: usize,
    rows: usize,
    bits: u32,
) -> Result<Vec<u32>, PackError> {
    let nw = packed_words(rows, bits, "qzeros (out_features)")?;
    expect_len("qzeros", groups.checked_mul(nw), qzeros.len())?;
    let mut out = Vec::with_capacity(groups * rows);
    for g in 0..groups {
        let words: Vec<u32> = qzeros[g * nw..(g + 1) * nw]
            .iter()
            .map(|&w| w as u32)
            .collect();
        out.extend((0..rows).map(|k| stream_value(&words, bits, k)));
    }
    Ok(out)
}

/// True zero points `[groups, rows]` of a v1 `qzeros`: `(field + 1) mod 2^b` (§3.3).
///
/// The `mod 2^b` only matters for a stored `maxq`, which a valid quantizer can only have produced by
/// wrapping a zero of 0 (zeros lie in `[0, maxq]`, so `maxq + 1` is never a real zero point).
pub fn unpack_qzeros(
    qzeros: &[i32],
    groups: usize,
    rows: usize,
    bits: u32,
) -> Result<Vec<u32>, PackError> {
    let raw = unpack_qzeros_raw(qzeros, groups, rows, bits)?;
    // `bits` is valid here (checked by the call above).
    let maxq = (1u32 << bits) - 1;
    Ok(raw.into_iter().map(|f| (f + 1) & maxq).collect())
}

fn expect_len(what: &str, expected: Option<usize>, got: usize) -> Result<(), PackError> {
    match expected {
        Some(e) if e == got => Ok(()),
        _ => Err(PackError::Length {
            what: what.to_string(),
            expected: expected.unwrap_or(usize::MAX),
            got,
        }),
    }
}

/// Makes a per-row index in a range error a flat `[rows, cols]` index.
fn reindex(e: PackError, base: usize) -> PackError {
    match e {
        PackError::ValueOutOfRange {
            what,
            index,
            value,
            bits,
        } => PackError::ValueOutOfRange {
            what,
            index: base + index,
            value,
            bits,
        },
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn three_bit_stream_matches_shift_tables() -> Result<(), Box<dyn std::error::Error>> {
        // v_k = k mod 8; decode with the AutoGPTQ per-word shift tables of §3.2.
        let vals: Vec<u32> = (0..32).map(|k| k % 8).collect();
        let w = pack_stream(&vals, 3, "t")?;
        for k in 0..10 {
            assert_eq!((w[0] >> (3 * k)) & 7, vals[k as usize]);
            assert_eq!((w[1] >> (1 + 3 * k)) & 7, vals[11 + k as usize]);
            assert_eq!((w[2] >> (2 + 3 * k)) & 7, vals[22 + k as usize]);
        }
        assert_eq!((w[0] >> 30) | ((w[1] & 1) << 2), vals[10]);
        assert_eq!((w[1] >> 31) | ((w[2] & 3) << 1), vals[21]);
        Ok(())
    }
}
