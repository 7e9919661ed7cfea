//! A weight tensor as loaded: f32 or still in its GGML blocks, and the matrix product the
//! executors use. Each output element is computed the same way whatever the batch size, so a
//! sequence gets bit-identical logits alone or batched (tests rely on it).

use std::sync::Arc;

use rayon::prelude::*;

use crate::panel::Panels;
use crate::quant::{
    float_dot, quant_dot, quant_dot_multi, ActRow, GgmlType, QuantizedActs, MULTI_ROWS,
};

/// Where a tensor's bytes live: a read-only file mapping (GGUF, safetensors) or owned memory.
#[derive(Clone)]
pub enum Storage {
    Mapped {
        map: Arc<memmap2::Mmap>,
        offset: usize,
        len: usize,
    },
    Owned(Arc<Vec<u8>>),
}

impl Storage {
    pub fn bytes(&self) -> &[u8] {
        match self {
            Storage::Mapped { map, offset, len } => &map[*offset..*offset + *len],
            Storage::Owned(v) => v,
        }
    }
}

/// A tensor in row-major order, outermost dimension first (a linear weight is `[out, in]`; note
/// GGUF lists dims innermost first, the loader reverses them). Rows are whole blocks.
#[derive(Clone)]
pub struct QTensor {
    pub name: String,
    pub dtype: GgmlType,
    pub shape: Vec<usize>,
    pub storage: Storage,
}

impl std::fmt::Debug for QTensor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "QTensor({} {:?} {:?})",
            self.name, self.dtype, self.shape
        )
    }
}

impl QTensor {
    /// An owned f32 tensor.
    pub fn from_f32(name: impl Into<String>, shape: Vec<usize>, values: &[f32]) -> Self {
        let mut bytes = Vec::with_capacity(values.len() * 4);
        for v in values {
            bytes.extend_from_slice(&v.to_le_bytes());
        }
        QTensor {
            name: name.into(),
            dtype: GgmlType::F32,
            shape,
            storage: Storage::Owned(Arc::new(bytes)),
        }
    }

    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
    /// Number of rows (all dims but the last).
    pub fn rows(&self) -> usize {
        self.numel() / self.cols()
    }
    /// Length of the innermost dimension.
    pub fn cols(&self) -> usize {
        *self.shape.last().unwrap_or(&1)
    }
    pub fn bytes(&self) -> &[u8] {
        self.storage.bytes()
    }
    pub fn row_bytes(&self) -> usize {
        self.dtype.bytes_for(self.cols())
    }
    /// Dequantise one row into `out` (len = cols).
    pub fn row_f32(&self, row: usize, out: &mut [f32]) {
        let rb = self.row_bytes();
        crate::quant::dequantize(self.dtype, &self.bytes()[row * rb..(row + 1) * rb], out);
    }
    /// The whole tensor as f32.
    pub fn to_f32(&self) -> Vec<f32> {
        let mut out = vec![0.0; self.numel()];
        crate::quant::dequantize(self.dtype, self.bytes(), &mut out);
        out
    }
}

/// `out[i][j] = sum_k x[i][k] * w[j][k]` for `n` rows of `x` (`x.len() == n * w.cols()`,
/// `out.len() == n * w.rows()`): a linear layer without bias. Multi-threaded over weight rows.
///
/// Quantised weights multiply 8-bit activations (each x row quantised once, on its own); float
/// weights multiply x directly. Every output element is one dot product with a fixed summation
/// order, so it is bit-identical whatever `n`, the row's place in the batch or the thread count.
pub fn matmul(w: &QTensor, x: &[f32], n: usize, out: &mut [f32]) {
    let (rows, cols) = (w.rows(), w.cols());
    assert_eq!(x.len(), n * cols, "{}: x is not n × {cols}", w.name);
    assert_eq!(out.len(), n * rows, "{}: out is not n × {rows}", w.name);
    match w.dtype.act_format() {
        Some(format) => {
            let acts = QuantizedActs::quantize(format, x, n, cols);
            matmul_quantized(w, &acts, out);
        }
        None => {
            let dot = float_dot(w.dtype).expect("float weight type");
            let (bytes, rb) = (w.bytes(), w.row_bytes());
            assert!(bytes.len() >= rows * rb, "{}: storage too short", w.name);
            let x_rows: Vec<&[f32]> = x.chunks_exact(cols.max(1)).take(n).collect();
            for_each_cell(rows, n, cols, out, |j, i| {
                dot(&bytes[j * rb..(j + 1) * rb], x_rows[i])
            });
        }
    }
}

/// A weight matrix prepared for [`matmul`]: Q4_1 and Q8_0 weights are repacked into
/// [`Panels`] where the CPU has AVX-512 VNNI (the fast path for batched tokens; the source bytes
/// are then let go), otherwise the row kernels read the blocks as loaded.
#[derive(Debug)]
pub struct Linear {
    name: String,
    dtype: GgmlType,
    rows: usize,
    cols: usize,
    kernel: LinearKernel,
}

#[derive(Debug)]
enum LinearKernel {
    Rows(QTensor),
    Panels(Panels),
}

impl Linear {
    pub fn new(weight: QTensor) -> Self {
        let (name, dtype, rows, cols) = (
            weight.name.clone(),
            weight.dtype,
            weight.rows(),
            weight.cols(),
        );
        let kernel = match Panels::pack(&weight) {
            Some(panels) => LinearKernel::Panels(panels),
            None => LinearKernel::Rows(weight),
        };
        Linear {
            name,
            dtype,
            rows,
            cols,
            kernel,
        }
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn dtype(&self) -> GgmlType {
        self.dtype
    }

    /// Whether the panel kernels multiply this weight.
    pub fn uses_panels(&self) -> bool {
        matches!(self.kernel, LinearKernel::Panels(_))
    }

    /// [`matmul`] by this weight, through its panels when it has them.
    pub fn matmul(&self, x: &[f32], n: usize, out: &mut [f32]) {
        match &self.kernel {
            LinearKernel::Panels(panels) => {
                let cols = self.cols;
                assert_eq!(x.len(), n * cols, "{}: x is not n × {cols}", self.name);
                let format = self.dtype.act_format().expect("panels are quantised");
                panels.matmul(&QuantizedActs::quantize(format, x, n, cols), out);
            }
            LinearKernel::Rows(weight) => matmul(weight, x, n, out),
        }
    }
}

/// [`matmul`] with activations already quantised (`acts.format == w.dtype.act_format()`), so
/// several weights that read the same input (q, k, v; gate, up) quantise it once.
pub fn matmul_quantized(w: &QTensor, acts: &QuantizedActs, out: &mut [f32]) {
    let (rows, cols, n) = (w.rows(), w.cols(), acts.rows);
    assert_eq!(
        Some(acts.format),
        w.dtype.act_format(),
        "{}: activations quantised for another weight type",
        w.name
    );
    assert_eq!(acts.cols, cols, "{}: activation width", w.name);
    assert_eq!(out.len(), n * rows, "{}: out is not n × {rows}", w.name);
    let (bytes, rb) = (w.bytes(), w.row_bytes());
    assert!(bytes.len() >= rows * rb, "{}: storage too short", w.name);
    let act_rows: Vec<ActRow<'_>> = (0..n).map(|i| acts.row(i)).collect();
    if let Some(multi) = quant_dot_multi(w.dtype) {
        for_each_tile(rows, n, cols, MULTI_ROWS, out, |j, i0, vals| {
            multi(
                &bytes[j * rb..(j + 1) * rb],
                &act_rows[i0..i0 + vals.len()],
                vals,
            )
        });
        return;
    }
    let dot = quant_dot(w.dtype).expect("quantised weight type");
    for_each_cell(rows, n, cols, out, |j, i| {
        dot(&bytes[j * rb..(j + 1) * rb], &act_rows[i])
    });
}

/// Below this many multiply-adds a product runs on the calling thread: waking the pool costs
/// more than it saves.
pub(crate) const PARALLEL_MIN_MACS: usize = 64 * 1024;
/// x rows multiplied per pass over a weight chunk: their quantised rows stay in L1 while each
/// weight row is read once per pass.
const X_TILE: usize = 8;
/// Largest row group a tile kernel takes.
const MAX_TILE: usize = 8;

/// `out[i * rows + j] = cell(j, i)` for every weight row `j` and x row `i`, weight rows split
/// into chunks over the rayon pool. Each element is written by exactly one call, so how the work
/// is split never changes a value.
fn for_each_cell(
    rows: usize,
    n: usize,
    cols: usize,
    out: &mut [f32],
    cell: impl Fn(usize, usize) -> f32 + Sync,
) {
    for_each_tile(rows, n, cols, 1, out, |j, i, vals| vals[0] = cell(j, i));
}

/// As [`for_each_cell`], handing `tile(j, i0, vals)` up to `tile_rows` consecutive x rows at
/// once (`vals[k]` is the element for x row `i0 + k`); how rows are grouped never changes a
/// value, since each is computed by a kernel that treats rows independently.
fn for_each_tile(
    rows: usize,
    n: usize,
    cols: usize,
    tile_rows: usize,
    out: &mut [f32],
    tile: impl Fn(usize, usize, &mut [f32]) + Sync,
) {
    assert_eq!(out.len(), rows * n);
    assert!((1..=MAX_TILE).contains(&tile_rows));
    let run_chunk = |start: usize, end: usize, out: OutPtr| {
        let mut vals = [0.0f32; MAX_TILE];
        for x0 in (0..n).step_by(X_TILE) {
            let x_end = (x0 + X_TILE).min(n);
            for j in start..end {
                for i0 in (x0..x_end).step_by(tile_rows) {
                    let len = tile_rows.min(x_end - i0);
                    tile(j, i0, &mut vals[..len]);
                    for (k, v) in vals[..len].iter().enumerate() {
                        // SAFETY: i0 + k < n and j < rows, so the index is in bounds; chunks
                        // cover disjoint row ranges, so no two threads write the same element.
                        unsafe { *out.at((i0 + k) * rows + j) = *v };
                    }
                }
            }
        }
    };
    let out = OutPtr::new(out);
    let threads = rayon::current_num_threads();
    if threads <= 1 || rows * n * cols < PARALLEL_MIN_MACS || rows < 2 {
        run_chunk(0, rows, out);
        return;
    }
    // A few chunks per thread so work stealing evens out uneven progress.
    let chunk = rows.div_ceil(threads * 4).max(4);
    let chunks = rows.div_ceil(chunk);
    (0..chunks)
        .into_par_iter()
        .for_each(|c| run_chunk(c * chunk, ((c + 1) * chunk).min(rows), out));
}

/// The output buffer shared by the row-chunk workers (each writes only its own rows).
#[derive(Clone, Copy)]
pub(crate) struct OutPtr(*mut f32);
// SAFETY: workers write disjoint elements (see `for_each_cell`) and the buffer outlives them.
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}
impl OutPtr {
    pub(crate) fn new(out: &mut [f32]) -> Self {
        OutPtr(out.as_mut_ptr())
    }
    /// A method rather than field access, so closures capture the whole (Sync) wrapper.
    pub(crate) fn at(self, index: usize) -> *mut f32 {
        self.0.wrapping_add(index)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::quantize;
    use rand::{rngs::StdRng, Rng, SeedableRng};

    const ALL_TYPES: [GgmlType; 8] = [
        GgmlType::F32,
        GgmlType::F16,
        GgmlType::BF16,
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q8_0,
        GgmlType::Q4_K,
        GgmlType::Q6_K,
    ];

    fn random(rng: &mut StdRng, n: usize) -> Vec<f32> {
        (0..n).map(|_| rng.gen_range(-1.0f32..1.0)).collect()
    }

    fn weight(ty: GgmlType, rows: usize, cols: usize, values: &[f32]) -> QTensor {
        QTensor {
            name: format!("w.{ty:?}"),
            dtype: ty,
            shape: vec![rows, cols],
            storage: Storage::Owned(Arc::new(quantize(ty, values))),
        }
    }

    fn run(w: &QTensor, x: &[f32], n: usize) -> Vec<f32> {
        let mut out = vec![f32::NAN; n * w.rows()];
        matmul(w, x, n, &mut out);
        out
    }

    #[test]
    fn linear_uses_panels_where_it_can_and_stays_batch_invariant() {
        let mut rng = StdRng::seed_from_u64(9);
        let (cols, n) = (256, 11);
        let x = random(&mut rng, n * cols);
        for ty in [GgmlType::Q4_1, GgmlType::Q8_0, GgmlType::Q4_K] {
            for rows in [96, 24] {
                let w = weight(ty, rows, cols, &random(&mut rng, rows * cols));
                let linear = Linear::new(w.clone());
                let packable = ty != GgmlType::Q4_K && rows % 16 == 0;
                assert_eq!(
                    linear.uses_panels(),
                    packable && crate::quant::has_avx512_vnni(),
                    "{ty:?} {rows} rows"
                );
                let run_linear = |x: &[f32], n: usize| {
                    let mut out = vec![f32::NAN; n * rows];
                    linear.matmul(x, n, &mut out);
                    out
                };
                let batched = run_linear(&x, n);
                let rows_kernels = run(&w, &x, n);
                for (a, b) in batched.iter().zip(&rows_kernels) {
                    assert!(
                        (a - b).abs() <= 1e-4 * (1.0 + b.abs()),
                        "{ty:?}: {a} vs {b}"
                    );
                }
                for i in 0..n {
                    let alone = run_linear(&x[i * cols..(i + 1) * cols], 1);
                    assert_eq!(
                        alone[..],
                        batched[i * rows..(i + 1) * rows],
                        "{ty:?} {rows} rows: token {i} alone and batched"
                    );
                }
                let pool = rayon::ThreadPoolBuilder::new()
                    .num_threads(3)
                    .build()
                    .unwrap();
                assert_eq!(
                    pool.install(|| run_linear(&x, n)),
                    batched,
                    "{ty:?} threads"
                );
            }
        }
    }

    #[test]
    fn each_output_is_bit_identical_alone_batched_and_on_any_thread_count() {
        let mut rng = StdRng::seed_from_u64(1);
        let (rows, cols, n) = (96, 512, 13);
        let x = random(&mut rng, n * cols);
        for ty in ALL_TYPES {
            let w = weight(ty, rows, cols, &random(&mut rng, rows * cols));
            let batched = run(&w, &x, n);
            for i in 0..n {
                let alone = run(&w, &x[i * cols..(i + 1) * cols], 1);
                let row = &batched[i * rows..(i + 1) * rows];
                assert!(
                    alone
                        .iter()
                        .zip(row)
                        .all(|(a, b)| a.to_bits() == b.to_bits()),
                    "{ty:?}: row {i} differs alone and batched"
                );
            }
            // Batch order must not matter either: reverse the rows.
            let reversed: Vec<f32> = x.chunks(cols).rev().flatten().copied().collect();
            let rev_out = run(&w, &reversed, n);
            for i in 0..n {
                assert_eq!(
                    rev_out[(n - 1 - i) * rows..(n - i) * rows],
                    batched[i * rows..(i + 1) * rows],
                    "{ty:?}: row {i} changed with its batch position"
                );
            }
            for threads in [1, 3] {
                let pool = rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .build()
                    .unwrap();
                let other = pool.install(|| run(&w, &x, n));
                assert!(
                    other
                        .iter()
                        .zip(&batched)
                        .all(|(a, b)| a.to_bits() == b.to_bits()),
                    "{ty:?}: {threads} threads changed the result"
                );
            }
        }
    }

    #[test]
    fn matmul_matches_a_float_reference() {
        // Reference: f64 dot of the dequantised weights with the unquantised x. Quantised types
        // differ by the activation rounding (≤ half a step of amax/127 per value).
        let mut rng = StdRng::seed_from_u64(2);
        let (rows, cols, n) = (40, 256, 3);
        let x = random(&mut rng, n * cols);
        for ty in ALL_TYPES {
            let w = weight(ty, rows, cols, &random(&mut rng, rows * cols));
            let wf = w.to_f32();
            let out = run(&w, &x, n);
            for i in 0..n {
                let xi = &x[i * cols..(i + 1) * cols];
                let amax = xi.iter().fold(0.0f32, |m, v| m.max(v.abs())) as f64;
                for j in 0..rows {
                    let wj = &wf[j * cols..(j + 1) * cols];
                    let want: f64 = wj.iter().zip(xi).map(|(&a, &b)| a as f64 * b as f64).sum();
                    let l1: f64 = wj.iter().map(|&a| (a as f64).abs()).sum();
                    let bound = if ty.is_quantized() {
                        l1 * amax / 254.0
                    } else {
                        0.0
                    } + 1e-4;
                    let got = out[i * rows + j] as f64;
                    assert!(
                        (got - want).abs() <= bound,
                        "{ty:?} [{i},{j}]: {got} vs {want}"
                    );
                }
            }
        }
    }

    #[test]
    fn pre_quantised_activations_give_the_same_bits() {
        let mut rng = StdRng::seed_from_u64(4);
        let (rows, cols, n) = (32, 256, 2);
        let x = random(&mut rng, n * cols);
        let w = weight(GgmlType::Q4_1, rows, cols, &random(&mut rng, rows * cols));
        let acts = QuantizedActs::quantize(GgmlType::Q4_1.act_format().unwrap(), &x, n, cols);
        let mut out = vec![0.0; n * rows];
        matmul_quantized(&w, &acts, &mut out);
        assert_eq!(out, run(&w, &x, n));
    }
}
