//! BERT encoder for sentence embeddings: mean pooling over the tokens, then L2 normalisation
//! (sentence-transformers' recipe for models such as all-MiniLM-L6-v2).

use rayon::prelude::*;

use crate::config::ModelConfig;
use crate::error::{EngineError, Result};
use crate::model::ops;
use crate::tensor::{matmul, QTensor};
use crate::weights::WeightSource;

struct Linear {
    weight: QTensor,
    bias: Vec<f32>,
}

impl Linear {
    fn load(source: &dyn WeightSource, prefix: &str) -> Result<Self> {
        Ok(Linear {
            weight: source.tensor(&format!("{prefix}.weight"))?,
            bias: source.tensor(&format!("{prefix}.bias"))?.to_f32(),
        })
    }
    fn forward(&self, x: &[f32], n: usize) -> Vec<f32> {
        let mut out = vec![0.0; n * self.weight.rows()];
        matmul(&self.weight, x, n, &mut out);
        ops::add_bias(&mut out, &self.bias);
        out
    }
}

struct Norm {
    weight: Vec<f32>,
    bias: Vec<f32>,
}

impl Norm {
    fn load(source: &dyn WeightSource, prefix: &str) -> Result<Self> {
        // Old checkpoints call LayerNorm parameters gamma/beta.
        let (w, b) = if source.contains(&format!("{prefix}.gamma")) {
            ("gamma", "beta")
        } else {
            ("weight", "bias")
        };
        Ok(Norm {
            weight: source.tensor(&format!("{prefix}.{w}"))?.to_f32(),
            bias: source.tensor(&format!("{prefix}.{b}"))?.to_f32(),
        })
    }
}

struct Layer {
    query: Linear,
    key: Linear,
    value: Linear,
    attn_out: Linear,
    attn_norm: Norm,
    intermediate: Linear,
    output: Linear,
    out_norm: Norm,
}

pub struct BertModel {
    pub config: ModelConfig,
    word: QTensor,
    position: QTensor,
    token_type: QTensor,
    embed_norm: Norm,
    layers: Vec<Layer>,
}

impl BertModel {
    pub fn load(config: ModelConfig, source: &dyn WeightSource) -> Result<Self> {
        // Some exports keep the `bert.` prefix of BertForMaskedLM.
        let p = if source.contains("bert.embeddings.word_embeddings.weight") {
            "bert."
        } else {
            ""
        };
        let t = |name: &str| source.tensor(&format!("{p}{name}"));
        let mut layers = Vec::with_capacity(config.num_layers);
        for i in 0..config.num_layers {
            let l = format!("{p}encoder.layer.{i}");
            layers.push(Layer {
                query: Linear::load(source, &format!("{l}.attention.self.query"))?,
                key: Linear::load(source, &format!("{l}.attention.self.key"))?,
                value: Linear::load(source, &format!("{l}.attention.self.value"))?,
                attn_out: Linear::load(source, &format!("{l}.attention.output.dense"))?,
                attn_norm: Norm::load(source, &format!("{l}.attention.output.LayerNorm"))?,
                intermediate: Linear::load(source, &format!("{l}.intermediate.dense"))?,
                output: Linear::load(source, &format!("{l}.output.dense"))?,
                out_norm: Norm::load(source, &format!("{l}.output.LayerNorm"))?,
            });
        }
        Ok(BertModel {
            word: t("embeddings.word_embeddings.weight")?,
            position: t("embeddings.position_embeddings.weight")?,
            token_type: t("embeddings.token_type_embeddings.weight")?,
            embed_norm: Norm::load(source, &format!("{p}embeddings.LayerNorm"))?,
            layers,
            config,
        })
    }

    /// Longest input the position table allows.
    pub fn max_len(&self) -> usize {
        self.position.rows()
    }

    /// One L2-normalised, mean-pooled embedding per input (token ids include [CLS]/[SEP]).
    pub fn embed(&self, inputs: &[Vec<u32>]) -> Result<Vec<Vec<f32>>> {
        inputs.iter().map(|ids| self.embed_one(ids)).collect()
    }

    fn embed_one(&self, ids: &[u32]) -> Result<Vec<f32>> {
        let cfg = &self.config;
        let (h, n) = (cfg.hidden_size, ids.len());
        if n == 0 {
            return Err(EngineError::InvalidRequest("empty input".into()));
        }
        if n > self.max_len() {
            return Err(EngineError::InvalidRequest(format!(
                "input has {n} tokens, the model accepts at most {}",
                self.max_len()
            )));
        }
        let mut x = vec![0.0f32; n * h];
        let mut row = vec![0.0f32; h];
        let mut type_row = vec![0.0f32; h];
        self.token_type.row_f32(0, &mut type_row);
        for (t, &id) in ids.iter().enumerate() {
            if id as usize >= self.word.rows() {
                return Err(EngineError::InvalidRequest(format!(
                    "token id {id} is outside the vocabulary"
                )));
            }
            let out = &mut x[t * h..(t + 1) * h];
            self.word.row_f32(id as usize, out);
            self.position.row_f32(t, &mut row);
            ops::add_in_place(out, &row);
            ops::add_in_place(out, &type_row);
        }
        ops::layer_norm(
            &mut x,
            &self.embed_norm.weight,
            &self.embed_norm.bias,
            cfg.norm_eps,
        );

        let (nh, hd) = (cfg.num_heads, h / cfg.num_heads);
        let scale = 1.0 / (hd as f32).sqrt();
        for layer in &self.layers {
            let q = layer.query.forward(&x, n);
            let k = layer.key.forward(&x, n);
            let v = layer.value.forward(&x, n);
            let mut ctx = vec![0.0f32; n * h];
            ctx.par_chunks_mut(h).enumerate().for_each(|(t, out)| {
                let mut scores = vec![0.0f32; n];
                for head in 0..nh {
                    let qh = &q[t * h + head * hd..][..hd];
                    for (p, s) in scores.iter_mut().enumerate() {
                        *s = ops::dot(qh, &k[p * h + head * hd..][..hd]) * scale;
                    }
                    ops::softmax(&mut scores);
                    let o = &mut out[head * hd..(head + 1) * hd];
                    for (p, &w) in scores.iter().enumerate() {
                        ops::axpy(o, w, &v[p * h + head * hd..][..hd]);
                    }
                }
            });
            let mut attn = layer.attn_out.forward(&ctx, n);
            ops::add_in_place(&mut attn, &x);
            ops::layer_norm(
                &mut attn,
                &layer.attn_norm.weight,
                &layer.attn_norm.bias,
                cfg.norm_eps,
            );
            let mut inter = layer.intermediate.forward(&attn, n);
            inter.iter_mut().for_each(|v| *v = ops::gelu(*v));
            let mut out = layer.output.forward(&inter, n);
            ops::add_in_place(&mut out, &attn);
            ops::layer_norm(
                &mut out,
                &layer.out_norm.weight,
                &layer.out_norm.bias,
                cfg.norm_eps,
            );
            x = out;
        }
        let mut pooled = vec![0.0f32; h];
        for row in x.chunks_exact(h) {
            ops::add_in_place(&mut pooled, row);
        }
        let norm = pooled
            .iter()
            .map(|v| (v / n as f32).powi(2))
            .sum::<f32>()
            .sqrt();
        Ok(pooled
            .iter()
            .map(|v| v / n as f32 / norm.max(1e-12))
            .collect())
    }
}
