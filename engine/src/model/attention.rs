//! Causal attention over the paged KV cache for one token and one KV head, with all the query
//! heads that share that KV head (grouped-query attention): each cached key and value row is read
//! once for the whole group.
//!
//! Dot products run in 16 lanes (lane j takes elements ≡ j mod 16) with a fixed pairwise
//! reduction, as plain Rust or, where the CPU has AVX-512 and the head size is a multiple of 16,
//! as one 512-bit register: the same operations in the same order, so both give the same bits.
//! The rest is compiled for AVX-512, AVX2 and the baseline and chosen at runtime (the baseline
//! x86-64 build only has SSE2, which made this loop the largest cost of batched decoding).

use half::{f16, slice::HalfFloatSliceExt};

const LANES: usize = 16;

/// One token's attention for one KV head.
pub struct HeadGroup<'a> {
    /// The group's query heads, `group × head_dim`, already rotated.
    pub queries: &'a [f32],
    /// Cache slots of positions `0..=pos`, in position order.
    pub slots: &'a [usize],
    /// This KV head's keys and values in one layer, `[slot][head_dim]`.
    pub keys: &'a [f16],
    pub values: &'a [f16],
    pub head_dim: usize,
    /// `1/√head_dim`.
    pub scale: f32,
}

/// Writes `softmax(q·Kᵀ·scale)·V` for each query head of `group` into `out` (`group × head_dim`).
pub fn attend(group: &HeadGroup<'_>, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if group.head_dim.is_multiple_of(LANES) && is_x86_feature_detected!("avx512f") {
            // SAFETY: the feature was just detected; the head size is whole vectors.
            return unsafe { attend_avx512(group, out) };
        }
        if is_x86_feature_detected!("avx2") {
            // SAFETY: the feature was just detected.
            return unsafe { attend_avx2(group, out) };
        }
    }
    attend_with(group, out, dot, widen)
}

/// f16 to f32 (exact, so every path gives the same floats).
fn widen(from: &[f16], to: &mut [f32]) {
    from.convert_to_f32_slice(to)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn attend_avx512(group: &HeadGroup<'_>, out: &mut [f32]) {
    attend_with(
        group,
        out,
        // SAFETY (both): AVX-512F is enabled here and the head size is whole vectors.
        |a, b| unsafe { dot_avx512(a, b) },
        |from, to| unsafe { widen_avx512(from, to) },
    )
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn attend_avx2(group: &HeadGroup<'_>, out: &mut [f32]) {
    attend_with(group, out, dot, widen)
}

#[inline(always)]
fn attend_with(
    g: &HeadGroup<'_>,
    out: &mut [f32],
    dot: impl Fn(&[f32], &[f32]) -> f32,
    widen: impl Fn(&[f16], &mut [f32]),
) {
    let hd = g.head_dim;
    let mut row = vec![0.0f32; hd];
    let heads = g.queries.len() / hd;
    let ctx = g.slots.len();
    assert_eq!(out.len(), g.queries.len(), "attention output size");
    let mut scores = vec![0.0f32; heads * ctx];
    for (p, &slot) in g.slots.iter().enumerate() {
        widen(&g.keys[slot * hd..][..hd], &mut row);
        for (h, q) in g.queries.chunks_exact(hd).enumerate() {
            scores[h * ctx + p] = dot(q, &row) * g.scale;
        }
    }
    for s in scores.chunks_exact_mut(ctx) {
        super::ops::softmax(s);
    }
    out.fill(0.0);
    for (p, &slot) in g.slots.iter().enumerate() {
        widen(&g.values[slot * hd..][..hd], &mut row);
        for (h, o) in out.chunks_exact_mut(hd).enumerate() {
            let w = scores[h * ctx + p];
            for (o, v) in o.iter_mut().zip(&row) {
                *o += w * v;
            }
        }
    }
}

/// [`dot`] for `a.len()` a multiple of 16, with the 16 lanes in one register.
///
/// # Safety
/// AVX-512F present; `a` and `b` of one length, a multiple of 16.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn dot_avx512(a: &[f32], b: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    debug_assert!(a.len() == b.len() && a.len().is_multiple_of(LANES));
    let mut acc = _mm512_setzero_ps();
    for i in (0..a.len()).step_by(LANES) {
        let p = _mm512_mul_ps(
            _mm512_loadu_ps(a.as_ptr().add(i)),
            _mm512_loadu_ps(b.as_ptr().add(i)),
        );
        acc = _mm512_add_ps(acc, p);
    }
    // The pairwise reduction of `dot`: lanes j and j+8, then j+4, j+2, j+1.
    let v8 = _mm256_add_ps(
        _mm512_castps512_ps256(acc),
        _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(acc))),
    );
    let v4 = _mm_add_ps(_mm256_castps256_ps128(v8), _mm256_extractf128_ps::<1>(v8));
    let v2 = _mm_add_ps(v4, _mm_movehl_ps(v4, v4));
    let v1 = _mm_add_ss(v2, _mm_movehdup_ps(v2));
    _mm_cvtss_f32(v1)
}

/// [`widen`] 16 values at a time.
///
/// # Safety
/// AVX-512F present; `from` and `to` of one length, a multiple of 16.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn widen_avx512(from: &[f16], to: &mut [f32]) {
    use std::arch::x86_64::*;
    debug_assert!(from.len() == to.len() && from.len().is_multiple_of(LANES));
    for i in (0..from.len()).step_by(LANES) {
        let h = _mm256_loadu_si256(from.as_ptr().add(i) as *const __m256i);
        _mm512_storeu_ps(to.as_mut_ptr().add(i), _mm512_cvtph_ps(h));
    }
}

/// `a·b` in 16 lanes (lane j takes elements ≡ j mod 16), then a fixed pairwise reduction.
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; LANES];
    let whole = a.len() / LANES * LANES;
    for (ca, cb) in a[..whole]
        .chunks_exact(LANES)
        .zip(b[..whole].chunks_exact(LANES))
    {
        for j in 0..LANES {
            acc[j] += ca[j] * cb[j];
        }
    }
    for (j, (x, y)) in a[whole..].iter().zip(&b[whole..]).enumerate() {
        acc[j] += x * y;
    }
    let mut width = LANES;
    while width > 1 {
        width /= 2;
        for j in 0..width {
            acc[j] += acc[j + width];
        }
    }
    acc[0]
}

#[cfg(test)]
mod tests {
    use rand::{rngs::StdRng, Rng, SeedableRng};

    use super::*;

    #[test]
    fn grouped_attention_matches_a_plain_float_reference_on_every_isa() {
        let mut rng = StdRng::seed_from_u64(11);
        // 48: whole 512-bit vectors; 40: the portable path.
        for hd in [48, 40] {
            let (group, slots_total) = (3, 50);
            let mut r =
                |n: usize| -> Vec<f32> { (0..n).map(|_| rng.gen::<f32>() * 2.0 - 1.0).collect() };
            let half_of = |v: Vec<f32>| -> Vec<f16> { v.into_iter().map(f16::from_f32).collect() };
            let keys = half_of(r(slots_total * hd));
            let values = half_of(r(slots_total * hd));
            let queries = r(group * hd);
            // Positions scattered over the cache, as block tables leave them.
            let slots: Vec<usize> = (0..23).map(|p| (p * 7 + 3) % slots_total).collect();
            let g = HeadGroup {
                queries: &queries,
                slots: &slots,
                keys: &keys,
                values: &values,
                head_dim: hd,
                scale: 1.0 / (hd as f32).sqrt(),
            };
            let mut out = vec![0.0; group * hd];
            attend(&g, &mut out);
            let mut portable = vec![0.0; group * hd];
            attend_with(&g, &mut portable, dot, widen);
            assert_eq!(out, portable, "the runtime-chosen ISA changed the bits");
            for h in 0..group {
                let q = &queries[h * hd..(h + 1) * hd];
                let logits: Vec<f64> = slots
                    .iter()
                    .map(|&s| {
                        let k = &keys[s * hd..][..hd];
                        q.iter()
                            .zip(k)
                            .map(|(a, b)| (a * b.to_f32()) as f64)
                            .sum::<f64>()
                            * g.scale as f64
                    })
                    .collect();
                let max = logits.iter().cloned().fold(f64::MIN, f64::max);
                let e: Vec<f64> = logits.iter().map(|l| (l - max).exp()).collect();
                let total: f64 = e.iter().sum();
                for d in 0..hd {
                    let want: f64 = slots
                        .iter()
                        .zip(&e)
                        .map(|(&s, w)| w / total * values[s * hd + d].to_f32() as f64)
                        .sum();
                    let got = out[h * hd + d] as f64;
                    assert!(
                        (got - want).abs() < 1e-5,
                        "head {h} dim {d}: {got} vs {want}"
                    );
                }
            }
        }
    }
}
