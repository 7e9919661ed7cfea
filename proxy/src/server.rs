//! Starting Pingora: one HTTP service (HTTP/1.1 and h2c) on the configured address.

use std::sync::Arc;

use pingora::apps::HttpServerOptions;
use pingora::server::configuration::{Opt, ServerConf};
use pingora::server::Server;

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

/// Runs the gateway until a shutdown signal (SIGTERM: graceful; SIGINT: fast).
pub fn run(app: Arc<App>, opts: ServeOptions) -> anyhow::Result<()> {
    let conf = ServerConf {
        threads: opts.workers.max(1),
        grace_period_seconds: Some(0),
        graceful_shutdown_timeout_seconds: Some(opts.graceful_shutdown_secs),
        ..ServerConf::default()
    };
    let mut server = Server::new_with_opt_and_conf(Some(Opt::default()), conf);
    server.bootstrap();
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
    server.run_forever()
}
