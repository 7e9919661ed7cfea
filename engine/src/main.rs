//! `sluice-engine serve MODEL_PATH`: load a GGUF file or a Hugging Face folder and serve the
//! OpenAI + vLLM API on TCP or a unix socket.

use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use sluice_engine::device::{self, Device, DeviceKind};
use sluice_engine::engine::{EngineConfig, EngineHandle, Task};
use sluice_engine::executor::{CpuEmbedder, CpuExecutor, Executor};
use sluice_engine::load::{load_model, Weights};
use sluice_engine::model::llama::KvCache;

#[derive(Parser)]
#[command(name = "sluice-engine", version, about = "Sluice's inference engine")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve a model.
    Serve(ServeArgs),
}

#[derive(Parser, Debug)]
struct ServeArgs {
    /// A GGUF file or a Hugging Face model folder.
    model_path: PathBuf,
    /// TCP address to listen on (ignored with --socket).
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    #[arg(long, default_value_t = 8000)]
    port: u16,
    /// Listen on this unix socket instead of TCP.
    #[arg(long)]
    socket: Option<PathBuf>,
    /// The model name clients use (default: MODEL_PATH as given).
    #[arg(long)]
    served_model_name: Option<String>,
    /// Context length (default: the model's).
    #[arg(long)]
    max_model_len: Option<usize>,
    /// Most sequences in one batch.
    #[arg(long, default_value_t = 64)]
    max_num_seqs: usize,
    /// Most tokens one step computes (longer prompts are prefilled in chunks).
    #[arg(long, default_value_t = 512)]
    max_num_batched_tokens: usize,
    /// Tokens per KV-cache block.
    #[arg(long, default_value_t = 16)]
    block_size: usize,
    /// Memory for the KV cache, in bytes (suffixes K, M, G, Ki, Mi, Gi accepted); default
    /// 1 GiB, raised if needed to hold one full-length sequence.
    #[arg(long, value_parser = parse_bytes)]
    kv_cache_bytes: Option<usize>,
    /// cpu, cuda or auto.
    #[arg(long, default_value = "auto")]
    device: DeviceKind,
    /// Compute threads (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
    /// Turn automatic prefix caching off.
    #[arg(long)]
    no_enable_prefix_caching: bool,
}

fn parse_bytes(s: &str) -> Result<usize, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (digits, unit) = s.split_at(split);
    let n: usize = digits
        .parse()
        .map_err(|_| format!("`{s}` is not a byte count"))?;
    let factor: usize = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" => 1_000,
        "m" | "mb" => 1_000_000,
        "g" | "gb" => 1_000_000_000,
        "ki" | "kib" => 1 << 10,
        "mi" | "mib" => 1 << 20,
        "gi" | "gib" => 1 << 30,
        other => return Err(format!("unknown unit `{other}` in `{s}`")),
    };
    n.checked_mul(factor)
        .ok_or_else(|| format!("`{s}` is too large"))
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let Command::Serve(args) = Cli::parse().command;
    serve(args)
}

fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let threads = args
        .threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    // Encoders run on the global pool; decoders get their own (see CpuExecutor::with_threads).
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .thread_name(|i| format!("pool-{i}"))
        .build_global()
        .context("starting the compute threads")?;
    let device = device::resolve(args.device)?;
    if device != Device::Cpu {
        bail!("device {device:?} has no executor in this build");
    }
    let started = std::time::Instant::now();
    let model = load_model(&args.model_path)?;
    let config = model.config.clone();
    let model_len = config.max_position_embeddings;
    let max_model_len = args.max_model_len.unwrap_or(model_len);
    if max_model_len > model_len {
        bail!("--max-model-len {max_model_len} exceeds the model's context length {model_len}");
    }
    if args.block_size == 0 || args.max_num_seqs == 0 || args.max_num_batched_tokens == 0 {
        bail!("--block-size, --max-num-seqs and --max-num-batched-tokens must be positive");
    }
    let served_model_name = args
        .served_model_name
        .clone()
        .unwrap_or_else(|| args.model_path.display().to_string());
    let (executor, task, num_blocks): (Box<dyn Executor>, Task, usize) = match model.weights {
        Weights::Decoder(decoder) => {
            let per_block = KvCache::bytes_per_token(&config) * args.block_size;
            let min_blocks = max_model_len.div_ceil(args.block_size);
            let num_blocks = match args.kv_cache_bytes {
                Some(bytes) => {
                    let blocks = bytes / per_block;
                    if blocks < min_blocks {
                        bail!(
                            "--kv-cache-bytes {bytes} holds {} tokens, fewer than --max-model-len \
                             {max_model_len}: raise it to at least {} or lower --max-model-len",
                            blocks * args.block_size,
                            min_blocks * per_block
                        );
                    }
                    blocks
                }
                None => ((1usize << 30) / per_block).max(min_blocks),
            };
            tracing::info!(
                num_blocks,
                block_size = args.block_size,
                kv_cache_mib = (num_blocks * per_block) >> 20,
                weights = ?decoder.weight_type(),
                "KV cache"
            );
            let executor =
                CpuExecutor::with_threads(decoder, args.block_size, num_blocks, threads)?;
            (Box::new(executor), Task::Generate, num_blocks)
        }
        Weights::Encoder(encoder) => (Box::new(CpuEmbedder::new(encoder)), Task::Embed, 0),
    };
    let handle = EngineHandle::start(
        EngineConfig {
            served_model_name: served_model_name.clone(),
            root: args.model_path.display().to_string(),
            max_model_len,
            max_num_seqs: args.max_num_seqs,
            max_num_batched_tokens: args.max_num_batched_tokens.max(args.block_size),
            block_size: args.block_size,
            num_blocks,
            enable_prefix_caching: !args.no_enable_prefix_caching,
            task,
        },
        executor,
        model.tokenizer,
        model.sampling_defaults,
    )?;
    tracing::info!(
        model = %served_model_name,
        threads,
        load_ms = started.elapsed().as_millis() as u64,
        "model loaded"
    );

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .thread_name("http")
        .build()?;
    runtime.block_on(async move {
        let listener = match &args.socket {
            Some(path) => {
                tracing::info!(socket = %path.display(), "serving");
                sluice_engine::api::Listener::Unix(path.clone())
            }
            None => {
                tracing::info!(host = %args.host, port = args.port, "serving");
                sluice_engine::api::Listener::bind_tcp(&args.host, args.port).await?
            }
        };
        sluice_engine::api::serve(handle, listener, shutdown_signal()).await?;
        Ok(())
    })
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("installing the SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    tracing::info!("shutting down");
}

#[cfg(test)]
mod tests {
    use super::parse_bytes;

    #[test]
    fn byte_sizes_parse_with_units() {
        assert_eq!(parse_bytes("4096"), Ok(4096));
        assert_eq!(parse_bytes("2GiB"), Ok(2 << 30));
        assert_eq!(parse_bytes("512M"), Ok(512_000_000));
        assert!(parse_bytes("lots").is_err());
        assert!(parse_bytes("3 parsecs").is_err());
    }
}
