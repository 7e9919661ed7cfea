//! Where a deployment lives: its `api_base` parsed once into scheme, address, TLS name and path
//! prefix, and turned into a Pingora peer per request (DNS answers cached briefly).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use pingora::upstreams::peer::HttpPeer;

/// A parsed base URL such as `https://api.openai.com/v1` or `unix:/run/engine.sock`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub tls: bool,
    /// Host name (or IP) for TCP targets; the socket path for unix ones.
    pub host: String,
    pub port: u16,
    pub unix: bool,
    /// Path prefix without a trailing slash (`/v1`), possibly empty.
    pub path_prefix: String,
    /// `Host` header value.
    pub authority: String,
}

impl Target {
    pub fn parse(base: &str) -> Result<Target, String> {
        if let Some(rest) = base.strip_prefix("unix:") {
            // `unix:/path/to.sock` (OpenAI routes under `/v1`, as vLLM serves them) or
            // `unix:/path/to.sock:/prefix` to name the URL prefix explicitly.
            let rest = rest.trim_start_matches("//");
            let (path, prefix) = match rest.split_once(".sock:") {
                Some((p, prefix)) => (format!("{p}.sock"), prefix.to_string()),
                None => (rest.to_string(), "/v1".to_string()),
            };
            if path.is_empty() {
                return Err(format!("{base}: no socket path"));
            }
            return Ok(Target {
                tls: false,
                host: path,
                port: 0,
                unix: true,
                path_prefix: prefix.trim_end_matches('/').to_string(),
                authority: "localhost".into(),
            });
        }
        let (tls, rest) = if let Some(r) = base.strip_prefix("https://") {
            (true, r)
        } else if let Some(r) = base.strip_prefix("http://") {
            (false, r)
        } else {
            return Err(format!("{base}: expected http://, https:// or unix:"));
        };
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        let authority = authority.rsplit_once('@').map_or(authority, |(_, a)| a);
        let (host, port) = if let Some(h) = authority.strip_prefix('[') {
            // [v6]:port
            let (h, after) = h.split_once(']').ok_or(format!("{base}: bad IPv6 host"))?;
            let port = after.strip_prefix(':').map(str::parse).transpose();
            (
                h.to_string(),
                port.map_err(|_| format!("{base}: bad port"))?,
            )
        } else {
            match authority.rsplit_once(':') {
                Some((h, p)) => (
                    h.to_string(),
                    Some(p.parse::<u16>().map_err(|_| format!("{base}: bad port"))?),
                ),
                None => (authority.to_string(), None),
            }
        };
        if host.is_empty() {
            return Err(format!("{base}: no host"));
        }
        Ok(Target {
            tls,
            port: port.unwrap_or(if tls { 443 } else { 80 }),
            host,
            unix: false,
            path_prefix: path.trim_end_matches('/').to_string(),
            authority: authority.to_string(),
        })
    }

    /// The same server with another path prefix (vLLM's native routes live at the root).
    pub fn with_prefix(&self, prefix: &str) -> Target {
        Target {
            path_prefix: prefix.trim_end_matches('/').to_string(),
            ..self.clone()
        }
    }

    /// `scheme://authority{prefix}` for headers and logs.
    pub fn display_base(&self) -> String {
        if self.unix {
            format!("unix:{}{}", self.host, self.path_prefix)
        } else {
            format!(
                "{}://{}{}",
                if self.tls { "https" } else { "http" },
                self.authority,
                self.path_prefix
            )
        }
    }
}

/// Resolves host names without blocking the runtime, caching answers for a minute.
#[derive(Default)]
pub struct Resolver {
    cache: Mutex<HashMap<(String, u16), (SocketAddr, Instant)>>,
}

const DNS_TTL: Duration = Duration::from_secs(60);

impl Resolver {
    pub async fn peer(&self, t: &Target) -> std::io::Result<HttpPeer> {
        if t.unix {
            return HttpPeer::new_uds(&t.host, false, String::new())
                .map_err(|e| std::io::Error::other(e.to_string()));
        }
        let addr = self.resolve(&t.host, t.port).await?;
        Ok(HttpPeer::new(addr, t.tls, t.host.clone()))
    }

    async fn resolve(&self, host: &str, port: u16) -> std::io::Result<SocketAddr> {
        if let Ok(ip) = host.parse::<std::net::IpAddr>() {
            return Ok(SocketAddr::new(ip, port));
        }
        let key = (host.to_string(), port);
        if let Some((addr, at)) = self.cache.lock().get(&key) {
            if at.elapsed() < DNS_TTL {
                return Ok(*addr);
            }
        }
        let addr = tokio::net::lookup_host((host, port))
            .await?
            .next()
            .ok_or_else(|| std::io::Error::other(format!("{host}: no address")))?;
        self.cache.lock().insert(key, (addr, Instant::now()));
        Ok(addr)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_bases() {
        let t = Target::parse("https://api.openai.com/v1/").unwrap();
        assert!(t.tls);
        assert_eq!(
            (t.host.as_str(), t.port, t.path_prefix.as_str()),
            ("api.openai.com", 443, "/v1")
        );
        let t = Target::parse("http://127.0.0.1:8000/v1").unwrap();
        assert_eq!((t.port, t.authority.as_str()), (8000, "127.0.0.1:8000"));
        let t = Target::parse("unix:/run/sluice/engine.sock").unwrap();
        assert!(t.unix);
        assert_eq!(t.host, "/run/sluice/engine.sock");
        assert_eq!(t.path_prefix, "/v1");
        let t = Target::parse("unix:/run/e.sock:/").unwrap();
        assert_eq!(
            (t.host.as_str(), t.path_prefix.as_str()),
            ("/run/e.sock", "")
        );
        let t = Target::parse("http://[::1]:9/x").unwrap();
        assert_eq!((t.host.as_str(), t.port), ("::1", 9));
        assert!(Target::parse("ftp://x").is_err());
        assert_eq!(t.with_prefix("").display_base(), "http://[::1]:9");
    }
}
