//! Starting Pingora: one HTTP service (HTTP/1.1 and h2c) on the configured address.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use pingora::apps::HttpServerOptions;
use pingora::server::configuration::{Opt, ServerConf};
use pingora::server::{RunArgs, Server, ShutdownSignal, ShutdownSignalWatch};
use tokio::signal::unix::{signal, SignalKind};

use crate::app::App;
use crate::gateway::Gateway;

pub struct ServeOptions {
    pub host: String,
    pub port: u16,
    /// Worker threads (Pingora's `threads`).
    pub workers: usize,
    /// Seconds to keep serving in-flight requests after SIGTERM.
    pub graceful_shutdown_secs: u64,
}

/// SIGTERM drains: liveliness turns 503, in-flight requests get up to the drain limit to finish,
/// then Pingora stops. SIGINT stops at once; SIGQUIT is Pingora's graceful upgrade.
struct DrainOnTerm {
    app: Arc<App>,
    limit: Duration,
}

#[async_trait::async_trait]
impl ShutdownSignalWatch for DrainOnTerm {
    async fn recv(&self) -> ShutdownSignal {
        let (Ok(mut term), Ok(mut int), Ok(mut quit)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
            signal(SignalKind::quit()),
        ) else {
            tracing::error!("cannot install signal handlers; stopping");
            return ShutdownSignal::FastShutdown;
        };
        tokio::select! {
            _ = int.recv() => return ShutdownSignal::FastShutdown,
            _ = quit.recv() => return ShutdownSignal::GracefulUpgrade,
            _ = term.recv() => {}
        }
        self.app.draining.store(true, Ordering::Relaxed);
        let started = Instant::now();
        tracing::info!(
            in_flight = self.app.active.load(Ordering::Relaxed),
            "SIGTERM: draining"
        );
        while self.app.active.load(Ordering::Relaxed) > 0 && started.elapsed() < self.limit {
            tokio::select! {
                _ = int.recv() => return ShutdownSignal::FastShutdown,
                _ = tokio::time::sleep(Duration::from_millis(20)) => {}
            }
        }
        tracing::info!(
            left = self.app.active.load(Ordering::Relaxed),
            waited_ms = started.elapsed().as_millis() as u64,
            "drained; stopping"
        );
        if let Some(t) = &self.app.tenancy {
            // Every spend row of the drained requests reaches the store before exit.
            let left = t
                .writer
                .flush(self.limit.max(Duration::from_secs(10)))
                .await;
            if left > 0 {
                tracing::error!(rows = left, "spend rows not written before shutdown");
            } else {
                tracing::info!("spend log flushed");
            }
        }
        ShutdownSignal::GracefulTerminate
    }
}

/// Runs the gateway until a shutdown signal.
pub fn run(app: Arc<App>, opts: ServeOptions) -> anyhow::Result<()> {
    let conf = ServerConf {
        threads: opts.workers.max(1),
        // The drain happens before Pingora is told to stop, so its own grace period is not
        // needed; its runtime shutdown then only closes idle connections.
        grace_period_seconds: Some(0),
        graceful_shutdown_timeout_seconds: Some(1),
        ..ServerConf::default()
    };
    let mut server = Server::new_with_opt_and_conf(Some(Opt::default()), conf);
    server.bootstrap();
    let drain_app = app.clone();
    if app.config.general.background_health_checks {
        server.add_service(pingora::services::background::background_service(
            "health checks",
            crate::info::BackgroundHealth { app: app.clone() },
        ));
    }
    let mut server_options = HttpServerOptions::default();
    server_options.h2c = true;
    let mut service =
        pingora::proxy::ProxyServiceBuilder::new(&server.configuration, Gateway::new(app))
            .name("sluice")
            .server_options(server_options)
            .build();
    let addr = if opts.host.contains(':') && !opts.host.starts_with('[') {
        format!("[{}]:{}", opts.host, opts.port)
    } else {
        format!("{}:{}", opts.host, opts.port)
    };
    service.add_tcp(&addr);
    server.add_service(service);
    tracing::info!(%addr, workers = opts.workers, "sluice listening");
    server.run(RunArgs {
        shutdown_signal: Box::new(DrainOnTerm {
            app: drain_app,
            limit: Duration::from_secs(opts.graceful_shutdown_secs),
        }),
    });
    Ok(())
}
