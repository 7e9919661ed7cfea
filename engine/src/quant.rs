//! GGML tensor element types: block layouts, dequantisation, and the quantised dot products the
//! CPU executor multiplies with (weights stay in their blocks; activations are quantised to 8 bits
//! once per row, as llama.cpp does).
//!
//! Layouts (little endian, `d`/`m`/`dmin` are f16 unless noted):
//! - `Q4_0` (32 values, 18 bytes): `d`, 16 bytes of nibbles; value j = d·(q_j − 8), q_j the low
//!   nibble of byte j for j < 16 and the high nibble of byte j−16 otherwise.
//! - `Q4_1` (32 values, 20 bytes): `d`, `m`, 16 bytes of nibbles as Q4_0; value = d·q_j + m.
//! - `Q8_0` (32 values, 34 bytes): `d`, 32 × i8; value = d·q.
//! - `Q4_K` (256 values, 144 bytes): `d`, `dmin`, 12 bytes holding eight 6-bit scales and eight
//!   6-bit mins, 128 bytes of nibbles. Each 64 values use 32 bytes: low nibbles for the first 32
//!   (sub-block 2c), high nibbles for the next 32 (sub-block 2c+1); value = d·sc·q − dmin·m.
//! - `Q6_K` (256 values, 210 bytes): 128 bytes `ql` (low 4 bits), 64 bytes `qh` (high 2 bits),
//!   16 × i8 scales (one per 16 values), then `d`; value = d·sc·(q − 32).
//!
//! Activations are quantised per row into [`QuantizedActs`]: blocks of 32 with an f32 scale
//! (`Q8_0`; `Q8_1` adds `d·Σq` per block, which `Q4_1`'s offset needs), or blocks of 256 with
//! sums per 16 values (`Q8_K`, for the K-quants). The dot products have a portable scalar path
//! and an AVX2+FMA+F16C path picked once at runtime. Every dot product adds its terms in one fixed
//! order, so a given weight row and activation row always give the same bits.

use std::sync::OnceLock;

use half::{bf16, f16};

/// Values per block of the 32-value formats.
const QK: usize = 32;
/// Values per super-block of the K-quants.
const QK_K: usize = 256;

/// GGML type ids as they appear in GGUF tensor infos.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[allow(non_camel_case_types)]
pub enum GgmlType {
    F32,
    F16,
    BF16,
    Q4_0,
    Q4_1,
    Q8_0,
    Q4_K,
    Q6_K,
}

impl GgmlType {
    /// From the GGUF type id, None for types the engine does not load.
    pub fn from_id(id: u32) -> Option<Self> {
        Some(match id {
            0 => GgmlType::F32,
            1 => GgmlType::F16,
            2 => GgmlType::Q4_0,
            3 => GgmlType::Q4_1,
            8 => GgmlType::Q8_0,
            12 => GgmlType::Q4_K,
            14 => GgmlType::Q6_K,
            30 => GgmlType::BF16,
            _ => return None,
        })
    }

    /// The GGUF type id (inverse of [`GgmlType::from_id`]).
    pub fn id(self) -> u32 {
        match self {
            GgmlType::F32 => 0,
            GgmlType::F16 => 1,
            GgmlType::Q4_0 => 2,
            GgmlType::Q4_1 => 3,
            GgmlType::Q8_0 => 8,
            GgmlType::Q4_K => 12,
            GgmlType::Q6_K => 14,
            GgmlType::BF16 => 30,
        }
    }

    /// Values per block.
    pub fn block_len(self) -> usize {
        match self {
            GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => 1,
            GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q8_0 => 32,
            GgmlType::Q4_K | GgmlType::Q6_K => 256,
        }
    }

    /// Bytes per block.
    pub fn block_bytes(self) -> usize {
        match self {
            GgmlType::F32 => 4,
            GgmlType::F16 | GgmlType::BF16 => 2,
            GgmlType::Q4_0 => 18,
            GgmlType::Q4_1 => 20,
            GgmlType::Q8_0 => 34,
            GgmlType::Q4_K => 144,
            GgmlType::Q6_K => 210,
        }
    }

    /// Bytes taken by `n` values (n must be a multiple of the block length).
    pub fn bytes_for(self, n: usize) -> usize {
        n / self.block_len() * self.block_bytes()
    }

    pub fn is_quantized(self) -> bool {
        self.block_len() > 1
    }

    /// The activation format this weight type's dot product consumes; None for float types,
    /// which multiply f32 activations directly.
    pub fn act_format(self) -> Option<ActFormat> {
        match self {
            GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => None,
            GgmlType::Q4_0 | GgmlType::Q8_0 => Some(ActFormat::Q8_0),
            GgmlType::Q4_1 => Some(ActFormat::Q8_1),
            GgmlType::Q4_K | GgmlType::Q6_K => Some(ActFormat::Q8_K),
        }
    }
}

#[inline(always)]
fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

/// Round to nearest (ties to even) for |v| < 2^22 without a libm call, so quantisation loops
/// vectorise.
#[inline(always)]
fn round_small(v: f32) -> f32 {
    const MAGIC: f32 = 12_582_912.0; // 1.5 · 2^23
    (v + MAGIC) - MAGIC
}

/// The eight 6-bit scales and eight 6-bit mins of a Q4_K super-block, unpacked from 12 bytes.
#[inline(always)]
fn q4k_scales_mins(packed: &[u8]) -> ([u8; 8], [u8; 8]) {
    let mut sc = [0u8; 8];
    let mut mn = [0u8; 8];
    for j in 0..8 {
        if j < 4 {
            sc[j] = packed[j] & 63;
            mn[j] = packed[j + 4] & 63;
        } else {
            sc[j] = (packed[j + 4] & 0x0F) | ((packed[j - 4] >> 6) << 4);
            mn[j] = (packed[j + 4] >> 4) | ((packed[j] >> 6) << 4);
        }
    }
    (sc, mn)
}

/// The 256 unsigned 6-bit values (0..64) of a Q6_K super-block, in value order.
#[inline(always)]
fn q6k_values(block: &[u8], out: &mut [u8; QK_K]) {
    let (ql_all, rest) = block.split_at(128);
    let qh_all = &rest[..64];
    for half in 0..2 {
        let ql = &ql_all[half * 64..];
        let qh = &qh_all[half * 32..];
        let y = &mut out[half * 128..];
        for l in 0..32 {
            y[l] = (ql[l] & 0x0F) | ((qh[l] & 3) << 4);
            y[l + 32] = (ql[l + 32] & 0x0F) | (((qh[l] >> 2) & 3) << 4);
            y[l + 64] = (ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4);
            y[l + 96] = (ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4);
        }
    }
}

/// Dequantise `out.len()` values of type `ty` from `bytes` into `out`.
///
/// Panics when `out.len()` is not a whole number of blocks or `bytes` is too short: both are
/// caller bugs (loaders validate tensor sizes).
pub fn dequantize(ty: GgmlType, bytes: &[u8], out: &mut [f32]) {
    assert_eq!(out.len() % ty.block_len(), 0, "{ty:?}: partial block");
    let need = ty.bytes_for(out.len());
    assert!(
        bytes.len() >= need,
        "{ty:?}: {} bytes for {need}",
        bytes.len()
    );
    let bytes = &bytes[..need];
    let bb = ty.block_bytes();
    match ty {
        GgmlType::F32 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            }
        }
        GgmlType::F16 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = f16::from_le_bytes([c[0], c[1]]).to_f32();
            }
        }
        GgmlType::BF16 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = bf16::from_le_bytes([c[0], c[1]]).to_f32();
            }
        }
        GgmlType::Q4_0 => {
            for (o, b) in out.chunks_exact_mut(QK).zip(bytes.chunks_exact(bb)) {
                let d = f16_at(b, 0);
                for j in 0..16 {
                    o[j] = ((b[2 + j] & 0x0F) as i32 - 8) as f32 * d;
                    o[j + 16] = ((b[2 + j] >> 4) as i32 - 8) as f32 * d;
                }
            }
        }
        GgmlType::Q4_1 => {
            for (o, b) in out.chunks_exact_mut(QK).zip(bytes.chunks_exact(bb)) {
                let (d, m) = (f16_at(b, 0), f16_at(b, 2));
                for j in 0..16 {
                    o[j] = (b[4 + j] & 0x0F) as f32 * d + m;
                    o[j + 16] = (b[4 + j] >> 4) as f32 * d + m;
                }
            }
        }
        GgmlType::Q8_0 => {
            for (o, b) in out.chunks_exact_mut(QK).zip(bytes.chunks_exact(bb)) {
                let d = f16_at(b, 0);
                for j in 0..QK {
                    o[j] = b[2 + j] as i8 as f32 * d;
                }
            }
        }
        GgmlType::Q4_K => {
            for (o, b) in out.chunks_exact_mut(QK_K).zip(bytes.chunks_exact(bb)) {
                let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
                let (sc, mn) = q4k_scales_mins(&b[4..16]);
                for c in 0..4 {
                    let qs = &b[16 + 32 * c..16 + 32 * (c + 1)];
                    let (d1, m1) = (d * sc[2 * c] as f32, dmin * mn[2 * c] as f32);
                    let (d2, m2) = (d * sc[2 * c + 1] as f32, dmin * mn[2 * c + 1] as f32);
                    for l in 0..32 {
                        o[64 * c + l] = d1 * (qs[l] & 0x0F) as f32 - m1;
                        o[64 * c + 32 + l] = d2 * (qs[l] >> 4) as f32 - m2;
                    }
                }
            }
        }
        GgmlType::Q6_K => {
            let mut q = [0u8; QK_K];
            for (o, b) in out.chunks_exact_mut(QK_K).zip(bytes.chunks_exact(bb)) {
                let d = f16_at(b, 208);
                q6k_values(b, &mut q);
                for (i, (o, &q)) in o.iter_mut().zip(q.iter()).enumerate() {
                    *o = d * (b[192 + i / 16] as i8) as f32 * (q as i32 - 32) as f32;
                }
            }
        }
    }
}

/// Quantise `values` to `ty` with round-to-nearest (enough to build synthetic models and test
/// the kernels; not the importance-weighted search llama.cpp's quantiser does).
///
/// Panics when `values.len()` is not a whole number of blocks.
pub fn quantize(ty: GgmlType, values: &[f32]) -> Vec<u8> {
    assert_eq!(values.len() % ty.block_len(), 0, "{ty:?}: partial block");
    let mut out = Vec::with_capacity(ty.bytes_for(values.len()));
    match ty {
        GgmlType::F32 => values
            .iter()
            .for_each(|v| out.extend_from_slice(&v.to_le_bytes())),
        GgmlType::F16 => values
            .iter()
            .for_each(|v| out.extend_from_slice(&f16::from_f32(*v).to_le_bytes())),
        GgmlType::BF16 => values
            .iter()
            .for_each(|v| out.extend_from_slice(&bf16::from_f32(*v).to_le_bytes())),
        GgmlType::Q4_0 => values
            .chunks_exact(QK)
            .for_each(|x| quantize_q4_0(x, &mut out)),
        GgmlType::Q4_1 => values
            .chunks_exact(QK)
            .for_each(|x| quantize_q4_1(x, &mut out)),
        GgmlType::Q8_0 => values
            .chunks_exact(QK)
            .for_each(|x| quantize_q8_0(x, &mut out)),
        GgmlType::Q4_K => values
            .chunks_exact(QK_K)
            .for_each(|x| quantize_q4_k(x, &mut out)),
        GgmlType::Q6_K => values
            .chunks_exact(QK_K)
            .for_each(|x| quantize_q6_k(x, &mut out)),
    }
    out
}

/// `1/d`, or 0 for an all-zero block (whose codes then all land on the zero point).
fn inverse(d: f32) -> f32 {
    if d == 0.0 {
        0.0
    } else {
        1.0 / d
    }
}

fn quantize_q4_0(x: &[f32], out: &mut Vec<u8>) {
    // The value of largest magnitude maps to code 0 (−8·d), so the full 16 levels are used.
    let max = x
        .iter()
        .fold(0.0f32, |m, &v| if v.abs() > m.abs() { v } else { m });
    let d = f16::from_f32(max / -8.0);
    let id = inverse(d.to_f32());
    out.extend_from_slice(&d.to_le_bytes());
    let q = |v: f32| (round_small(v * id) + 8.0).clamp(0.0, 15.0) as u8;
    for j in 0..16 {
        out.push(q(x[j]) | (q(x[j + 16]) << 4));
    }
}

fn quantize_q4_1(x: &[f32], out: &mut Vec<u8>) {
    let min = x.iter().copied().fold(f32::INFINITY, f32::min);
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let d = f16::from_f32((max - min) / 15.0);
    let m = f16::from_f32(min);
    // Codes come from the f16-rounded scale and offset the dequantiser will use.
    let (df, mf) = (d.to_f32(), m.to_f32());
    let id = inverse(df);
    out.extend_from_slice(&d.to_le_bytes());
    out.extend_from_slice(&m.to_le_bytes());
    let q = |v: f32| round_small((v - mf) * id).clamp(0.0, 15.0) as u8;
    for j in 0..16 {
        out.push(q(x[j]) | (q(x[j + 16]) << 4));
    }
}

fn quantize_q8_0(x: &[f32], out: &mut Vec<u8>) {
    let amax = x.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let d = f16::from_f32(amax / 127.0);
    let id = inverse(d.to_f32());
    out.extend_from_slice(&d.to_le_bytes());
    for &v in x {
        out.push(round_small(v * id).clamp(-127.0, 127.0) as i8 as u8);
    }
}

fn quantize_q4_k(x: &[f32], out: &mut Vec<u8>) {
    // Per sub-block of 32: an offset (min ≤ 0, stored as a positive 6-bit multiple of dmin) and a
    // step (6-bit multiple of d). Scales and mins are rounded up so every value stays in range.
    let mut steps = [0.0f32; 8];
    let mut offsets = [0.0f32; 8];
    for (j, sub) in x.chunks_exact(32).enumerate() {
        let min = sub.iter().copied().fold(0.0f32, f32::min);
        let max = sub.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        steps[j] = (max - min) / 15.0;
        offsets[j] = -min;
    }
    let d = f16::from_f32(steps.iter().copied().fold(0.0, f32::max) / 63.0);
    let dmin = f16::from_f32(offsets.iter().copied().fold(0.0, f32::max) / 63.0);
    let (df, dminf) = (d.to_f32(), dmin.to_f32());
    let six_bits = |v: f32, unit: f32| (v * inverse(unit)).ceil().clamp(0.0, 63.0) as u8;
    let sc: [u8; 8] = std::array::from_fn(|j| six_bits(steps[j], df));
    let mn: [u8; 8] = std::array::from_fn(|j| six_bits(offsets[j], dminf));
    let mut packed = [0u8; 12];
    for j in 0..4 {
        packed[j] = sc[j] | ((sc[j + 4] >> 4) << 6);
        packed[j + 4] = mn[j] | ((mn[j + 4] >> 4) << 6);
        packed[j + 8] = (sc[j + 4] & 0x0F) | ((mn[j + 4] & 0x0F) << 4);
    }
    out.extend_from_slice(&d.to_le_bytes());
    out.extend_from_slice(&dmin.to_le_bytes());
    out.extend_from_slice(&packed);
    let codes: [u8; QK_K] = std::array::from_fn(|i| {
        let j = i / 32;
        let step = df * sc[j] as f32;
        let offset = dminf * mn[j] as f32;
        round_small((x[i] + offset) * inverse(step)).clamp(0.0, 15.0) as u8
    });
    for c in 0..4 {
        for l in 0..32 {
            out.push(codes[64 * c + l] | (codes[64 * c + 32 + l] << 4));
        }
    }
}

fn quantize_q6_k(x: &[f32], out: &mut Vec<u8>) {
    // Symmetric per 16 values: codes −31..=31 around 32; the int8 scales are rounded up so the
    // largest value never clips.
    let steps: [f32; 16] = std::array::from_fn(|j| {
        x[16 * j..16 * (j + 1)]
            .iter()
            .fold(0.0f32, |m, v| m.max(v.abs()))
            / 31.0
    });
    let d = f16::from_f32(steps.iter().copied().fold(0.0, f32::max) / 127.0);
    let df = d.to_f32();
    let sc: [i8; 16] =
        std::array::from_fn(|j| (steps[j] * inverse(df)).ceil().clamp(0.0, 127.0) as i8);
    let codes: [u8; QK_K] = std::array::from_fn(|i| {
        let step = df * sc[i / 16] as f32;
        (round_small(x[i] * inverse(step)).clamp(-32.0, 31.0) as i32 + 32) as u8
    });
    let mut ql = [0u8; 128];
    let mut qh = [0u8; 64];
    for half in 0..2 {
        let q = &codes[128 * half..];
        for l in 0..32 {
            ql[64 * half + l] = (q[l] & 0x0F) | ((q[l + 64] & 0x0F) << 4);
            ql[64 * half + l + 32] = (q[l + 32] & 0x0F) | ((q[l + 96] & 0x0F) << 4);
            qh[32 * half + l] = (q[l] >> 4)
                | ((q[l + 32] >> 4) << 2)
                | ((q[l + 64] >> 4) << 4)
                | ((q[l + 96] >> 4) << 6);
        }
    }
    out.extend_from_slice(&ql);
    out.extend_from_slice(&qh);
    out.extend(sc.iter().map(|&s| s as u8));
    out.extend_from_slice(&d.to_le_bytes());
}

/// How activations are quantised for a weight type's dot product.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[allow(non_camel_case_types)]
pub enum ActFormat {
    /// Blocks of 32 int8 with an f32 scale (for Q4_0, Q8_0).
    Q8_0,
    /// Q8_0 plus `d·Σq` per block (for Q4_1, whose offset multiplies the block sum).
    Q8_1,
    /// Blocks of 256 int8 with an f32 scale and the sum of every 16 codes (for Q4_K, Q6_K).
    Q8_K,
}

impl ActFormat {
    pub fn block_len(self) -> usize {
        match self {
            ActFormat::Q8_0 | ActFormat::Q8_1 => QK,
            ActFormat::Q8_K => QK_K,
        }
    }
}

/// `rows` activation rows of `cols` values quantised to 8 bits, one scale per block.
#[derive(Debug, Clone)]
pub struct QuantizedActs {
    pub format: ActFormat,
    pub rows: usize,
    pub cols: usize,
    qs: Vec<i8>,
    scales: Vec<f32>,
    /// Q8_1: `d·Σq` per block.
    sums: Vec<f32>,
    /// Q8_K: the sum of each 16 codes.
    bsums: Vec<i16>,
    /// The sum of each block's codes.
    block_sums: Vec<i32>,
}

/// One quantised activation row, as the dot products read it.
#[derive(Debug, Clone, Copy)]
pub struct ActRow<'a> {
    pub qs: &'a [i8],
    pub scales: &'a [f32],
    pub sums: &'a [f32],
    pub bsums: &'a [i16],
}

impl QuantizedActs {
    /// Quantise `rows` rows of `cols` values (`x.len() == rows * cols`; `cols` a multiple of the
    /// format's block length). Each row is quantised on its own, so a row's codes do not depend
    /// on its neighbours in a batch.
    pub fn quantize(format: ActFormat, x: &[f32], rows: usize, cols: usize) -> Self {
        assert_eq!(x.len(), rows * cols, "activation shape");
        let bl = format.block_len();
        assert_eq!(
            cols % bl,
            0,
            "{format:?}: {cols} columns is not whole blocks"
        );
        let blocks = rows * cols / bl;
        let mut acts = QuantizedActs {
            format,
            rows,
            cols,
            qs: vec![0; rows * cols],
            scales: vec![0.0; blocks],
            sums: if format == ActFormat::Q8_1 {
                vec![0.0; blocks]
            } else {
                Vec::new()
            },
            bsums: if format == ActFormat::Q8_K {
                vec![0; blocks * 16]
            } else {
                Vec::new()
            },
            block_sums: vec![0; blocks],
        };
        quantize_blocks(x, bl, &mut acts.qs, &mut acts.scales, &mut acts.block_sums);
        for (b, qb) in acts.qs.chunks_exact(bl).enumerate() {
            let (d, sum) = (acts.scales[b], acts.block_sums[b]);
            match format {
                ActFormat::Q8_0 => {}
                ActFormat::Q8_1 => acts.sums[b] = d * sum as f32,
                ActFormat::Q8_K => {
                    for (s, q16) in acts.bsums[16 * b..16 * (b + 1)]
                        .iter_mut()
                        .zip(qb.chunks(16))
                    {
                        *s = q16.iter().map(|&q| q as i16).sum();
                    }
                }
            }
        }
        acts
    }

    /// Each block's code sum, all rows' blocks in order.
    pub(crate) fn code_sums(&self) -> &[i32] {
        &self.block_sums
    }

    /// Row `i`.
    pub fn row(&self, i: usize) -> ActRow<'_> {
        let bpr = self.cols / self.format.block_len();
        ActRow {
            qs: &self.qs[i * self.cols..(i + 1) * self.cols],
            scales: &self.scales[i * bpr..(i + 1) * bpr],
            sums: if self.sums.is_empty() {
                &[]
            } else {
                &self.sums[i * bpr..(i + 1) * bpr]
            },
            bsums: if self.bsums.is_empty() {
                &[]
            } else {
                &self.bsums[16 * i * bpr..16 * (i + 1) * bpr]
            },
        }
    }
}

/// Quantise each `bl`-value block of `x` to int8 codes with scale `amax/127`, recording each
/// block's scale and code sum. Every operation is exact or correctly rounded IEEE arithmetic, so
/// the AVX-512/AVX2 builds of the same loop (picked at runtime; the baseline build only has
/// SSE2) give the same codes.
fn quantize_blocks(x: &[f32], bl: usize, qs: &mut [i8], scales: &mut [f32], sums: &mut [i32]) {
    #[inline(always)]
    fn blocks(x: &[f32], bl: usize, qs: &mut [i8], scales: &mut [f32], sums: &mut [i32]) {
        for (((xb, qb), d_out), sum_out) in x
            .chunks_exact(bl)
            .zip(qs.chunks_exact_mut(bl))
            .zip(scales.iter_mut())
            .zip(sums.iter_mut())
        {
            let amax = xb.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            let d = amax / 127.0;
            let id = inverse(d);
            let mut sum = 0i32;
            for (q, &v) in qb.iter_mut().zip(xb) {
                *q = round_small(v * id) as i32 as i8;
                sum += *q as i32;
            }
            *d_out = d;
            *sum_out = sum;
        }
    }
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    unsafe fn blocks_avx512(x: &[f32], bl: usize, q: &mut [i8], d: &mut [f32], s: &mut [i32]) {
        blocks(x, bl, q, d, s)
    }
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    unsafe fn blocks_avx2(x: &[f32], bl: usize, q: &mut [i8], d: &mut [f32], s: &mut [i32]) {
        blocks(x, bl, q, d, s)
    }
    match detected_isa() {
        // SAFETY: the ISA was detected at runtime.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => unsafe { blocks_avx512(x, bl, qs, scales, sums) },
        // SAFETY: as above.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => unsafe { blocks_avx2(x, bl, qs, scales, sums) },
        Isa::Scalar => blocks(x, bl, qs, scales, sums),
    }
}

/// A quantised weight row · quantised activation row.
pub type QuantDot = fn(&[u8], &ActRow<'_>) -> f32;
/// One quantised weight row · up to [`MULTI_ROWS`] activation rows (`out[r]` for `xs[r]`),
/// bit-identical to [`QuantDot`] on each row.
pub type QuantDotMulti = fn(&[u8], &[ActRow<'_>], &mut [f32]);
/// Activation rows a [`QuantDotMulti`] kernel takes at once.
pub const MULTI_ROWS: usize = 8;
/// A float (F32/F16/BF16) weight row · f32 activation row.
pub type FloatDot = fn(&[u8], &[f32]) -> f32;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Isa {
    Scalar,
    #[cfg(target_arch = "x86_64")]
    Avx2,
    /// AVX2 plus AVX-512 F/BW/VL/VNNI: Q4_1 (the bulk of Q4_1 GGUF models) gets 512-bit kernels
    /// with `vpdpbusd`; other types keep their AVX2 kernels.
    #[cfg(target_arch = "x86_64")]
    Avx512,
}

fn detected_isa() -> Isa {
    static ISA: OnceLock<Isa> = OnceLock::new();
    *ISA.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        if is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("f16c")
        {
            if is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("avx512bw")
                && is_x86_feature_detected!("avx512vl")
                && is_x86_feature_detected!("avx512vnni")
            {
                return Isa::Avx512;
            }
            return Isa::Avx2;
        }
        Isa::Scalar
    })
}

/// Whether the AVX-512 VNNI kernels (and [`crate::panel`]'s weight panels) are in use.
pub(crate) fn has_avx512_vnni() -> bool {
    #[cfg(target_arch = "x86_64")]
    if detected_isa() == Isa::Avx512 {
        return true;
    }
    false
}

/// Whether the SIMD kernels are in use on this machine (benchmarks and tests report it).
pub fn simd_name() -> &'static str {
    match detected_isa() {
        Isa::Scalar => "scalar",
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => "avx2+fma+f16c",
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => "avx512-vnni (Q4_1) + avx2",
    }
}

/// The dot product for quantised weights of type `ty` (None for float types). Fetch it once per
/// matrix product: the choice of kernel is fixed for the process, so results are reproducible.
pub fn quant_dot(ty: GgmlType) -> Option<QuantDot> {
    quant_dot_for(ty, detected_isa())
}

fn quant_dot_for(ty: GgmlType, isa: Isa) -> Option<QuantDot> {
    #[cfg(target_arch = "x86_64")]
    if isa == Isa::Avx512 && ty == GgmlType::Q4_1 {
        return Some(avx512::q4_1);
    }
    #[cfg(target_arch = "x86_64")]
    if isa == Isa::Avx2 || isa == Isa::Avx512 {
        return Some(match ty {
            GgmlType::Q4_0 => avx2::q4_0,
            GgmlType::Q4_1 => avx2::q4_1,
            GgmlType::Q8_0 => avx2::q8_0,
            GgmlType::Q4_K => avx2::q4_k,
            GgmlType::Q6_K => avx2::q6_k,
            GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => return None,
        });
    }
    let _ = isa;
    Some(match ty {
        GgmlType::Q4_0 => scalar::q4_0,
        GgmlType::Q4_1 => scalar::q4_1,
        GgmlType::Q8_0 => scalar::q8_0,
        GgmlType::Q4_K => scalar::q4_k,
        GgmlType::Q6_K => scalar::q6_k,
        GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => return None,
    })
}

/// A kernel that multiplies one weight row of type `ty` with several activation rows at once
/// (unpacking each block once and interleaving the rows' accumulator chains), when there is one
/// for this type and machine.
pub fn quant_dot_multi(ty: GgmlType) -> Option<QuantDotMulti> {
    #[cfg(target_arch = "x86_64")]
    if detected_isa() == Isa::Avx512 && ty == GgmlType::Q4_1 {
        return Some(avx512::q4_1_multi);
    }
    #[cfg(target_arch = "x86_64")]
    if matches!(detected_isa(), Isa::Avx2 | Isa::Avx512) {
        return match ty {
            GgmlType::Q4_1 => Some(avx2::q4_1_multi),
            GgmlType::Q8_0 => Some(avx2::q8_0_multi),
            _ => None,
        };
    }
    let _ = ty;
    None
}

/// The dot product for float weights of type `ty` with f32 activations (None for quantised
/// types).
pub fn float_dot(ty: GgmlType) -> Option<FloatDot> {
    float_dot_for(ty, detected_isa())
}

fn float_dot_for(ty: GgmlType, isa: Isa) -> Option<FloatDot> {
    #[cfg(target_arch = "x86_64")]
    if isa == Isa::Avx2 || isa == Isa::Avx512 {
        return Some(match ty {
            GgmlType::F32 => avx2::f32_row,
            GgmlType::F16 => avx2::f16_row,
            GgmlType::BF16 => avx2::bf16_row,
            _ => return None,
        });
    }
    let _ = isa;
    Some(match ty {
        GgmlType::F32 => scalar::f32_row,
        GgmlType::F16 => scalar::f16_row,
        GgmlType::BF16 => scalar::bf16_row,
        _ => return None,
    })
}

/// Weight row (`w`, in `ty`'s blocks) · quantised activation row. Panics for float types.
pub fn vec_dot(ty: GgmlType, w: &[u8], x: &ActRow<'_>) -> f32 {
    quant_dot(ty).expect("vec_dot needs a quantised weight type")(w, x)
}

/// Weight row (`w`, F32/F16/BF16) · f32 row. Panics for quantised types.
pub fn vec_dot_f32(ty: GgmlType, w: &[u8], x: &[f32]) -> f32 {
    float_dot(ty).expect("vec_dot_f32 needs a float weight type")(w, x)
}

/// [`check_lens`] for every row of a multi-row Q4_1 product, plus the Q8_1 sums it reads.
#[cfg(target_arch = "x86_64")]
fn check_q4_1_rows(w: &[u8], xs: &[ActRow<'_>], out: &[f32]) {
    for x in xs {
        check_lens(w, x, 20, QK);
        assert_eq!(x.sums.len(), x.scales.len(), "Q4_1 needs Q8_1 activations");
    }
    assert_eq!(out.len(), xs.len(), "one output per activation row");
}

/// Length checks shared by both kernel sets; the SIMD kernels rely on them for their unchecked
/// loads.
#[inline(always)]
fn check_lens(w: &[u8], x: &ActRow<'_>, block_bytes: usize, block_len: usize) -> usize {
    let nb = x.scales.len();
    assert_eq!(w.len(), nb * block_bytes, "weight row length");
    assert_eq!(x.qs.len(), nb * block_len, "activation row length");
    nb
}

/// Portable kernels: exact integer sums per block, then one f32 term per block.
mod scalar {
    use super::*;

    pub(super) fn q4_0(w: &[u8], x: &ActRow<'_>) -> f32 {
        check_lens(w, x, 18, QK);
        let mut sumf = 0.0f32;
        for (i, b) in w.chunks_exact(18).enumerate() {
            let q = &x.qs[QK * i..QK * (i + 1)];
            let mut sumi = 0i32;
            for j in 0..16 {
                sumi += ((b[2 + j] & 0x0F) as i32 - 8) * q[j] as i32;
                sumi += ((b[2 + j] >> 4) as i32 - 8) * q[j + 16] as i32;
            }
            sumf += f16_at(b, 0) * x.scales[i] * sumi as f32;
        }
        sumf
    }

    pub(super) fn q4_1(w: &[u8], x: &ActRow<'_>) -> f32 {
        check_lens(w, x, 20, QK);
        assert_eq!(x.sums.len(), x.scales.len(), "Q4_1 needs Q8_1 activations");
        let mut sumf = 0.0f32;
        for (i, b) in w.chunks_exact(20).enumerate() {
            let q = &x.qs[QK * i..QK * (i + 1)];
            let mut sumi = 0i32;
            for j in 0..16 {
                sumi += (b[4 + j] & 0x0F) as i32 * q[j] as i32;
                sumi += (b[4 + j] >> 4) as i32 * q[j + 16] as i32;
            }
            sumf += f16_at(b, 0) * x.scales[i] * sumi as f32 + f16_at(b, 2) * x.sums[i];
        }
        sumf
    }

    pub(super) fn q8_0(w: &[u8], x: &ActRow<'_>) -> f32 {
        check_lens(w, x, 34, QK);
        let mut sumf = 0.0f32;
        for (i, b) in w.chunks_exact(34).enumerate() {
            let q = &x.qs[QK * i..QK * (i + 1)];
            let sumi: i32 = b[2..]
                .iter()
                .zip(q)
                .map(|(&a, &q)| a as i8 as i32 * q as i32)
                .sum();
            sumf += f16_at(b, 0) * x.scales[i] * sumi as f32;
        }
        sumf
    }

    pub(super) fn q4_k(w: &[u8], x: &ActRow<'_>) -> f32 {
        check_lens(w, x, 144, QK_K);
        assert_eq!(
            x.bsums.len(),
            16 * x.scales.len(),
            "Q4_K needs Q8_K activations"
        );
        let mut sumf = 0.0f32;
        for (i, b) in w.chunks_exact(144).enumerate() {
            let (sc, mn) = q4k_scales_mins(&b[4..16]);
            let q = &x.qs[QK_K * i..QK_K * (i + 1)];
            let bs = &x.bsums[16 * i..16 * (i + 1)];
            let mut sumi = 0i32;
            for c in 0..4 {
                let qs = &b[16 + 32 * c..16 + 32 * (c + 1)];
                let (mut lo, mut hi) = (0i32, 0i32);
                for l in 0..32 {
                    lo += (qs[l] & 0x0F) as i32 * q[64 * c + l] as i32;
                    hi += (qs[l] >> 4) as i32 * q[64 * c + 32 + l] as i32;
                }
                sumi += sc[2 * c] as i32 * lo + sc[2 * c + 1] as i32 * hi;
            }
            let mins: i32 = (0..8)
                .map(|j| mn[j] as i32 * (bs[2 * j] as i32 + bs[2 * j + 1] as i32))
                .sum();
            sumf += f16_at(b, 0) * x.scales[i] * sumi as f32;
            sumf -= f16_at(b, 2) * x.scales[i] * mins as f32;
        }
        sumf
    }

    pub(super) fn q6_k(w: &[u8], x: &ActRow<'_>) -> f32 {
        check_lens(w, x, 210, QK_K);
        let mut vals = [0u8; QK_K];
        let mut sumf = 0.0f32;
        for (i, b) in w.chunks_exact(210).enumerate() {
            q6k_values(b, &mut vals);
            let q = &x.qs[QK_K * i..QK_K * (i + 1)];
            let mut sumi = 0i32;
            for g in 0..16 {
                let s: i32 = (16 * g..16 * (g + 1))
                    .map(|k| (vals[k] as i32 - 32) * q[k] as i32)
                    .sum();
                sumi += b[192 + g] as i8 as i32 * s;
            }
            sumf += f16_at(b, 208) * x.scales[i] * sumi as f32;
        }
        sumf
    }

    /// Eight partial sums (lane j takes elements ≡ j mod 8), then a fixed pairwise reduction:
    /// the same shape as the SIMD kernel, and a loop LLVM can vectorise.
    #[inline(always)]
    fn lanes8(n: usize, x: &[f32], w: impl Fn(usize) -> f32) -> f32 {
        assert_eq!(x.len(), n, "activation row length");
        let mut acc = [0.0f32; 8];
        let body = n / 8 * 8;
        for k in (0..body).step_by(8) {
            for (l, a) in acc.iter_mut().enumerate() {
                *a += w(k + l) * x[k + l];
            }
        }
        let mut sum =
            ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
        for (k, &xk) in x.iter().enumerate().skip(body) {
            sum += w(k) * xk;
        }
        sum
    }

    pub(super) fn f32_row(w: &[u8], x: &[f32]) -> f32 {
        lanes8(w.len() / 4, x, |k| {
            f32::from_le_bytes([w[4 * k], w[4 * k + 1], w[4 * k + 2], w[4 * k + 3]])
        })
    }

    pub(super) fn f16_row(w: &[u8], x: &[f32]) -> f32 {
        lanes8(w.len() / 2, x, |k| {
            f16::from_le_bytes([w[2 * k], w[2 * k + 1]]).to_f32()
        })
    }

    pub(super) fn bf16_row(w: &[u8], x: &[f32]) -> f32 {
        lanes8(w.len() / 2, x, |k| {
            bf16::from_le_bytes([w[2 * k], w[2 * k + 1]]).to_f32()
        })
    }
}

/// AVX2 + FMA + F16C kernels, llama.cpp style: `maddubs` multiplies unsigned weight codes by
/// signed activation codes into i16 pairs, `madd` widens to i32, and each block's eight i32 lanes
/// are scaled into an f32 accumulator.
///
/// The public entry points are safe `fn`s so they fit [`QuantDot`]; they are only handed out by
/// [`quant_dot_for`]/[`float_dot_for`] after runtime detection found the features.
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::*;
    use std::arch::x86_64::*;

    pub(super) fn q4_0(w: &[u8], x: &ActRow<'_>) -> f32 {
        check_lens(w, x, 18, QK);
        // SAFETY: features detected before this kernel was handed out; lengths checked above.
        unsafe { q4_0_impl(w, x) }
    }
    pub(super) fn q4_1(w: &[u8], x: &ActRow<'_>) -> f32 {
        check_lens(w, x, 20, QK);
        assert_eq!(x.sums.len(), x.scales.len(), "Q4_1 needs Q8_1 activations");
        let mut out = [0.0f32];
        // SAFETY: as for q4_0.
        unsafe { q4_1_rows::<1>(w, std::slice::from_ref(x), &mut out) };
        out[0]
    }
    pub(super) fn q8_0(w: &[u8], x: &ActRow<'_>) -> f32 {
        check_lens(w, x, 34, QK);
        let mut out = [0.0f32];
        // SAFETY: as for q4_0.
        unsafe { q8_0_rows::<1>(w, std::slice::from_ref(x), &mut out) };
        out[0]
    }
    pub(super) fn q4_1_multi(w: &[u8], xs: &[ActRow<'_>], out: &mut [f32]) {
        check_q4_1_rows(w, xs, out);
        // SAFETY: as for q4_0 (every row's lengths checked).
        unsafe {
            match xs.len() {
                1 => q4_1_rows::<1>(w, xs, out),
                2 => q4_1_rows::<2>(w, xs, out),
                3 => q4_1_rows::<3>(w, xs, out),
                4 => q4_1_rows::<4>(w, xs, out),
                n if n <= MULTI_ROWS => {
                    // Sixteen ymm registers hold four rows' accumulators; more rows go in fours.
                    q4_1_rows::<4>(w, &xs[..4], &mut out[..4]);
                    q4_1_multi(w, &xs[4..], &mut out[4..]);
                }
                n => panic!("q4_1_multi takes 1..={MULTI_ROWS} rows, got {n}"),
            }
        }
    }
    pub(super) fn q8_0_multi(w: &[u8], xs: &[ActRow<'_>], out: &mut [f32]) {
        for x in xs {
            check_lens(w, x, 34, QK);
        }
        assert_eq!(out.len(), xs.len(), "one output per activation row");
        // SAFETY: as for q4_0 (every row's lengths checked).
        unsafe {
            match xs.len() {
                1 => q8_0_rows::<1>(w, xs, out),
                2 => q8_0_rows::<2>(w, xs, out),
                3 => q8_0_rows::<3>(w, xs, out),
                4 => q8_0_rows::<4>(w, xs, out),
                n if n <= MULTI_ROWS => {
                    q8_0_rows::<4>(w, &xs[..4], &mut out[..4]);
                    q8_0_multi(w, &xs[4..], &mut out[4..]);
                }
                n => panic!("q8_0_multi takes 1..={MULTI_ROWS} rows, got {n}"),
            }
        }
    }
    pub(super) fn q4_k(w: &[u8], x: &ActRow<'_>) -> f32 {
        check_lens(w, x, 144, QK_K);
        assert_eq!(
            x.bsums.len(),
            16 * x.scales.len(),
            "Q4_K needs Q8_K activations"
        );
        // SAFETY: as for q4_0.
        unsafe { q4_k_impl(w, x) }
    }
    pub(super) fn q6_k(w: &[u8], x: &ActRow<'_>) -> f32 {
        check_lens(w, x, 210, QK_K);
        // SAFETY: as for q4_0.
        unsafe { q6_k_impl(w, x) }
    }
    pub(super) fn f32_row(w: &[u8], x: &[f32]) -> f32 {
        assert_eq!(w.len(), 4 * x.len(), "weight row length");
        // SAFETY: as for q4_0.
        unsafe { float_impl::<4>(w, x) }
    }
    pub(super) fn f16_row(w: &[u8], x: &[f32]) -> f32 {
        assert_eq!(w.len(), 2 * x.len(), "weight row length");
        // SAFETY: as for q4_0.
        unsafe { float_impl::<2>(w, x) }
    }
    pub(super) fn bf16_row(w: &[u8], x: &[f32]) -> f32 {
        assert_eq!(w.len(), 2 * x.len(), "weight row length");
        // SAFETY: as for q4_0.
        unsafe { float_impl::<3>(w, x) }
    }

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)))
    }

    /// Two consecutive f16 values at `p` as f32 (lanes 0 and 1).
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn f16x2(p: *const u8) -> (f32, f32) {
        let v = _mm_cvtph_ps(_mm_cvtsi32_si128((p as *const i32).read_unaligned()));
        (_mm_cvtss_f32(v), _mm_cvtss_f32(_mm_movehdup_ps(v)))
    }

    /// `d_w · d_x` in all lanes, `d_w` the f16 at `p`. Built with a broadcast rather than a
    /// scalar convert: LLVM lowers the scalar form to an insert into a live register (often the
    /// accumulator), which chains every block behind the previous block's FMA.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn scale(p: *const u8, dx: f32) -> __m256 {
        let dw = _mm256_cvtph_ps(_mm_set1_epi16((p as *const i16).read_unaligned()));
        _mm256_mul_ps(dw, _mm256_set1_ps(dx))
    }

    /// 16 bytes of nibbles → 32 bytes: low nibbles in the low lane, high nibbles in the high lane
    /// (the value order of the 32-value blocks).
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn nibbles(p: *const u8) -> __m256i {
        let t = _mm_loadu_si128(p as *const __m128i);
        _mm256_and_si256(
            _mm256_set_m128i(_mm_srli_epi16::<4>(t), t),
            _mm256_set1_epi8(0x0F),
        )
    }

    /// Σ of products of signed bytes, as 8 i32 lanes (sign moved onto `y` so `maddubs` sees an
    /// unsigned left operand; |x| ≤ 128 and |y| ≤ 127 cannot saturate the i16 pairs).
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn dot_i8(x: __m256i, y: __m256i) -> __m256i {
        let p = _mm256_maddubs_epi16(_mm256_sign_epi8(x, x), _mm256_sign_epi8(y, x));
        _mm256_madd_epi16(p, _mm256_set1_epi16(1))
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn q4_0_impl(w: &[u8], x: &ActRow<'_>) -> f32 {
        let mut acc = _mm256_setzero_ps();
        for i in 0..x.scales.len() {
            let b = w.as_ptr().add(18 * i);
            let d = scale(b, *x.scales.get_unchecked(i));
            let bx = _mm256_sub_epi8(nibbles(b.add(2)), _mm256_set1_epi8(8));
            let by = _mm256_loadu_si256(x.qs.as_ptr().add(QK * i) as *const __m256i);
            acc = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(dot_i8(bx, by)), acc);
        }
        hsum(acc)
    }

    /// Q4_1 row · R activation rows. Each block's nibbles and scales are unpacked once for all
    /// rows. Every row sums even blocks into one accumulator and odd blocks into another (two
    /// independent FMA chains instead of one latency-bound chain) and adds them at the end; the
    /// single-row entry point is R = 1, so a row's bits never depend on its batch neighbours.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn q4_1_rows<const R: usize>(w: &[u8], xs: &[ActRow<'_>], out: &mut [f32]) {
        let mut even = [_mm256_setzero_ps(); R];
        let mut odd = [_mm256_setzero_ps(); R];
        let mut even_offsets = [0.0f32; R];
        let mut odd_offsets = [0.0f32; R];
        let nb = xs[0].scales.len();
        let mut i = 0;
        while i + 1 < nb {
            q4_1_block::<R>(w, xs, i, &mut even, &mut even_offsets);
            q4_1_block::<R>(w, xs, i + 1, &mut odd, &mut odd_offsets);
            i += 2;
        }
        if i < nb {
            q4_1_block::<R>(w, xs, i, &mut even, &mut even_offsets);
        }
        for r in 0..R {
            *out.get_unchecked_mut(r) =
                hsum(_mm256_add_ps(even[r], odd[r])) + (even_offsets[r] + odd_offsets[r]);
        }
    }

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn q4_1_block<const R: usize>(
        w: &[u8],
        xs: &[ActRow<'_>],
        i: usize,
        acc: &mut [__m256; R],
        offsets: &mut [f32; R],
    ) {
        let b = w.as_ptr().add(20 * i);
        let (dw, mw) = f16x2(b);
        let codes = nibbles(b.add(4));
        for r in 0..R {
            let x = xs.get_unchecked(r);
            offsets[r] += mw * *x.sums.get_unchecked(i);
            let d = dw * *x.scales.get_unchecked(i);
            let by = _mm256_loadu_si256(x.qs.as_ptr().add(QK * i) as *const __m256i);
            let p = _mm256_madd_epi16(_mm256_maddubs_epi16(codes, by), _mm256_set1_epi16(1));
            acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(p), acc[r]);
        }
    }

    /// Q8_0 row · R activation rows, arranged as [`q4_1_rows`].
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn q8_0_rows<const R: usize>(w: &[u8], xs: &[ActRow<'_>], out: &mut [f32]) {
        let mut even = [_mm256_setzero_ps(); R];
        let mut odd = [_mm256_setzero_ps(); R];
        let nb = xs[0].scales.len();
        let mut i = 0;
        while i + 1 < nb {
            q8_0_block::<R>(w, xs, i, &mut even);
            q8_0_block::<R>(w, xs, i + 1, &mut odd);
            i += 2;
        }
        if i < nb {
            q8_0_block::<R>(w, xs, i, &mut even);
        }
        for r in 0..R {
            *out.get_unchecked_mut(r) = hsum(_mm256_add_ps(even[r], odd[r]));
        }
    }

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn q8_0_block<const R: usize>(
        w: &[u8],
        xs: &[ActRow<'_>],
        i: usize,
        acc: &mut [__m256; R],
    ) {
        let b = w.as_ptr().add(34 * i);
        let dw = _mm256_cvtph_ps(_mm_set1_epi16((b as *const i16).read_unaligned()));
        let bx = _mm256_loadu_si256(b.add(2) as *const __m256i);
        let abs_x = _mm256_sign_epi8(bx, bx);
        for (r, acc) in acc.iter_mut().enumerate() {
            let x = xs.get_unchecked(r);
            let d = _mm256_mul_ps(dw, _mm256_set1_ps(*x.scales.get_unchecked(i)));
            let by = _mm256_loadu_si256(x.qs.as_ptr().add(QK * i) as *const __m256i);
            let p = _mm256_madd_epi16(
                _mm256_maddubs_epi16(abs_x, _mm256_sign_epi8(by, bx)),
                _mm256_set1_epi16(1),
            );
            *acc = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(p), *acc);
        }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn q4_k_impl(w: &[u8], x: &ActRow<'_>) -> f32 {
        let mut acc = _mm256_setzero_ps();
        let mut mins_total = 0.0f32;
        let m4 = _mm256_set1_epi8(0x0F);
        for i in 0..x.scales.len() {
            let b = w.as_ptr().add(144 * i);
            let block = std::slice::from_raw_parts(b, 144);
            let (dw, dminw) = f16x2(b);
            let dx = *x.scales.get_unchecked(i);
            let (sc, mn) = q4k_scales_mins(&block[4..16]);
            let bs = x.bsums.get_unchecked(16 * i..16 * (i + 1));
            let mut mins = 0i32;
            for j in 0..8 {
                mins += mn[j] as i32 * (bs[2 * j] as i32 + bs[2 * j + 1] as i32);
            }
            mins_total += dminw * dx * mins as f32;
            let q8 = x.qs.as_ptr().add(QK_K * i);
            let mut sumi = _mm256_setzero_si256();
            for c in 0..4 {
                let bits = _mm256_loadu_si256(b.add(16 + 32 * c) as *const __m256i);
                let lo = _mm256_and_si256(bits, m4);
                let hi = _mm256_and_si256(_mm256_srli_epi16::<4>(bits), m4);
                let ylo = _mm256_loadu_si256(q8.add(64 * c) as *const __m256i);
                let yhi = _mm256_loadu_si256(q8.add(64 * c + 32) as *const __m256i);
                let plo = _mm256_madd_epi16(
                    _mm256_set1_epi16(sc[2 * c] as i16),
                    _mm256_maddubs_epi16(lo, ylo),
                );
                let phi = _mm256_madd_epi16(
                    _mm256_set1_epi16(sc[2 * c + 1] as i16),
                    _mm256_maddubs_epi16(hi, yhi),
                );
                sumi = _mm256_add_epi32(sumi, _mm256_add_epi32(plo, phi));
            }
            acc = _mm256_fmadd_ps(_mm256_set1_ps(dw * dx), _mm256_cvtepi32_ps(sumi), acc);
        }
        hsum(acc) - mins_total
    }

    /// The 2-bit field at `SHIFT` of each `qh` byte, moved to bits 4..6 (Q6_K's high bits).
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn high2<const SHIFT: i32>(qh: __m256i) -> __m256i {
        let field = _mm256_and_si256(_mm256_srli_epi16::<SHIFT>(qh), _mm256_set1_epi8(3));
        _mm256_slli_epi16::<4>(field)
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn q6_k_impl(w: &[u8], x: &ActRow<'_>) -> f32 {
        let mut acc = _mm256_setzero_ps();
        let m4 = _mm256_set1_epi8(0x0F);
        let m32 = _mm256_set1_epi8(32);
        for i in 0..x.scales.len() {
            let b = w.as_ptr().add(210 * i);
            let d = scale(b.add(208), *x.scales.get_unchecked(i));
            let sc = b.add(192) as *const i8;
            let q8 = x.qs.as_ptr().add(QK_K * i);
            let mut sumi = _mm256_setzero_si256();
            for half in 0..2 {
                let ql = b.add(64 * half);
                let qh = _mm256_loadu_si256(b.add(128 + 32 * half) as *const __m256i);
                let ql0 = _mm256_loadu_si256(ql as *const __m256i);
                let ql1 = _mm256_loadu_si256(ql.add(32) as *const __m256i);
                let codes = [
                    _mm256_or_si256(_mm256_and_si256(ql0, m4), high2::<0>(qh)),
                    _mm256_or_si256(_mm256_and_si256(ql1, m4), high2::<2>(qh)),
                    _mm256_or_si256(
                        _mm256_and_si256(_mm256_srli_epi16::<4>(ql0), m4),
                        high2::<4>(qh),
                    ),
                    _mm256_or_si256(
                        _mm256_and_si256(_mm256_srli_epi16::<4>(ql1), m4),
                        high2::<6>(qh),
                    ),
                ];
                for (k, code) in codes.into_iter().enumerate() {
                    let y = _mm256_loadu_si256(q8.add(128 * half + 32 * k) as *const __m256i);
                    // (code − 32)·y = code·y − 32·y, both through unsigned·signed maddubs.
                    let p = _mm256_sub_epi16(
                        _mm256_maddubs_epi16(code, y),
                        _mm256_maddubs_epi16(m32, y),
                    );
                    // i16 lanes 0..8 come from values 0..16 of these 32, lanes 8..16 from 16..32.
                    let g = 8 * half + 2 * k;
                    let s = _mm256_set_m128i(
                        _mm_set1_epi16(*sc.add(g + 1) as i16),
                        _mm_set1_epi16(*sc.add(g) as i16),
                    );
                    sumi = _mm256_add_epi32(sumi, _mm256_madd_epi16(s, p));
                }
            }
            acc = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(sumi), acc);
        }
        hsum(acc)
    }

    /// 8 f32 weights from `p`: `KIND` 4 = f32, 2 = f16, 3 = bf16.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn load8<const KIND: u8>(p: *const u8) -> __m256 {
        match KIND {
            4 => _mm256_loadu_ps(p as *const f32),
            2 => _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i)),
            _ => _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(
                _mm_loadu_si128(p as *const __m128i),
            ))),
        }
    }

    /// Four 8-lane accumulators over 32-element steps, then 8-element steps into the first, then
    /// a scalar tail: one fixed order for a given length.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn float_impl<const KIND: u8>(w: &[u8], x: &[f32]) -> f32 {
        let n = x.len();
        let width = if KIND == 4 { 4 } else { 2 };
        let (wp, xp) = (w.as_ptr(), x.as_ptr());
        let mut acc = [_mm256_setzero_ps(); 4];
        let mut k = 0;
        while k + 32 <= n {
            for (a, acc) in acc.iter_mut().enumerate() {
                let wv = load8::<KIND>(wp.add(width * (k + 8 * a)));
                *acc = _mm256_fmadd_ps(wv, _mm256_loadu_ps(xp.add(k + 8 * a)), *acc);
            }
            k += 32;
        }
        while k + 8 <= n {
            let wv = load8::<KIND>(wp.add(width * k));
            acc[0] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(xp.add(k)), acc[0]);
            k += 8;
        }
        let mut sum = hsum(_mm256_add_ps(
            _mm256_add_ps(acc[0], acc[1]),
            _mm256_add_ps(acc[2], acc[3]),
        ));
        let tail = match KIND {
            4 => scalar::f32_row,
            2 => scalar::f16_row,
            _ => scalar::bf16_row,
        };
        if k < n {
            sum += tail(&w[width * k..], &x[k..]);
        }
        sum
    }
}

#[cfg(target_arch = "x86_64")]
use avx2::f16x2 as avx2_f16x2;

/// AVX-512 kernels for Q4_1: two 32-value blocks per 512-bit vector, `vpdpbusd` multiplying
/// the unsigned nibbles by the signed activation codes straight into i32 lanes (the same integers
/// `maddubs` + `madd` give: 15·127·4 cannot overflow). Lanes 0–7 collect even blocks and lanes
/// 8–15 odd ones. As with the AVX2 kernels, the one-row entry point is the R = 1 case of the
/// multi-row kernel, so a row's bits never depend on its batch neighbours.
#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::*;
    use std::arch::x86_64::*;

    pub(super) fn q4_1(w: &[u8], x: &ActRow<'_>) -> f32 {
        let mut out = [0.0f32];
        q4_1_multi(w, std::slice::from_ref(x), &mut out);
        out[0]
    }

    pub(super) fn q4_1_multi(w: &[u8], xs: &[ActRow<'_>], out: &mut [f32]) {
        check_q4_1_rows(w, xs, out);
        // SAFETY: handed out only after runtime detection of AVX-512 F/BW/VL/VNNI (and AVX2,
        // FMA, F16C); every row's lengths checked above.
        unsafe {
            match xs.len() {
                1 => q4_1_rows::<1>(w, xs, out),
                2 => q4_1_rows::<2>(w, xs, out),
                3 => q4_1_rows::<3>(w, xs, out),
                4 => q4_1_rows::<4>(w, xs, out),
                5 => q4_1_rows::<5>(w, xs, out),
                6 => q4_1_rows::<6>(w, xs, out),
                7 => q4_1_rows::<7>(w, xs, out),
                8 => q4_1_rows::<8>(w, xs, out),
                n => panic!("q4_1_multi takes 1..={MULTI_ROWS} rows, got {n}"),
            }
        }
    }

    /// The 32 nibbles of the block at `p` as 32 bytes (low nibbles, then high nibbles).
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
    unsafe fn codes(p: *const u8) -> __m256i {
        let t = _mm_loadu_si128(p as *const __m128i);
        _mm256_and_si256(
            _mm256_set_m128i(_mm_srli_epi16::<4>(t), t),
            _mm256_set1_epi8(0x0F),
        )
    }

    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
    unsafe fn q4_1_rows<const R: usize>(w: &[u8], xs: &[ActRow<'_>], out: &mut [f32]) {
        let mut acc = [_mm512_setzero_ps(); R];
        let mut even_offsets = [0.0f32; R];
        let mut odd_offsets = [0.0f32; R];
        let nb = xs[0].scales.len();
        let mut i = 0;
        while i < nb {
            let pair = i + 1 < nb;
            let b0 = w.as_ptr().add(20 * i);
            let (d0, m0) = super::avx2_f16x2(b0);
            let lo = codes(b0.add(4));
            // A lone last block pairs with zero codes, zero activations and a zero scale: its
            // lanes add exactly nothing.
            let (d1, m1, hi) = if pair {
                let b1 = b0.add(20);
                let (d1, m1) = super::avx2_f16x2(b1);
                (d1, m1, codes(b1.add(4)))
            } else {
                (0.0, 0.0, _mm256_setzero_si256())
            };
            let both = _mm512_inserti64x4::<1>(_mm512_castsi256_si512(lo), hi);
            let mask: __mmask64 = if pair { !0 } else { 0xFFFF_FFFF };
            for r in 0..R {
                let x = xs.get_unchecked(r);
                even_offsets[r] += m0 * *x.sums.get_unchecked(i);
                let s0 = d0 * *x.scales.get_unchecked(i);
                let s1 = if pair {
                    odd_offsets[r] += m1 * *x.sums.get_unchecked(i + 1);
                    d1 * *x.scales.get_unchecked(i + 1)
                } else {
                    0.0
                };
                let by = _mm512_maskz_loadu_epi8(mask, x.qs.as_ptr().add(QK * i));
                let p = _mm512_dpbusd_epi32(_mm512_setzero_si512(), both, by);
                let scale = _mm512_mask_blend_ps(0xFF00, _mm512_set1_ps(s0), _mm512_set1_ps(s1));
                acc[r] = _mm512_fmadd_ps(scale, _mm512_cvtepi32_ps(p), acc[r]);
            }
            i += 2;
        }
        for r in 0..R {
            *out.get_unchecked_mut(r) =
                _mm512_reduce_add_ps(acc[r]) + (even_offsets[r] + odd_offsets[r]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{rngs::StdRng, Rng, SeedableRng};

    const QUANTISED: [GgmlType; 5] = [
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q8_0,
        GgmlType::Q4_K,
        GgmlType::Q6_K,
    ];
    const FLOATS: [GgmlType; 3] = [GgmlType::F32, GgmlType::F16, GgmlType::BF16];

    /// Values with a spread of magnitudes and a few outliers, as real weights have.
    fn random_values(rng: &mut StdRng, n: usize) -> Vec<f32> {
        (0..n)
            .map(|i| {
                let v: f32 = rng.gen_range(-1.0..1.0);
                if i % 97 == 5 {
                    v * 8.0
                } else {
                    v * (1.0 + (i / 64 % 4) as f32)
                }
            })
            .collect()
    }

    fn deq(ty: GgmlType, bytes: &[u8], n: usize) -> Vec<f32> {
        let mut out = vec![0.0; n];
        dequantize(ty, bytes, &mut out);
        out
    }

    #[test]
    fn float_types_decode_known_bit_patterns() {
        let f32s = [1.5f32, -2.25, 0.0, 1e-3];
        let bytes: Vec<u8> = f32s.iter().flat_map(|v| v.to_le_bytes()).collect();
        assert_eq!(deq(GgmlType::F32, &bytes, 4), f32s);
        // f16: 1.0 = 0x3C00, -2.0 = 0xC000, 0.5 = 0x3800, 65504 = 0x7BFF.
        let f16s = [0x3C00u16, 0xC000, 0x3800, 0x7BFF];
        let bytes: Vec<u8> = f16s.iter().flat_map(|v| v.to_le_bytes()).collect();
        assert_eq!(deq(GgmlType::F16, &bytes, 4), [1.0, -2.0, 0.5, 65504.0]);
        // bf16 is the top half of an f32.
        let bf16s = [0x3F80u16, 0xC040, 0x3F00, 0x4120];
        let bytes: Vec<u8> = bf16s.iter().flat_map(|v| v.to_le_bytes()).collect();
        assert_eq!(deq(GgmlType::BF16, &bytes, 4), [1.0, -3.0, 0.5, 10.0]);
    }

    #[test]
    fn q4_0_q4_1_q8_0_decode_hand_built_blocks() {
        // Q4_0: d = 0.5 (f16 0x3800); byte j holds value j (low nibble) and value j+16 (high).
        let mut b = vec![0x00, 0x38];
        b.extend((0..16u8).map(|j| j | ((15 - j) << 4)));
        let want: Vec<f32> = (0..32)
            .map(|i| {
                let code = if i < 16 { i } else { 15 - (i - 16) };
                (code as f32 - 8.0) * 0.5
            })
            .collect();
        assert_eq!(deq(GgmlType::Q4_0, &b, 32), want);

        // Q4_1: d = 0.25 (0x3400), m = -1.0 (0xBC00).
        let mut b = vec![0x00, 0x34, 0x00, 0xBC];
        b.extend((0..16u8).map(|j| ((j * 3) % 16) | ((j % 5) << 4)));
        let want: Vec<f32> = (0..32u8)
            .map(|i| {
                let code = if i < 16 { (i * 3) % 16 } else { (i - 16) % 5 };
                code as f32 * 0.25 - 1.0
            })
            .collect();
        assert_eq!(deq(GgmlType::Q4_1, &b, 32), want);

        // Q8_0: d = 2.0 (0x4000), codes -16..16.
        let mut b = vec![0x00, 0x40];
        b.extend((-16i8..16).map(|q| q as u8));
        let want: Vec<f32> = (-16..16).map(|q| q as f32 * 2.0).collect();
        assert_eq!(deq(GgmlType::Q8_0, &b, 32), want);
    }

    #[test]
    fn q4_k_decodes_hand_built_super_block() {
        // Scales/mins chosen to use the two high bits that live in the first 8 bytes.
        let sc = [1u8, 63, 17, 40, 5, 33, 62, 48];
        let mn = [0u8, 2, 50, 63, 16, 31, 1, 47];
        let mut packed = [0u8; 12];
        for j in 0..4 {
            // Bytes 0..4: scale j (6 bits) + top 2 bits of scale j+4; 4..8 likewise for mins;
            // 8..12: low 4 bits of scale j+4 | low 4 bits of min j+4 in the high nibble.
            packed[j] = sc[j] | ((sc[j + 4] & 0x30) << 2);
            packed[j + 4] = mn[j] | ((mn[j + 4] & 0x30) << 2);
            packed[j + 8] = (sc[j + 4] & 0x0F) | ((mn[j + 4] & 0x0F) << 4);
        }
        let codes: Vec<u8> = (0..256).map(|i| ((i * 7 + i / 32) % 16) as u8).collect();
        let mut qs = [0u8; 128];
        for (i, &c) in codes.iter().enumerate() {
            let (chunk, r) = (i / 64, i % 64);
            let byte = &mut qs[32 * chunk + r % 32];
            *byte |= if r < 32 { c } else { c << 4 };
        }
        // d = 0.5 (0x3800), dmin = 0.25 (0x3400).
        let mut b = vec![0x00, 0x38, 0x00, 0x34];
        b.extend_from_slice(&packed);
        b.extend_from_slice(&qs);
        assert_eq!(b.len(), 144);
        let want: Vec<f32> = (0..256)
            .map(|i| 0.5 * sc[i / 32] as f32 * codes[i] as f32 - 0.25 * mn[i / 32] as f32)
            .collect();
        assert_eq!(deq(GgmlType::Q4_K, &b, 256), want);
    }

    #[test]
    fn q6_k_decodes_hand_built_super_block() {
        let codes: Vec<u8> = (0..256).map(|i| ((i * 37 + 11) % 64) as u8).collect();
        let scales: Vec<i8> = (0..16).map(|j| (j as i8 - 8) * 15).collect();
        let (mut ql, mut qh) = ([0u8; 128], [0u8; 64]);
        for (i, &c) in codes.iter().enumerate() {
            // Each 128 values: group g = (i % 128) / 32 picks the ql half (g odd → +32), the
            // nibble (g ≥ 2 → high) and the 2-bit field (2g) of qh[l].
            let (half, l, g) = (i / 128, i % 32, (i % 128) / 32);
            ql[64 * half + l + 32 * (g % 2)] |= (c & 0x0F) << (4 * (g / 2));
            qh[32 * half + l] |= (c >> 4) << (2 * g);
        }
        let mut b = Vec::new();
        b.extend_from_slice(&ql);
        b.extend_from_slice(&qh);
        b.extend(scales.iter().map(|&s| s as u8));
        b.extend_from_slice(&[0x00, 0x30]); // d = 0.125
        assert_eq!(b.len(), 210);
        let want: Vec<f32> = (0..256)
            .map(|i| 0.125 * scales[i / 16] as f32 * (codes[i] as f32 - 32.0))
            .collect();
        assert_eq!(deq(GgmlType::Q6_K, &b, 256), want);
    }

    #[test]
    fn quantise_then_dequantise_stays_within_one_step() {
        let mut rng = StdRng::seed_from_u64(7);
        let x = random_values(&mut rng, 4 * 256);
        for ty in QUANTISED.into_iter().chain(FLOATS) {
            let bytes = quantize(ty, &x);
            assert_eq!(bytes.len(), ty.bytes_for(x.len()), "{ty:?} size");
            let y = deq(ty, &bytes, x.len());
            let bl = ty.block_len().max(32);
            for (b, (xb, yb)) in x.chunks(bl).zip(y.chunks(bl)).enumerate() {
                let amax = xb.iter().fold(0.0f32, |m, v| m.max(v.abs()));
                let range = xb.iter().copied().fold(f32::MIN, f32::max)
                    - xb.iter().copied().fold(f32::MAX, f32::min);
                for (k, (&a, &q)) in xb.iter().zip(yb).enumerate() {
                    // Each format's worst case is about half its coarsest step (Q4_0 can clip
                    // the value opposite its largest to one whole step).
                    let bound = match ty {
                        GgmlType::F32 => 0.0,
                        GgmlType::F16 => a.abs() / 1024.0,
                        GgmlType::BF16 => a.abs() / 128.0,
                        GgmlType::Q8_0 => 0.51 * amax / 127.0,
                        GgmlType::Q4_0 => 1.01 * amax / 8.0,
                        GgmlType::Q4_1 => 0.51 * range / 15.0,
                        GgmlType::Q4_K => 0.75 * range / 15.0,
                        GgmlType::Q6_K => 0.6 * amax / 31.0,
                    };
                    assert!(
                        (a - q).abs() <= bound,
                        "{ty:?} block {b} value {k}: {a} -> {q} (bound {bound})"
                    );
                }
            }
        }
    }

    #[test]
    fn activation_quantisation_keeps_scales_and_sums() {
        let mut rng = StdRng::seed_from_u64(3);
        let x = random_values(&mut rng, 2 * 512);
        for format in [ActFormat::Q8_0, ActFormat::Q8_1, ActFormat::Q8_K] {
            let acts = QuantizedActs::quantize(format, &x, 2, 512);
            for r in 0..2 {
                let row = acts.row(r);
                let bl = format.block_len();
                for (b, xb) in x[512 * r..512 * (r + 1)].chunks(bl).enumerate() {
                    let amax = xb.iter().fold(0.0f32, |m, v| m.max(v.abs()));
                    let d = row.scales[b];
                    assert_eq!(d, amax / 127.0);
                    let qb = &row.qs[bl * b..bl * (b + 1)];
                    for (&v, &q) in xb.iter().zip(qb) {
                        assert!((v - d * q as f32).abs() <= 0.5001 * d, "{format:?}");
                    }
                    let total: i32 = qb.iter().map(|&q| q as i32).sum();
                    match format {
                        ActFormat::Q8_0 => assert!(row.sums.is_empty() && row.bsums.is_empty()),
                        ActFormat::Q8_1 => assert_eq!(row.sums[b], d * total as f32),
                        ActFormat::Q8_K => {
                            for g in 0..16 {
                                let s: i32 =
                                    qb[16 * g..16 * (g + 1)].iter().map(|&q| q as i32).sum();
                                assert_eq!(row.bsums[16 * b + g] as i32, s);
                            }
                        }
                    }
                }
            }
        }
    }

    /// Σ w·x̂ in f64 from the dequantised weights and the dequantised activation codes: what
    /// every quantised kernel must compute, up to f32 rounding.
    fn exact_dot(ty: GgmlType, w: &[u8], acts: &QuantizedActs, cols: usize) -> (f64, f64) {
        let wf = deq(ty, w, cols);
        let row = acts.row(0);
        let bl = acts.format.block_len();
        let (mut sum, mut abs) = (0.0f64, 0.0f64);
        for (k, (&wk, &q)) in wf.iter().zip(row.qs).enumerate() {
            let xv = row.scales[k / bl] as f64 * q as f64;
            sum += wk as f64 * xv;
            abs += (wk as f64 * xv).abs();
        }
        (sum, abs)
    }

    #[test]
    fn scalar_and_simd_dots_match_the_exact_sum() {
        let mut rng = StdRng::seed_from_u64(11);
        let cols = 1024;
        let isas: Vec<Isa> = match detected_isa() {
            Isa::Scalar => {
                eprintln!("note: no AVX2 here, only the scalar kernels are tested");
                vec![Isa::Scalar]
            }
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => vec![Isa::Scalar, Isa::Avx2, Isa::Avx512],
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => vec![Isa::Scalar, Isa::Avx2],
        };
        for ty in QUANTISED {
            for trial in 0..4 {
                let w = quantize(ty, &random_values(&mut rng, cols));
                let x = random_values(&mut rng, cols);
                let acts = QuantizedActs::quantize(ty.act_format().unwrap(), &x, 1, cols);
                let (want, abs) = exact_dot(ty, &w, &acts, cols);
                let mut got = Vec::new();
                for &isa in &isas {
                    let v = quant_dot_for(ty, isa).unwrap()(&w, &acts.row(0));
                    assert!(
                        (v as f64 - want).abs() <= 1e-5 * abs + 1e-6,
                        "{ty:?} {isa:?} trial {trial}: {v} vs {want}"
                    );
                    got.push(v);
                }
                // Same kernel, same inputs: same bits.
                assert_eq!(
                    quant_dot(ty).unwrap()(&w, &acts.row(0)),
                    *got.last().unwrap()
                );
            }
        }
        for ty in FLOATS {
            // Odd length exercises the 32-, 8- and 1-element steps.
            let n = 301;
            let w = quantize(ty, &random_values(&mut rng, n));
            let x = random_values(&mut rng, n);
            let wf = deq(ty, &w, n);
            let want: f64 = wf.iter().zip(&x).map(|(&a, &b)| a as f64 * b as f64).sum();
            let abs: f64 = wf
                .iter()
                .zip(&x)
                .map(|(&a, &b)| (a as f64 * b as f64).abs())
                .sum();
            for &isa in &isas {
                let v = float_dot_for(ty, isa).unwrap()(&w, &x);
                assert!(
                    (v as f64 - want).abs() <= 1e-5 * abs,
                    "{ty:?} {isa:?}: {v} vs {want}"
                );
            }
        }
    }

    #[test]
    fn quantised_dot_approximates_the_float_dot() {
        // Against the unquantised activations the only extra error is the activation rounding,
        // at most half a step (amax/127/2) per value.
        let mut rng = StdRng::seed_from_u64(5);
        let cols = 512;
        for ty in QUANTISED {
            let w = quantize(ty, &random_values(&mut rng, cols));
            let x = random_values(&mut rng, cols);
            let wf = deq(ty, &w, cols);
            let format = ty.act_format().unwrap();
            let acts = QuantizedActs::quantize(format, &x, 1, cols);
            let bl = format.block_len();
            let mut want = 0.0f64;
            let mut bound = 1e-4f64;
            for (b, (wb, xb)) in wf.chunks(bl).zip(x.chunks(bl)).enumerate() {
                let step = acts.row(0).scales[b] as f64;
                for (&a, &v) in wb.iter().zip(xb) {
                    want += a as f64 * v as f64;
                    bound += (a as f64).abs() * step * 0.5001 + (a as f64 * v as f64).abs() * 1e-5;
                }
            }
            let got = vec_dot(ty, &w, &acts.row(0)) as f64;
            assert!(
                (got - want).abs() <= bound,
                "{ty:?}: {got} vs {want} (bound {bound})"
            );
        }
    }

    #[test]
    fn type_ids_round_trip() {
        for ty in QUANTISED.into_iter().chain(FLOATS) {
            assert_eq!(GgmlType::from_id(ty.id()), Some(ty));
            assert_eq!(ty.is_quantized(), ty.act_format().is_some());
        }
        assert_eq!(GgmlType::from_id(6), None);
    }
}
