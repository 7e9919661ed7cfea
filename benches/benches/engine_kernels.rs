//! The CPU matmul kernels on SmolLM2-135M's shapes: the Q4_1 linear weights (576x576, 192x576,
//! 1536x576, 576x1536) and the 49152x576 Q8_0 embedding used as the output head. `n = 1` is the
//! single-stream decode step (what the 0.7x-of-llama.cpp target is about); `n = 32` a batched
//! decode or prefill chunk. Runs on the global rayon pool (RAYON_NUM_THREADS=2 to match the
//! llama.cpp comparison).

use std::hint::black_box;
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use sluice_engine::quant::{quantize, simd_name, GgmlType};
use sluice_engine::tensor::{matmul, QTensor, Storage};

/// Deterministic weight-like values in [-1, 1).
fn values(n: usize, salt: usize) -> Vec<f32> {
    (0..n)
        .map(|i| ((i.wrapping_mul(7919) + salt) % 1000) as f32 / 500.0 - 1.0)
        .collect()
}

fn bench(c: &mut Criterion) {
    eprintln!("kernels: {}, {} threads", simd_name(), rayon_threads());
    let shapes = [
        (GgmlType::Q4_1, 576, 576),
        (GgmlType::Q4_1, 192, 576),
        (GgmlType::Q4_1, 1536, 576),
        (GgmlType::Q4_1, 576, 1536),
        (GgmlType::Q8_0, 49152, 576),
    ];
    let mut group = c.benchmark_group("engine_matmul");
    group.sample_size(20);
    for (ty, rows, cols) in shapes {
        let w = QTensor {
            name: format!("{ty:?}_{rows}x{cols}"),
            dtype: ty,
            shape: vec![rows, cols],
            storage: Storage::Owned(Arc::new(quantize(ty, &values(rows * cols, 1)))),
        };
        for n in [1usize, 32] {
            let x = values(n * cols, 2);
            let mut out = vec![0.0f32; n * rows];
            group.throughput(Throughput::Elements((rows * cols * n) as u64));
            group.bench_function(format!("{ty:?} {rows}x{cols} n={n}"), |b| {
                b.iter(|| matmul(black_box(&w), black_box(&x), n, &mut out))
            });
        }
    }
    group.finish();
}

/// The pool size matmul will use (rayon is the engine's dependency, not the bench's).
fn rayon_threads() -> String {
    std::env::var("RAYON_NUM_THREADS").unwrap_or_else(|_| "all".into())
}

criterion_group!(benches, bench);
criterion_main!(benches);
