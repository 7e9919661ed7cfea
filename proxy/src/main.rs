//! The `sluice` binary: load the config, then serve (or only check it).

use std::path::PathBuf;
use std::sync::Arc;

use clap::Parser;
use sluice_proxy::app::App;
use sluice_proxy::server::{run, ServeOptions};

/// mimalloc instead of glibc malloc: the request path allocates and frees many small buffers,
/// and spend rows made on request threads are freed on the writer's thread, which glibc serves
/// slowly (arena locks, consolidation); mimalloc's per-thread free lists keep both cheap.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Sluice: an OpenAI-compatible LLM gateway that reads LiteLLM configs.
#[derive(Parser, Debug)]
#[command(name = "sluice", version)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// LiteLLM-style config.yaml (else CONFIG_FILE_PATH, else the embedded default).
    #[arg(long, env = "CONFIG_FILE_PATH")]
    config: Option<PathBuf>,
    /// Validate a config file, print its routing table (secrets redacted) and exit.
    #[arg(long, value_name = "FILE")]
    check_config: Option<PathBuf>,
    #[arg(long, default_value = "0.0.0.0")]
    host: String,
    #[arg(long, default_value_t = 4000)]
    port: u16,
    /// Worker threads (default: one per CPU).
    #[arg(long)]
    num_workers: Option<usize>,
    /// Log as JSON lines instead of text.
    #[arg(long)]
    json_logs: bool,
    /// Serve a model with a colocated sluice-engine: `NAME=PATH` (a GGUF file or a Hugging Face
    /// folder); repeatable; added to the config's `local_models`.
    #[arg(long = "local-model", value_name = "NAME=PATH", value_parser = parse_local_model)]
    local_models: Vec<(String, PathBuf)>,
    /// Seconds in-flight requests may take to finish after SIGTERM.
    #[arg(long, default_value_t = 30)]
    graceful_shutdown_secs: u64,
}

/// Without a subcommand, `sluice` runs the gateway.
#[derive(clap::Subcommand, Debug)]
enum Command {
    /// Copy keys, users, teams, memberships, budgets and end users from LiteLLM's database.
    ///
    /// Keys are copied as the sha256 hashes LiteLLM stores, so existing LiteLLM keys keep
    /// working; rows go into the store the gateway uses. Running it again updates what it copied
    /// before. Rows that do not fit are reported and skipped.
    ImportLitellm(ImportArgs),
}

#[derive(clap::Args, Debug)]
struct ImportArgs {
    /// LiteLLM's database: postgres://USER:PASSWORD@HOST:PORT/DB (a Prisma `?schema=NAME` is
    /// honoured).
    #[arg(long, value_name = "URL")]
    database_url: String,
    /// The gateway's config.yaml; its general_settings.database_url (else DATABASE_URL, else
    /// sluice.db in the current directory) is where the rows go.
    #[arg(long, env = "CONFIG_FILE_PATH")]
    config: Option<PathBuf>,
}

fn parse_local_model(s: &str) -> Result<(String, PathBuf), String> {
    match s.split_once('=') {
        Some((name, path)) if !name.is_empty() && !path.is_empty() => {
            Ok((name.to_string(), PathBuf::from(path)))
        }
        _ => Err(format!("expected NAME=PATH, got `{s}`")),
    }
}

/// The file (or the embedded default) with the `--local-model` pairs added.
fn load_config(
    path: Option<&PathBuf>,
    local: &[(String, PathBuf)],
) -> Result<sluice_config::Config, sluice_config::ConfigError> {
    match path {
        None => sluice_config::parse_config_with_local_models(
            sluice_config::EMBEDDED_DEFAULT,
            std::path::Path::new("<built-in>"),
            local,
        ),
        Some(path) if local.is_empty() => sluice_config::load_file(path),
        Some(path) => {
            let text = std::fs::read_to_string(path).map_err(|e| sluice_config::ConfigError {
                file: path.clone(),
                problems: vec![sluice_config::Problem {
                    path: "(file)".into(),
                    expected: format!("a readable file: {e}"),
                }],
            })?;
            sluice_config::parse_config_with_local_models(&text, path, local)
        }
    }
}

fn init_logging(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("SLUICE_LOG")
        .or_else(|_| tracing_subscriber::EnvFilter::try_from_env("LITELLM_LOG"))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,pingora=warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

fn import_failed(e: impl std::fmt::Display) -> ! {
    eprintln!("sluice import-litellm: {e}");
    std::process::exit(1);
}

/// `sluice import-litellm`: prints the report, or exits 1 with the reason.
fn import_litellm(args: ImportArgs, config: Option<PathBuf>, json_logs: bool) {
    init_logging(json_logs);
    let config = match args.config.or(config) {
        Some(path) => sluice_config::load_file(&path).unwrap_or_else(|e| import_failed(e)),
        None => sluice_config::embedded_default(),
    };
    let t = config.tenancy;
    let target_url = t
        .database_url
        .clone()
        .unwrap_or_else(|| sluice_proxy::store::DEFAULT_SQLITE_URL.to_string());
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let result = runtime.block_on(async {
        // The source first: a wrong LiteLLM URL must not leave a new sluice.db behind.
        let mut source = sluice_proxy::import::connect_source(&args.database_url).await?;
        sluice_proxy::import::check_source(&mut source).await?;
        let target =
            sluice_proxy::store::open(t.database_url.as_deref(), t.pool_limit, t.connect_timeout)
                .await?;
        let report = sluice_proxy::import::import_from(&mut source, target).await;
        let _ = sqlx::Connection::close(source).await;
        report
    });
    match result {
        Ok(report) => {
            println!("into {}", sluice_proxy::store::redact_url(&target_url));
            print!("{report}");
        }
        Err(e) => import_failed(format_args!("{e:#}")),
    }
}

fn main() {
    let cli = Cli::parse();
    if let Some(Command::ImportLitellm(args)) = cli.command {
        import_litellm(args, cli.config, cli.json_logs);
        return;
    }
    if let Some(path) = &cli.check_config {
        match sluice_config::load_file(path) {
            Ok(c) => {
                print!("{}", sluice_config::routing_table(&c));
                println!("config OK");
                return;
            }
            Err(e) => {
                eprintln!("{e}");
                std::process::exit(1);
            }
        }
    }
    init_logging(cli.json_logs);
    if cli.config.is_none() {
        tracing::info!("no --config or CONFIG_FILE_PATH: using the embedded default (any model name routed to the provider it names)");
    }
    let config = match load_config(cli.config.as_ref(), &cli.local_models) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!("{e}");
            eprintln!("{e}");
            std::process::exit(1);
        }
    };
    if !config.ignored_keys.is_empty() {
        tracing::warn!(
            keys = %config.ignored_keys.join(", "),
            "config keys accepted but not implemented by Sluice yet (ignored)"
        );
    }
    tracing::info!(
        deployments = config.deployments.len(),
        strategy = config.router.routing_strategy.as_str(),
        auth = if config.general.master_key.is_some() {
            "master_key"
        } else {
            "open"
        },
        "config loaded from {}",
        config.source.display()
    );
    let metrics = sluice_proxy::metrics::Metrics::new();
    // Tenancy's background work (spend writer, change polling, Redis) runs on its own small
    // runtime so it outlives no request and survives Pingora's per-service runtimes.
    let background = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("sluice-background")
        .enable_all()
        .build()
        .expect("tokio runtime");
    let tenancy = if config.general.master_key.is_some() {
        let t = &config.tenancy;
        let started = background.block_on(async {
            let store = sluice_proxy::store::open(
                t.database_url.as_deref(),
                t.pool_limit,
                t.connect_timeout,
            )
            .await?;
            sluice_proxy::tenancy::Tenancy::start(store, t.clone(), &metrics).await
        });
        match started {
            Ok(t) => Some(t),
            Err(e) => {
                tracing::error!("cannot start the key store: {e:#}");
                eprintln!("sluice: cannot start the key store: {e:#}");
                std::process::exit(1);
            }
        }
    } else {
        None
    };
    let local_models = config.local_models.clone();
    let engines = (!local_models.is_empty()).then(|| {
        background.block_on(sluice_proxy::engines::EngineSupervisor::start(
            &local_models,
        ))
    });
    let app = match App::new(config, tenancy, metrics) {
        Ok(app) => Arc::new(app),
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("sluice: {e:#}");
            std::process::exit(1);
        }
    };
    let flush_app = app.clone();
    let workers = cli
        .num_workers
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    if let Err(e) = run(
        app,
        ServeOptions {
            host: cli.host,
            port: cli.port,
            workers,
            graceful_shutdown_secs: cli.graceful_shutdown_secs,
        },
    ) {
        eprintln!("sluice: {e}");
        std::process::exit(1);
    }
    if let Some(engines) = engines {
        background.block_on(engines.stop(std::time::Duration::from_secs(10)));
    }
    // Requests answered after the drain's flush (keep-alive clients) have queued rows too:
    // with the server stopped, write whatever is left before the process exits.
    if let Some(t) = &flush_app.tenancy {
        let left = background.block_on(t.writer.flush(std::time::Duration::from_secs(30)));
        if left > 0 {
            tracing::error!(rows = left, "spend rows not written before exit");
        } else {
            tracing::info!("spend log flushed at exit");
        }
    }
    drop(background);
}
