//! A weight tensor as loaded: f32 or still in its GGML blocks, and the matrix product the
//! executors use. Each output element is computed the same way whatever the batch size, so a
//! sequence gets bit-identical logits alone or batched (tests rely on it).

use std::sync::Arc;

use crate::quant::GgmlType;

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
pub fn matmul(w: &QTensor, x: &[f32], n: usize, out: &mut [f32]) {
    let (rows, cols) = (w.rows(), w.cols());
    assert_eq!(x.len(), n * cols);
    assert_eq!(out.len(), n * rows);
    let mut row = vec![0.0f32; cols];
    for j in 0..rows {
        w.row_f32(j, &mut row);
        for i in 0..n {
            let xi = &x[i * cols..(i + 1) * cols];
            out[i * rows + j] = xi.iter().zip(&row).map(|(a, b)| a * b).sum();
        }
    }
}
