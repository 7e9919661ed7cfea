//! Llama-family decoder (Llama 2/3, SmolLM2, TinyLlama, Mistral, Qwen2) on the CPU, reading and
//! writing a paged KV cache laid out by the scheduler's block tables.

use half::{
    f16,
    slice::{HalfBitsSliceExt, HalfFloatSliceExt},
};
use rayon::prelude::*;

use crate::config::{Architecture, ModelConfig, RopeStyle};
use crate::error::{EngineError, Result};
use crate::model::{attention, ops};
use crate::plan::StepPlan;
use crate::quant::GgmlType;
use crate::tensor::{Linear, QTensor, Storage};
use crate::weights::WeightSource;

/// Tensor names: GGUF's and Hugging Face's spellings of the same weights.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Naming {
    Gguf,
    HuggingFace,
}

impl Naming {
    fn embed(self) -> &'static str {
        match self {
            Naming::Gguf => "token_embd.weight",
            Naming::HuggingFace => "model.embed_tokens.weight",
        }
    }
    fn final_norm(self) -> &'static str {
        match self {
            Naming::Gguf => "output_norm.weight",
            Naming::HuggingFace => "model.norm.weight",
        }
    }
    fn lm_head(self) -> &'static str {
        match self {
            Naming::Gguf => "output.weight",
            Naming::HuggingFace => "lm_head.weight",
        }
    }
    fn layer(self, i: usize, part: &str) -> String {
        match self {
            Naming::Gguf => {
                let short = match part {
                    "input_layernorm.weight" => "attn_norm.weight",
                    "self_attn.q_proj.weight" => "attn_q.weight",
                    "self_attn.k_proj.weight" => "attn_k.weight",
                    "self_attn.v_proj.weight" => "attn_v.weight",
                    "self_attn.q_proj.bias" => "attn_q.bias",
                    "self_attn.k_proj.bias" => "attn_k.bias",
                    "self_attn.v_proj.bias" => "attn_v.bias",
                    "self_attn.o_proj.weight" => "attn_output.weight",
                    "post_attention_layernorm.weight" => "ffn_norm.weight",
                    "mlp.gate_proj.weight" => "ffn_gate.weight",
                    "mlp.up_proj.weight" => "ffn_up.weight",
                    "mlp.down_proj.weight" => "ffn_down.weight",
                    other => other,
                };
                format!("blk.{i}.{short}")
            }
            Naming::HuggingFace => format!("model.layers.{i}.{part}"),
        }
    }
}

/// Projections whose outputs are concatenated (q|k|v, gate|up). Neighbours of the same element
/// type are stacked row-wise so one matmul computes them; Q4_K_M files mix types (v in Q6_K), so
/// there may be several groups.
struct Stacked {
    groups: Vec<Linear>,
    rows: usize,
}

impl Stacked {
    fn new(name: &str, parts: Vec<QTensor>) -> Result<Self> {
        let rows = parts.iter().map(QTensor::rows).sum();
        let mut groups: Vec<Vec<QTensor>> = Vec::new();
        for part in parts {
            match groups.last_mut() {
                Some(group) if group[0].dtype == part.dtype => group.push(part),
                _ => groups.push(vec![part]),
            }
        }
        let groups = groups
            .into_iter()
            .map(|g| {
                if g.len() == 1 {
                    Ok(Linear::new(g.into_iter().next().expect("one")))
                } else {
                    stack_rows(name, &g).map(Linear::new)
                }
            })
            .collect::<Result<_>>()?;
        Ok(Stacked { groups, rows })
    }

    fn dtype(&self) -> GgmlType {
        self.groups[0].dtype()
    }

    /// `out` is `[n][rows]`, each row the concatenation of the parts' outputs.
    fn matmul(&self, x: &[f32], n: usize, out: &mut [f32]) {
        if let [only] = self.groups.as_slice() {
            return only.matmul(x, n, out);
        }
        let mut offset = 0;
        for group in &self.groups {
            let g_rows = group.rows();
            let mut part = vec![0.0f32; n * g_rows];
            group.matmul(x, n, &mut part);
            for (dst, src) in out
                .chunks_exact_mut(self.rows)
                .zip(part.chunks_exact(g_rows))
            {
                dst[offset..offset + g_rows].copy_from_slice(src);
            }
            offset += g_rows;
        }
    }
}

struct Layer {
    attn_norm: Vec<f32>,
    /// q, k and v projections.
    qkv: Stacked,
    qkv_bias: Option<Vec<f32>>,
    o: Linear,
    ffn_norm: Vec<f32>,
    /// gate and up projections.
    gate_up: Stacked,
    down: Linear,
}

pub struct LlamaModel {
    pub config: ModelConfig,
    embed: QTensor,
    layers: Vec<Layer>,
    final_norm: Vec<f32>,
    lm_head: Linear,
    inv_freq: Vec<f32>,
}

/// The CPU KV cache: per layer, keys and values as `[kv_heads][num_blocks·block_size][head_dim]`:
/// each KV head's rows for a block's consecutive positions are contiguous, which is how
/// attention reads them. Stored as f16 (llama.cpp's default too): attention over many
/// sequences is bound by reading the cache, and this halves it.
pub struct KvCache {
    pub block_size: usize,
    pub num_blocks: usize,
    /// f16 bit patterns: a zeroed `u16` buffer is allocated lazily by the OS, so untouched
    /// blocks cost no memory (a `vec![f16::ZERO; n]` would write every page at start).
    keys: Vec<Vec<u16>>,
    values: Vec<Vec<u16>>,
    /// Floats per KV head per layer (`num_blocks · block_size · head_dim`).
    head_plane: usize,
}

impl KvCache {
    /// Bytes one token takes across all layers.
    pub fn bytes_per_token(config: &ModelConfig) -> usize {
        2 * config.num_layers * config.num_kv_heads * config.head_dim * std::mem::size_of::<f16>()
    }

    pub fn new(config: &ModelConfig, block_size: usize, num_blocks: usize) -> Self {
        let head_plane = num_blocks * block_size * config.head_dim;
        let layer_len = config.num_kv_heads * head_plane;
        KvCache {
            block_size,
            num_blocks,
            keys: (0..config.num_layers)
                .map(|_| vec![0u16; layer_len])
                .collect(),
            values: (0..config.num_layers)
                .map(|_| vec![0u16; layer_len])
                .collect(),
            head_plane,
        }
    }
}

fn vector(source: &dyn WeightSource, name: &str) -> Result<Vec<f32>> {
    Ok(source.tensor(name)?.to_f32())
}

/// Stack tensors with the same element type and row length into one (rows concatenated).
fn stack_rows(name: &str, parts: &[QTensor]) -> Result<QTensor> {
    let first = &parts[0];
    let cols = first.cols();
    if parts
        .iter()
        .any(|p| p.cols() != cols || p.dtype != first.dtype)
    {
        return Err(EngineError::Unsupported(format!(
            "{name}: projections differ in type or width: {parts:?}"
        )));
    }
    let mut bytes = Vec::with_capacity(parts.iter().map(|p| p.bytes().len()).sum());
    for p in parts {
        bytes.extend_from_slice(p.bytes());
    }
    Ok(QTensor {
        name: name.to_string(),
        dtype: first.dtype,
        shape: vec![parts.iter().map(QTensor::rows).sum(), cols],
        storage: Storage::Owned(std::sync::Arc::new(bytes)),
    })
}

impl LlamaModel {
    pub fn load(config: ModelConfig, source: &dyn WeightSource, naming: Naming) -> Result<Self> {
        let embed = source.tensor(naming.embed())?;
        let mut config = config;
        if config.vocab_size == 0 {
            config.vocab_size = embed.rows();
        }
        let expect = |t: &QTensor, rows: usize, cols: usize| -> Result<()> {
            if t.rows() != rows || t.cols() != cols {
                return Err(EngineError::Unsupported(format!(
                    "tensor `{}` has shape {:?}, expected [{rows}, {cols}]",
                    t.name, t.shape
                )));
            }
            Ok(())
        };
        let (h, hd) = (config.hidden_size, config.head_dim);
        let (q_rows, kv_rows) = (config.num_heads * hd, config.num_kv_heads * hd);
        expect(&embed, config.vocab_size, h)?;
        let mut layers = Vec::with_capacity(config.num_layers);
        for i in 0..config.num_layers {
            let t = |part: &str| source.tensor(&naming.layer(i, part));
            let (q, k, v) = (
                t("self_attn.q_proj.weight")?,
                t("self_attn.k_proj.weight")?,
                t("self_attn.v_proj.weight")?,
            );
            expect(&q, q_rows, h)?;
            expect(&k, kv_rows, h)?;
            expect(&v, kv_rows, h)?;
            let qkv_bias = if config.architecture == Architecture::Qwen2 {
                let mut bias = t("self_attn.q_proj.bias")?.to_f32();
                bias.extend(t("self_attn.k_proj.bias")?.to_f32());
                bias.extend(t("self_attn.v_proj.bias")?.to_f32());
                Some(bias)
            } else {
                None
            };
            let (gate, up, down) = (
                t("mlp.gate_proj.weight")?,
                t("mlp.up_proj.weight")?,
                t("mlp.down_proj.weight")?,
            );
            expect(&gate, config.intermediate_size, h)?;
            expect(&up, config.intermediate_size, h)?;
            expect(&down, h, config.intermediate_size)?;
            let o = t("self_attn.o_proj.weight")?;
            expect(&o, h, q_rows)?;
            layers.push(Layer {
                attn_norm: vector(source, &naming.layer(i, "input_layernorm.weight"))?,
                qkv: Stacked::new(&format!("layer {i} qkv"), vec![q, k, v])?,
                qkv_bias,
                o: Linear::new(o),
                ffn_norm: vector(source, &naming.layer(i, "post_attention_layernorm.weight"))?,
                gate_up: Stacked::new(&format!("layer {i} gate_up"), vec![gate, up])?,
                down: Linear::new(down),
            });
        }
        let lm_head = if source.contains(naming.lm_head()) && !config.tie_word_embeddings {
            source.tensor(naming.lm_head())?
        } else {
            embed.clone()
        };
        expect(&lm_head, config.vocab_size, h)?;
        Ok(LlamaModel {
            inv_freq: config.rope_inv_freq(),
            final_norm: vector(source, naming.final_norm())?,
            embed,
            layers,
            lm_head: Linear::new(lm_head),
            config,
        })
    }

    /// Element type of the bulk of the weights (for logs).
    pub fn weight_type(&self) -> GgmlType {
        self.layers
            .first()
            .map(|l| l.qkv.dtype())
            .unwrap_or(self.embed.dtype)
    }

    /// `(sin, cos)` of each rotary frequency at `pos`: computed once per token and step, not
    /// per layer and head.
    fn rope_angles(&self, pos: usize) -> Vec<(f32, f32)> {
        self.inv_freq
            .iter()
            .map(|freq| (pos as f32 * freq).sin_cos())
            .collect()
    }

    fn rope(&self, x: &mut [f32], angles: &[(f32, f32)]) {
        let hd = self.config.head_dim;
        let half = hd / 2;
        for head in x.chunks_exact_mut(hd) {
            for (i, &(sin, cos)) in angles.iter().enumerate() {
                let (a, b) = match self.config.rope_style {
                    RopeStyle::Interleaved => (2 * i, 2 * i + 1),
                    RopeStyle::Half => (i, i + half),
                };
                let (x0, x1) = (head[a], head[b]);
                head[a] = x0 * cos - x1 * sin;
                head[b] = x0 * sin + x1 * cos;
            }
        }
    }

    /// Run one planned step; logits for each chunk that samples, in plan order.
    pub fn forward(&self, cache: &mut KvCache, plan: &StepPlan) -> Result<Vec<Vec<f32>>> {
        let cfg = &self.config;
        let (h, hd) = (cfg.hidden_size, cfg.head_dim);
        let (nh, nkv) = (cfg.num_heads, cfg.num_kv_heads);
        let (q_len, kv_len) = (nh * hd, nkv * hd);
        let qkv_len = q_len + 2 * kv_len;
        let bs = cache.block_size;

        // Token t's chunk, position and cache slot.
        let mut tokens = Vec::new();
        let mut owner = Vec::new();
        let mut positions = Vec::new();
        let mut slots = Vec::new();
        for (c, chunk) in plan.chunks.iter().enumerate() {
            let end = chunk.start_pos + chunk.tokens.len();
            if chunk.block_table.len() * bs < end {
                return Err(EngineError::Executor(format!(
                    "sequence {}: block table covers {} positions, step needs {end}",
                    chunk.seq_id,
                    chunk.block_table.len() * bs
                )));
            }
            for (i, &tok) in chunk.tokens.iter().enumerate() {
                if tok as usize >= cfg.vocab_size {
                    return Err(EngineError::InvalidRequest(format!(
                        "token id {tok} is outside the vocabulary (size {})",
                        cfg.vocab_size
                    )));
                }
                let pos = chunk.start_pos + i;
                let block = chunk.block_table[pos / bs] as usize;
                if block >= cache.num_blocks {
                    return Err(EngineError::Executor(format!("block {block} out of range")));
                }
                tokens.push(tok);
                owner.push(c);
                positions.push(pos);
                slots.push(block * bs + pos % bs);
            }
        }
        let n = tokens.len();
        if n == 0 {
            return Ok(Vec::new());
        }

        let mut x = vec![0.0f32; n * h];
        for (t, &tok) in tokens.iter().enumerate() {
            self.embed.row_f32(tok as usize, &mut x[t * h..(t + 1) * h]);
        }
        let mut normed = vec![0.0f32; n * h];
        let mut qkv = vec![0.0f32; n * qkv_len];
        let mut attn = vec![0.0f32; n * q_len];
        let mut proj = vec![0.0f32; n * h];
        let ffn = cfg.intermediate_size;
        let mut gate_up = vec![0.0f32; n * 2 * ffn];
        let mut act = vec![0.0f32; n * ffn];
        let scale = 1.0 / (hd as f32).sqrt();
        let group = nh / nkv;
        let angles: Vec<Vec<(f32, f32)>> = positions.iter().map(|&p| self.rope_angles(p)).collect();
        // Cache slot of every position each chunk's tokens attend to, shared by all layers.
        let chunk_slots: Vec<Vec<usize>> = plan
            .chunks
            .iter()
            .map(|c| {
                (0..c.start_pos + c.tokens.len())
                    .map(|p| c.block_table[p / bs] as usize * bs + p % bs)
                    .collect()
            })
            .collect();

        for (l, layer) in self.layers.iter().enumerate() {
            ops::rms_norm(&x, &layer.attn_norm, cfg.norm_eps, &mut normed);
            layer.qkv.matmul(&normed, n, &mut qkv);
            if let Some(bias) = &layer.qkv_bias {
                ops::add_bias(&mut qkv, bias);
            }
            let keys: &mut [f16] = cache.keys[l].reinterpret_cast_mut();
            let values: &mut [f16] = cache.values[l].reinterpret_cast_mut();
            for t in 0..n {
                let row = &mut qkv[t * qkv_len..(t + 1) * qkv_len];
                self.rope(&mut row[..q_len + kv_len], &angles[t]);
                for kvh in 0..nkv {
                    let at = kvh * cache.head_plane + slots[t] * hd;
                    let from = q_len + kvh * hd;
                    keys[at..at + hd].convert_from_f32_slice(&row[from..from + hd]);
                    values[at..at + hd]
                        .convert_from_f32_slice(&row[from + kv_len..from + kv_len + hd]);
                }
            }
            let keys: &[f16] = cache.keys[l].reinterpret_cast();
            let values: &[f16] = cache.values[l].reinterpret_cast();
            let plane = cache.head_plane;
            // One task per (token, KV head): a single decoding sequence uses every thread too.
            attn.par_chunks_mut(group * hd)
                .enumerate()
                .for_each(|(tk, out)| {
                    let (t, kvh) = (tk / nkv, tk % nkv);
                    let head_group = attention::HeadGroup {
                        queries: &qkv[t * qkv_len + kvh * group * hd..][..group * hd],
                        slots: &chunk_slots[owner[t]][..positions[t] + 1],
                        keys: &keys[kvh * plane..(kvh + 1) * plane],
                        values: &values[kvh * plane..(kvh + 1) * plane],
                        head_dim: hd,
                        scale,
                    };
                    attention::attend(&head_group, out);
                });
            layer.o.matmul(&attn, n, &mut proj);
            ops::add_in_place(&mut x, &proj);

            ops::rms_norm(&x, &layer.ffn_norm, cfg.norm_eps, &mut normed);
            layer.gate_up.matmul(&normed, n, &mut gate_up);
            for (gu, a) in gate_up.chunks_exact(2 * ffn).zip(act.chunks_exact_mut(ffn)) {
                for ((g, u), out) in gu[..ffn].iter().zip(&gu[ffn..]).zip(a.iter_mut()) {
                    *out = ops::silu(*g) * u;
                }
            }
            layer.down.matmul(&act, n, &mut proj);
            ops::add_in_place(&mut x, &proj);
        }

        // Only the last position of each sampling chunk needs logits.
        let mut last_rows = Vec::new();
        let mut t = 0;
        for chunk in &plan.chunks {
            t += chunk.tokens.len();
            if chunk.sample {
                last_rows.extend_from_slice(&x[(t - 1) * h..t * h]);
            }
        }
        let ns = last_rows.len() / h;
        if ns == 0 {
            return Ok(Vec::new());
        }
        let mut normed_last = vec![0.0f32; ns * h];
        ops::rms_norm(&last_rows, &self.final_norm, cfg.norm_eps, &mut normed_last);
        let vocab = cfg.vocab_size;
        let mut logits = vec![0.0f32; ns * vocab];
        self.lm_head.matmul(&normed_last, ns, &mut logits);
        Ok(logits.chunks_exact(vocab).map(<[f32]>::to_vec).collect())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    use super::*;
    use crate::plan::ScheduledChunk;
    use crate::safetensors_dir::{write_f32_safetensors, SafetensorsDir};

    const HIDDEN: usize = 32;
    const HEADS: usize = 4;
    const KV_HEADS: usize = 2;
    const HEAD_DIM: usize = 8;
    const FFN: usize = 48;
    const VOCAB: usize = 40;
    const LAYERS: usize = 2;
    const THETA: f32 = 10_000.0;
    const EPS: f32 = 1e-5;

    type Tensors = HashMap<String, (Vec<usize>, Vec<f32>)>;

    /// A random Llama in Hugging Face naming, written as a real model folder.
    fn toy_llama(dir: &std::path::Path, qwen_biases: bool) -> Tensors {
        let mut rng = StdRng::seed_from_u64(7);
        let mut t = Tensors::new();
        let mut add = |name: String, shape: Vec<usize>, scale: f32, offset: f32| {
            let n = shape.iter().product();
            let v = (0..n)
                .map(|_| offset + scale * (rng.gen::<f32>() * 2.0 - 1.0))
                .collect();
            t.insert(name, (shape, v));
        };
        add(
            "model.embed_tokens.weight".into(),
            vec![VOCAB, HIDDEN],
            1.0,
            0.0,
        );
        for l in 0..LAYERS {
            let p = format!("model.layers.{l}");
            add(
                format!("{p}.input_layernorm.weight"),
                vec![HIDDEN],
                0.2,
                1.0,
            );
            add(
                format!("{p}.self_attn.q_proj.weight"),
                vec![HEADS * HEAD_DIM, HIDDEN],
                0.3,
                0.0,
            );
            add(
                format!("{p}.self_attn.k_proj.weight"),
                vec![KV_HEADS * HEAD_DIM, HIDDEN],
                0.3,
                0.0,
            );
            add(
                format!("{p}.self_attn.v_proj.weight"),
                vec![KV_HEADS * HEAD_DIM, HIDDEN],
                0.3,
                0.0,
            );
            if qwen_biases {
                add(
                    format!("{p}.self_attn.q_proj.bias"),
                    vec![HEADS * HEAD_DIM],
                    0.2,
                    0.0,
                );
                add(
                    format!("{p}.self_attn.k_proj.bias"),
                    vec![KV_HEADS * HEAD_DIM],
                    0.2,
                    0.0,
                );
                add(
                    format!("{p}.self_attn.v_proj.bias"),
                    vec![KV_HEADS * HEAD_DIM],
                    0.2,
                    0.0,
                );
            }
            add(
                format!("{p}.self_attn.o_proj.weight"),
                vec![HIDDEN, HEADS * HEAD_DIM],
                0.3,
                0.0,
            );
            add(
                format!("{p}.post_attention_layernorm.weight"),
                vec![HIDDEN],
                0.2,
                1.0,
            );
            add(
                format!("{p}.mlp.gate_proj.weight"),
                vec![FFN, HIDDEN],
                0.3,
                0.0,
            );
            add(
                format!("{p}.mlp.up_proj.weight"),
                vec![FFN, HIDDEN],
                0.3,
                0.0,
            );
            add(
                format!("{p}.mlp.down_proj.weight"),
                vec![HIDDEN, FFN],
                0.3,
                0.0,
            );
        }
        add("model.norm.weight".into(), vec![HIDDEN], 0.2, 1.0);
        add("lm_head.weight".into(), vec![VOCAB, HIDDEN], 0.5, 0.0);
        let list: Vec<_> = t
            .iter()
            .map(|(k, (s, v))| (k.clone(), s.clone(), v.clone()))
            .collect();
        write_f32_safetensors(&dir.join("model.safetensors"), &list).unwrap();
        let arch = if qwen_biases {
            "Qwen2ForCausalLM"
        } else {
            "LlamaForCausalLM"
        };
        let config = serde_json::json!({
            "architectures": [arch], "hidden_size": HIDDEN, "num_hidden_layers": LAYERS,
            "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS,
            "intermediate_size": FFN, "vocab_size": VOCAB, "rms_norm_eps": EPS,
            "rope_theta": THETA, "max_position_embeddings": 64, "tie_word_embeddings": false
        });
        std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
        t
    }

    /// Independent reference: the textbook forward over the whole sequence (no cache, no
    /// blocks), straight from the Hugging Face modelling code's definitions.
    fn reference_last_logits(t: &Tensors, tokens: &[u32]) -> Vec<f32> {
        let w = |name: &str| &t[name].1;
        let linear = |name: &str, x: &[f32]| -> Vec<f32> {
            let (shape, m) = &t[name];
            let mut y: Vec<f32> = (0..shape[0])
                .map(|r| (0..shape[1]).map(|c| m[r * shape[1] + c] * x[c]).sum())
                .collect();
            let bias = name.replace(".weight", ".bias");
            if let Some((_, b)) = t.get(&bias) {
                y.iter_mut().zip(b).for_each(|(v, b)| *v += b);
            }
            y
        };
        let norm = |x: &[f32], g: &[f32]| -> Vec<f32> {
            let ms = x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32;
            x.iter()
                .zip(g)
                .map(|(v, g)| v / (ms + EPS).sqrt() * g)
                .collect()
        };
        let rope = |x: &mut [f32], pos: usize| {
            for head in x.chunks_mut(HEAD_DIM) {
                let rotated: Vec<f32> = (0..HEAD_DIM)
                    .map(|i| {
                        let half = HEAD_DIM / 2;
                        let freq = THETA.powf(-2.0 * (i % half) as f32 / HEAD_DIM as f32);
                        let (sin, cos) = (pos as f32 * freq).sin_cos();
                        let other = if i < half {
                            -head[i + half]
                        } else {
                            head[i - half]
                        };
                        head[i] * cos + other * sin
                    })
                    .collect();
                head.copy_from_slice(&rotated);
            }
        };
        let embed = w("model.embed_tokens.weight");
        let mut xs: Vec<Vec<f32>> = tokens
            .iter()
            .map(|&tok| embed[tok as usize * HIDDEN..(tok as usize + 1) * HIDDEN].to_vec())
            .collect();
        for l in 0..LAYERS {
            let p = format!("model.layers.{l}");
            let hs: Vec<Vec<f32>> = xs
                .iter()
                .map(|x| norm(x, w(&format!("{p}.input_layernorm.weight"))))
                .collect();
            let mut qs = Vec::new();
            let mut ks = Vec::new();
            let mut vs = Vec::new();
            for (pos, h) in hs.iter().enumerate() {
                let mut q = linear(&format!("{p}.self_attn.q_proj.weight"), h);
                let mut k = linear(&format!("{p}.self_attn.k_proj.weight"), h);
                rope(&mut q, pos);
                rope(&mut k, pos);
                qs.push(q);
                // The cache keeps keys and values in f16.
                ks.push(through_f16(k));
                vs.push(through_f16(linear(
                    &format!("{p}.self_attn.v_proj.weight"),
                    h,
                )));
            }
            for i in 0..xs.len() {
                let mut attn = vec![0.0f32; HEADS * HEAD_DIM];
                for head in 0..HEADS {
                    let kvh = head / (HEADS / KV_HEADS);
                    let q = &qs[i][head * HEAD_DIM..(head + 1) * HEAD_DIM];
                    let scores: Vec<f32> = (0..=i)
                        .map(|j| {
                            let k = &ks[j][kvh * HEAD_DIM..(kvh + 1) * HEAD_DIM];
                            q.iter().zip(k).map(|(a, b)| a * b).sum::<f32>()
                                / (HEAD_DIM as f32).sqrt()
                        })
                        .collect();
                    let max = scores.iter().cloned().fold(f32::MIN, f32::max);
                    let exps: Vec<f32> = scores.iter().map(|s| (s - max).exp()).collect();
                    let total: f32 = exps.iter().sum();
                    for (j, e) in exps.iter().enumerate() {
                        for d in 0..HEAD_DIM {
                            attn[head * HEAD_DIM + d] += e / total * vs[j][kvh * HEAD_DIM + d];
                        }
                    }
                }
                let o = linear(&format!("{p}.self_attn.o_proj.weight"), &attn);
                xs[i].iter_mut().zip(&o).for_each(|(x, o)| *x += o);
                let h = norm(&xs[i], w(&format!("{p}.post_attention_layernorm.weight")));
                let g = linear(&format!("{p}.mlp.gate_proj.weight"), &h);
                let u = linear(&format!("{p}.mlp.up_proj.weight"), &h);
                let a: Vec<f32> = g
                    .iter()
                    .zip(&u)
                    .map(|(g, u)| g / (1.0 + (-g).exp()) * u)
                    .collect();
                let d = linear(&format!("{p}.mlp.down_proj.weight"), &a);
                xs[i].iter_mut().zip(&d).for_each(|(x, d)| *x += d);
            }
        }
        let last = norm(xs.last().unwrap(), w("model.norm.weight"));
        linear("lm_head.weight", &last)
    }

    fn load(dir: &std::path::Path) -> LlamaModel {
        let source = SafetensorsDir::open(dir).unwrap();
        LlamaModel::load(source.config.clone(), &source, Naming::HuggingFace).unwrap()
    }

    fn chunk(
        seq: u64,
        tokens: &[u32],
        start: usize,
        table: &[u32],
        sample: bool,
    ) -> ScheduledChunk {
        ScheduledChunk {
            seq_id: seq,
            tokens: tokens.to_vec(),
            start_pos: start,
            block_table: table.to_vec(),
            sample,
        }
    }

    fn argmax(v: &[f32]) -> u32 {
        let mut best = 0;
        for (i, x) in v.iter().enumerate() {
            if *x > v[best] {
                best = i;
            }
        }
        best as u32
    }

    fn through_f16(v: Vec<f32>) -> Vec<f32> {
        v.into_iter()
            .map(|x| half::f16::from_f32(x).to_f32())
            .collect()
    }

    fn assert_close(got: &[f32], want: &[f32]) {
        for (g, w) in got.iter().zip(want) {
            assert!(
                (g - w).abs() <= 1e-4 * (1.0 + w.abs()),
                "got {g}, reference {w}"
            );
        }
    }

    #[test]
    fn prefill_and_decode_match_the_reference_forward() {
        for qwen in [false, true] {
            let dir = tempfile::tempdir().unwrap();
            let tensors = toy_llama(dir.path(), qwen);
            let model = load(dir.path());
            let mut cache = KvCache::new(&model.config, 4, 16);
            let mut seq: Vec<u32> = vec![3, 17, 5, 29, 11, 2];
            // Blocks deliberately out of order: the table, not adjacency, defines the layout.
            let table = [9u32, 2, 14, 5];
            let logits = model
                .forward(
                    &mut cache,
                    &StepPlan {
                        chunks: vec![chunk(0, &seq, 0, &table, true)],
                    },
                )
                .unwrap();
            assert_close(&logits[0], &reference_last_logits(&tensors, &seq));
            for _ in 0..6 {
                let next = argmax(&logits_last(&model, &mut cache, &seq, &table));
                seq.push(next);
                let want = reference_last_logits(&tensors, &seq);
                let got = logits_last(&model, &mut cache, &seq, &table);
                assert_close(&got, &want);
            }
        }
    }

    /// Feed only the newest token (its predecessors are cached), as a decode step does.
    fn logits_last(
        model: &LlamaModel,
        cache: &mut KvCache,
        seq: &[u32],
        table: &[u32],
    ) -> Vec<f32> {
        let pos = seq.len() - 1;
        let plan = StepPlan {
            chunks: vec![chunk(0, &seq[pos..], pos, table, true)],
        };
        model.forward(cache, &plan).unwrap().remove(0)
    }

    #[test]
    fn chunked_prefill_and_batching_give_bit_identical_logits() {
        let dir = tempfile::tempdir().unwrap();
        toy_llama(dir.path(), false);
        let model = load(dir.path());
        let prompt: Vec<u32> = (0..11).map(|i| (i * 7 % VOCAB) as u32).collect();
        let mut cache = KvCache::new(&model.config, 4, 32);
        let whole = model
            .forward(
                &mut cache,
                &StepPlan {
                    chunks: vec![chunk(0, &prompt, 0, &[0, 1, 2], true)],
                },
            )
            .unwrap();
        // The same prompt in chunks of 4, 4 and 3, batched with an unrelated sequence.
        let table = [10u32, 11, 12];
        let other = [1u32, 2, 3, 4, 5];
        let first = StepPlan {
            chunks: vec![
                chunk(1, &prompt[..4], 0, &table, false),
                chunk(2, &other, 0, &[20, 21], true),
            ],
        };
        let out = model.forward(&mut cache, &first).unwrap();
        assert_eq!(out.len(), 1, "only sampling chunks return logits");
        model
            .forward(
                &mut cache,
                &StepPlan {
                    chunks: vec![chunk(1, &prompt[4..8], 4, &table, false)],
                },
            )
            .unwrap();
        let last = model
            .forward(
                &mut cache,
                &StepPlan {
                    chunks: vec![
                        chunk(2, &[9], 5, &[20, 21], true),
                        chunk(1, &prompt[8..], 8, &table, true),
                    ],
                },
            )
            .unwrap();
        assert_eq!(
            last[1], whole[0],
            "chunked + batched prefill must equal one-shot prefill"
        );
    }

    #[test]
    fn a_short_block_table_is_an_error_not_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        toy_llama(dir.path(), false);
        let model = load(dir.path());
        let mut cache = KvCache::new(&model.config, 4, 8);
        let err = model
            .forward(
                &mut cache,
                &StepPlan {
                    chunks: vec![chunk(0, &[1, 2, 3, 4, 5], 0, &[0], true)],
                },
            )
            .unwrap_err();
        assert!(err.to_string().contains("block table"), "{err}");
    }
}
