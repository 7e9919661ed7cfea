//! Weight panels for AVX-512 VNNI: a Q4_1 or Q8_0 weight matrix repacked at load time so that
//! 16 output rows sit side by side. One `vpdpbusd` then multiplies four consecutive weights of
//! each of the 16 rows by the same four activation codes (broadcast), leaving the 16 rows' partial
//! sums in 16 lanes: no horizontal reduction, and each weight vector, unpacked once, serves up to
//! [`TOKEN_TILE`] batched tokens from registers. The row-at-a-time kernels in [`crate::quant`]
//! spend most of their instructions on unpacking, per-block scale shuffles and reductions; this
//! layout is what makes batched decode compute-bound instead.
//!
//! Layout, per panel of 16 rows and per 32-value block, 64-byte lines:
//! - Q4_1 (5 lines, the same 320 bytes as the 16 source blocks): line j (0..4) holds, in dword r,
//!   bytes 4j..4j+4 of row r's nibbles: low nibbles are values 4j..4j+4, high nibbles values
//!   16+4j..16+4j+4 (GGML's own pairing). Line 4: the 16 `d` (f16), then the 16 `m`.
//! - Q8_0 (9 lines): line g (0..8) holds, in dword r, row r's codes 4g..4g+4 with the sign bit
//!   flipped (`q + 128` as u8, since `vpdpbusd` takes unsigned weights); line 8 the 16 `d`.
//!   The flip adds `128·Σx` to each block's integer sum, taken back by starting the sum at
//!   `−128·Σx`.
//!
//! Every output element is computed by the same sequence of operations whatever the batch size
//! or the token's place in it (exact integer sums per block, then one FMA per block in block
//! order, starting from zero), so batching never changes a token.

use rayon::prelude::*;

use crate::quant::{has_avx512_vnni, ActFormat, ActRow, GgmlType, QuantizedActs};
use crate::tensor::{OutPtr, QTensor, PARALLEL_MIN_MACS};

/// Output rows per panel: one per 32-bit lane of a 512-bit vector.
pub const PANEL_ROWS: usize = 16;
/// Tokens one kernel call multiplies per pass over a panel (their accumulators fill the
/// registers the unpacked weights leave free).
pub const TOKEN_TILE: usize = 8;
/// Values per block of both formats.
const QK: usize = 32;

/// One cache line of panel data; the alignment makes every vector load an aligned one.
#[repr(C, align(64))]
#[derive(Clone, Copy)]
struct Line([u8; 64]);

/// A weight matrix repacked into panels (see the module docs).
pub struct Panels {
    dtype: GgmlType,
    rows: usize,
    cols: usize,
    lines: Vec<Line>,
}

impl std::fmt::Debug for Panels {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Panels({:?} {}×{})", self.dtype, self.rows, self.cols)
    }
}

fn lines_per_block(dtype: GgmlType) -> usize {
    match dtype {
        GgmlType::Q4_1 => 5,
        GgmlType::Q8_0 => 9,
        other => unreachable!("no panel layout for {other:?}"),
    }
}

impl Panels {
    /// Repack `w` when this machine has AVX-512 VNNI and `w` is Q4_1 or Q8_0 with whole panels
    /// (rows a multiple of 16); `None` leaves it to the row kernels.
    pub fn pack(w: &QTensor) -> Option<Panels> {
        if !has_avx512_vnni() {
            return None;
        }
        Self::pack_layout(w)
    }

    /// The repacking itself, independent of the CPU (tests check the layout anywhere).
    fn pack_layout(w: &QTensor) -> Option<Panels> {
        let (rows, cols, dtype) = (w.rows(), w.cols(), w.dtype);
        if !matches!(dtype, GgmlType::Q4_1 | GgmlType::Q8_0)
            || rows == 0
            || !rows.is_multiple_of(PANEL_ROWS)
            || !cols.is_multiple_of(QK)
        {
            return None;
        }
        let (nb, lpb) = (cols / QK, lines_per_block(dtype));
        let (row_bytes, block_bytes) = (w.row_bytes(), dtype.block_bytes());
        let bytes = w.bytes();
        assert!(
            bytes.len() >= rows * row_bytes,
            "{}: storage too short",
            w.name
        );
        let mut lines = vec![Line([0; 64]); rows / PANEL_ROWS * nb * lpb];
        for (pb, dst) in lines.chunks_exact_mut(lpb).enumerate() {
            let (panel, b) = (pb / nb, pb % nb);
            for r in 0..PANEL_ROWS {
                let start = (panel * PANEL_ROWS + r) * row_bytes + b * block_bytes;
                let block = &bytes[start..start + block_bytes];
                let lane = 4 * r..4 * r + 4;
                match dtype {
                    GgmlType::Q4_1 => {
                        for (j, line) in dst[..4].iter_mut().enumerate() {
                            line.0[lane.clone()].copy_from_slice(&block[4 + 4 * j..8 + 4 * j]);
                        }
                        dst[4].0[2 * r..2 * r + 2].copy_from_slice(&block[0..2]);
                        dst[4].0[32 + 2 * r..34 + 2 * r].copy_from_slice(&block[2..4]);
                    }
                    _ => {
                        for (g, line) in dst[..8].iter_mut().enumerate() {
                            for (o, &q) in line.0[lane.clone()].iter_mut().zip(&block[2 + 4 * g..])
                            {
                                *o = q ^ 0x80;
                            }
                        }
                        dst[8].0[2 * r..2 * r + 2].copy_from_slice(&block[0..2]);
                    }
                }
            }
        }
        Some(Panels {
            dtype,
            rows,
            cols,
            lines,
        })
    }

    /// `out[i * rows + j] = w[j] · acts[i]` for every row and token, as
    /// [`crate::tensor::matmul_quantized`]; multi-threaded over panels.
    pub fn matmul(&self, acts: &QuantizedActs, out: &mut [f32]) {
        let (rows, cols, n) = (self.rows, self.cols, acts.rows);
        let expected = if self.dtype == GgmlType::Q4_1 {
            ActFormat::Q8_1
        } else {
            ActFormat::Q8_0
        };
        assert_eq!(acts.format, expected, "panel activations");
        assert_eq!(acts.cols, cols, "panel activation width");
        assert_eq!(out.len(), n * rows, "panel output is not n × {rows}");
        assert!(has_avx512_vnni(), "panels need AVX-512 VNNI");
        let nb = cols / QK;
        let act_rows: Vec<ActRow<'_>> = (0..n).map(|i| acts.row(i)).collect();
        // Q8_0's sign flip needs each activation block's code sum.
        let code_sums = acts.code_sums();
        let lpb = lines_per_block(self.dtype);
        let out = OutPtr::new(out);
        let run = |first: usize, end: usize| {
            for panel in first..end {
                let lines = &self.lines[panel * nb * lpb..(panel + 1) * nb * lpb];
                for t0 in (0..n).step_by(TOKEN_TILE) {
                    let tile = &act_rows[t0..(t0 + TOKEN_TILE).min(n)];
                    let sums = code_sums.get(t0 * nb..).unwrap_or(&[]);
                    let dst = out.at(t0 * rows + panel * PANEL_ROWS);
                    // SAFETY: AVX-512 VNNI checked above; `lines` is this panel's nb blocks,
                    // every activation row is `cols` wide (asserted), and each token's 16
                    // outputs `dst + t·rows ..+16` lie inside `out`, written by this panel only.
                    unsafe { kernels::run(self.dtype, lines, nb, tile, sums, dst, rows) };
                }
            }
        };
        let panels = rows / PANEL_ROWS;
        let threads = rayon::current_num_threads();
        if threads <= 1 || rows * n * cols < PARALLEL_MIN_MACS || panels < 2 {
            run(0, panels);
            return;
        }
        // A few chunks per thread so work stealing evens out uneven progress.
        let chunk = panels.div_ceil(threads * 4);
        (0..panels.div_ceil(chunk))
            .into_par_iter()
            .for_each(|c| run(c * chunk, ((c + 1) * chunk).min(panels)));
    }
}

#[cfg(target_arch = "x86_64")]
mod kernels {
    use std::arch::x86_64::*;

    use super::{Line, PANEL_ROWS, QK};
    use crate::quant::{ActRow, GgmlType};

    /// One panel times up to [`super::TOKEN_TILE`] tokens.
    ///
    /// # Safety
    /// AVX-512 F/BW/VNNI present; `lines` holds `nb` blocks of `dtype`'s layout; each row of
    /// `xs` has `nb` blocks; `sums` (Q8_0) has `nb` code sums per token; `out + t·stride` has 16
    /// writable floats for each token t.
    pub(super) unsafe fn run(
        dtype: GgmlType,
        lines: &[Line],
        nb: usize,
        xs: &[ActRow<'_>],
        sums: &[i32],
        out: *mut f32,
        stride: usize,
    ) {
        macro_rules! by_tile {
            ($kernel:ident $(, $arg:expr)*) => {
                match xs.len() {
                    1 => $kernel::<1>(lines, nb, xs $(, $arg)*, out, stride),
                    2 => $kernel::<2>(lines, nb, xs $(, $arg)*, out, stride),
                    3 => $kernel::<3>(lines, nb, xs $(, $arg)*, out, stride),
                    4 => $kernel::<4>(lines, nb, xs $(, $arg)*, out, stride),
                    5 => $kernel::<5>(lines, nb, xs $(, $arg)*, out, stride),
                    6 => $kernel::<6>(lines, nb, xs $(, $arg)*, out, stride),
                    7 => $kernel::<7>(lines, nb, xs $(, $arg)*, out, stride),
                    8 => $kernel::<8>(lines, nb, xs $(, $arg)*, out, stride),
                    t => panic!("panel kernels take 1..=8 tokens, got {t}"),
                }
            };
        }
        match dtype {
            GgmlType::Q4_1 => by_tile!(q4_1),
            _ => by_tile!(q8_0, sums),
        }
    }

    /// Four activation codes as one dword in all 16 lanes.
    #[inline(always)]
    unsafe fn codes4(qs: *const i8, at: usize) -> __m512i {
        _mm512_set1_epi32((qs.add(at) as *const i32).read_unaligned())
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    unsafe fn q4_1<const T: usize>(
        lines: &[Line],
        nb: usize,
        xs: &[ActRow<'_>],
        out: *mut f32,
        stride: usize,
    ) {
        debug_assert!(lines.len() >= 5 * nb && xs.len() == T);
        let low = _mm512_set1_epi8(0x0F);
        let mut acc = [_mm512_setzero_ps(); T];
        let p = lines.as_ptr() as *const __m512i;
        for b in 0..nb {
            let block = p.add(5 * b);
            let mut w = [_mm512_setzero_si512(); 8];
            for j in 0..4 {
                let v = _mm512_load_si512(block.add(j));
                w[j] = _mm512_and_si512(v, low);
                w[j + 4] = _mm512_and_si512(_mm512_srli_epi16::<4>(v), low);
            }
            let scales = block.add(4) as *const __m256i;
            let d = _mm512_cvtph_ps(_mm256_load_si256(scales));
            let m = _mm512_cvtph_ps(_mm256_load_si256(scales.add(1)));
            for (t, acc) in acc.iter_mut().enumerate() {
                let x = xs.get_unchecked(t);
                let qs = x.qs.as_ptr().add(QK * b);
                // Two independent chains halve the vpdpbusd latency; integer sums are exact in
                // any order.
                let mut s0 = _mm512_setzero_si512();
                let mut s1 = _mm512_setzero_si512();
                for g in (0..8).step_by(2) {
                    s0 = _mm512_dpbusd_epi32(s0, w[g], codes4(qs, 4 * g));
                    s1 = _mm512_dpbusd_epi32(s1, w[g + 1], codes4(qs, 4 * g + 4));
                }
                let sum = _mm512_cvtepi32_ps(_mm512_add_epi32(s0, s1));
                let scale = _mm512_mul_ps(d, _mm512_set1_ps(*x.scales.get_unchecked(b)));
                *acc = _mm512_fmadd_ps(sum, scale, *acc);
                *acc = _mm512_fmadd_ps(m, _mm512_set1_ps(*x.sums.get_unchecked(b)), *acc);
            }
        }
        for (t, acc) in acc.iter().enumerate() {
            _mm512_storeu_ps(out.add(t * stride), *acc);
        }
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    unsafe fn q8_0<const T: usize>(
        lines: &[Line],
        nb: usize,
        xs: &[ActRow<'_>],
        sums: &[i32],
        out: *mut f32,
        stride: usize,
    ) {
        debug_assert!(lines.len() >= 9 * nb && xs.len() == T && sums.len() >= T * nb);
        let mut acc = [_mm512_setzero_ps(); T];
        let p = lines.as_ptr() as *const __m512i;
        for b in 0..nb {
            let block = p.add(9 * b);
            let mut w = [_mm512_setzero_si512(); 8];
            for (g, w) in w.iter_mut().enumerate() {
                *w = _mm512_load_si512(block.add(g));
            }
            let d = _mm512_cvtph_ps(_mm256_load_si256(block.add(8) as *const __m256i));
            for (t, acc) in acc.iter_mut().enumerate() {
                let x = xs.get_unchecked(t);
                let qs = x.qs.as_ptr().add(QK * b);
                let mut s0 = _mm512_set1_epi32(-128 * *sums.get_unchecked(t * nb + b));
                let mut s1 = _mm512_setzero_si512();
                for g in (0..8).step_by(2) {
                    s0 = _mm512_dpbusd_epi32(s0, w[g], codes4(qs, 4 * g));
                    s1 = _mm512_dpbusd_epi32(s1, w[g + 1], codes4(qs, 4 * g + 4));
                }
                let sum = _mm512_cvtepi32_ps(_mm512_add_epi32(s0, s1));
                let scale = _mm512_mul_ps(d, _mm512_set1_ps(*x.scales.get_unchecked(b)));
                *acc = _mm512_fmadd_ps(sum, scale, *acc);
            }
        }
        for (t, acc) in acc.iter().enumerate() {
            _mm512_storeu_ps(out.add(t * stride), *acc);
        }
    }

    const _: () = assert!(PANEL_ROWS == 16);
}

/// Without x86-64 there are no panels ([`Panels::pack`] never returns one).
#[cfg(not(target_arch = "x86_64"))]
mod kernels {
    use super::Line;
    use crate::quant::{ActRow, GgmlType};

    pub(super) unsafe fn run(
        _: GgmlType,
        _: &[Line],
        _: usize,
        _: &[ActRow<'_>],
        _: &[i32],
        _: *mut f32,
        _: usize,
    ) {
        unreachable!("panels are x86-64 only")
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use half::f16;
    use rand::{rngs::StdRng, Rng, SeedableRng};

    use super::*;
    use crate::quant::quantize;
    use crate::tensor::Storage;

    fn weight(dtype: GgmlType, rows: usize, cols: usize, seed: u64) -> (QTensor, Vec<f32>) {
        let mut rng = StdRng::seed_from_u64(seed);
        let values: Vec<f32> = (0..rows * cols)
            .map(|_| rng.gen::<f32>() * 2.0 - 0.8)
            .collect();
        let bytes = quantize(dtype, &values);
        let w = QTensor {
            name: format!("{dtype:?} test weight"),
            dtype,
            shape: vec![rows, cols],
            storage: Storage::Owned(Arc::new(bytes)),
        };
        let deq = w.to_f32();
        (w, deq)
    }

    fn random_x(n: usize, cols: usize, seed: u64) -> Vec<f32> {
        let mut rng = StdRng::seed_from_u64(seed);
        (0..n * cols)
            .map(|_| rng.gen::<f32>() * 4.0 - 2.0)
            .collect()
    }

    fn acts(dtype: GgmlType, x: &[f32], n: usize, cols: usize) -> QuantizedActs {
        QuantizedActs::quantize(dtype.act_format().expect("quantised"), x, n, cols)
    }

    fn f16_at(b: &[u8], i: usize) -> f32 {
        f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
    }

    /// The kernel's arithmetic written out in scalar form from the source blocks (not the
    /// panels): exact integer block sums, then per block `acc = fma(sum, d·dx, acc)` and, for
    /// Q4_1, `acc = fma(m, sx, acc)`.
    fn scalar_model(w: &QTensor, acts: &QuantizedActs) -> Vec<f32> {
        let (rows, cols) = (w.rows(), w.cols());
        let (rb, bb) = (w.row_bytes(), w.dtype.block_bytes());
        let mut out = vec![0.0; acts.rows * rows];
        for i in 0..acts.rows {
            let x = acts.row(i);
            for j in 0..rows {
                let mut acc = 0.0f32;
                for b in 0..cols / QK {
                    let block = &w.bytes()[j * rb + b * bb..][..bb];
                    let xq = &x.qs[QK * b..QK * (b + 1)];
                    let d = f16_at(block, 0);
                    let sum: i32 = (0..QK)
                        .map(|k| {
                            let q = match w.dtype {
                                GgmlType::Q4_1 => {
                                    let byte = block[4 + k % 16];
                                    (if k < 16 { byte & 15 } else { byte >> 4 }) as i32
                                }
                                _ => block[2 + k] as i8 as i32,
                            };
                            q * xq[k] as i32
                        })
                        .sum();
                    acc = (sum as f32).mul_add(d * x.scales[b], acc);
                    if w.dtype == GgmlType::Q4_1 {
                        acc = f16_at(block, 2).mul_add(x.sums[b], acc);
                    }
                }
                out[i * rows + j] = acc;
            }
        }
        out
    }

    #[test]
    fn only_whole_panels_of_q4_1_and_q8_0_are_packed() {
        assert!(Panels::pack_layout(&weight(GgmlType::Q4_1, 32, 64, 1).0).is_some());
        assert!(Panels::pack_layout(&weight(GgmlType::Q8_0, 16, 32, 1).0).is_some());
        assert!(Panels::pack_layout(&weight(GgmlType::Q4_1, 24, 64, 1).0).is_none());
        assert!(Panels::pack_layout(&weight(GgmlType::Q4_0, 32, 64, 1).0).is_none());
        assert!(Panels::pack_layout(&weight(GgmlType::Q4_K, 16, 256, 1).0).is_none());
    }

    #[test]
    fn panels_match_the_scalar_model_bit_for_bit_and_the_float_product_closely() {
        if !has_avx512_vnni() {
            eprintln!("skipped: this CPU has no AVX-512 VNNI, so panels are never used");
            return;
        }
        for dtype in [GgmlType::Q4_1, GgmlType::Q8_0] {
            let (rows, cols) = (48, 160);
            let (w, deq) = weight(dtype, rows, cols, 3);
            let panels = Panels::pack(&w).expect("packable");
            // 11 tokens: a full tile of 8 and a partial one of 3.
            let n = 11;
            let a = acts(dtype, &random_x(n, cols, 4), n, cols);
            let mut out = vec![f32::NAN; n * rows];
            panels.matmul(&a, &mut out);
            let model = scalar_model(&w, &a);
            for (k, (got, want)) in out.iter().zip(&model).enumerate() {
                assert_eq!(
                    got.to_bits(),
                    want.to_bits(),
                    "{dtype:?} token {} row {}: {got} vs {want}",
                    k / rows,
                    k % rows
                );
            }
            // And against the dequantised float product (the kernel's only error is f32
            // rounding).
            for i in 0..n {
                let x = a.row(i);
                let xf: Vec<f32> =
                    x.qs.iter()
                        .enumerate()
                        .map(|(k, &q)| q as f32 * x.scales[k / QK])
                        .collect();
                for j in 0..rows {
                    let exact: f64 = (0..cols)
                        .map(|k| deq[j * cols + k] as f64 * xf[k] as f64)
                        .sum();
                    let got = out[i * rows + j] as f64;
                    assert!(
                        (got - exact).abs() <= 1e-4 * (1.0 + exact.abs()),
                        "{dtype:?} token {i} row {j}: {got} vs {exact}"
                    );
                }
            }
        }
    }

    #[test]
    fn a_token_gets_the_same_bits_alone_or_in_any_batch() {
        if !has_avx512_vnni() {
            eprintln!("skipped: this CPU has no AVX-512 VNNI, so panels are never used");
            return;
        }
        for dtype in [GgmlType::Q4_1, GgmlType::Q8_0] {
            let (rows, cols) = (64, 96);
            let (w, _) = weight(dtype, rows, cols, 5);
            let panels = Panels::pack(&w).expect("packable");
            let x = random_x(19, cols, 6);
            let mut together = vec![0.0; 19 * rows];
            panels.matmul(&acts(dtype, &x, 19, cols), &mut together);
            let mut again = vec![0.0; 19 * rows];
            panels.matmul(&acts(dtype, &x, 19, cols), &mut again);
            assert_eq!(again, together, "{dtype:?}: a batch of 19 twice");
            for n in [1, 3, 8, 9] {
                let mut alone = vec![0.0; n * rows];
                panels.matmul(&acts(dtype, &x[..n * cols], n, cols), &mut alone);
                assert_eq!(
                    alone[..],
                    together[..n * rows],
                    "{dtype:?}: first {n} tokens alone"
                );
            }
        }
    }
}
