//! The HTTP surface: where it listens (`SMSGW_HTTP_ADDR`), its limits against slow and
//! idle clients (`SMSGW_HTTP_HEADER_TIMEOUT`, `SMSGW_HTTP_MAX_CONNECTIONS`), the names
//! the development inbox answers to (`SMSGW_INBOX_HOSTS`) and the URL providers call
//! back (`SMSGW_PUBLIC_URL`).

use std::{net::SocketAddr, time::Duration};

use super::{
    ConfigError, Environment, bad,
    parse::{duration, number, parsed},
};

const INBOX_HOSTS: &str = "SMSGW_INBOX_HOSTS";

/// Where and how the HTTP server answers.
#[derive(Debug, Clone)]
pub struct HttpSettings {
    pub addr: SocketAddr,
    /// Against slow and idle clients of the HTTP server.
    pub limits: HttpLimits,
    /// Names the development inbox answers to besides localhost and its own address.
    pub inbox_hosts: Vec<String>,
    /// Base URL that providers call back; `None` means no status callbacks are asked for.
    pub public_url: Option<String>,
}

/// How long a client may take, and how many may be connected at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HttpLimits {
    /// For a request's headers; also the idle time after which a keep-alive connection
    /// is closed.
    pub header_timeout: Duration,
    /// Connections open at once; more wait to be accepted.
    pub max_connections: usize,
}

/// `delivery`: the daemon's rules apply (production needs a public URL); a tool that
/// sends nothing needs none.
pub(super) fn http(
    get: &impl Fn(&str) -> Option<String>,
    env: Environment,
    delivery: bool,
) -> Result<HttpSettings, ConfigError> {
    let public_url = public_url(get, env, delivery)?;
    Ok(HttpSettings {
        addr: parsed(get, "SMSGW_HTTP_ADDR", "127.0.0.1:9464")?,
        limits: limits(get)?,
        inbox_hosts: inbox_hosts(get(INBOX_HOSTS).as_deref())?,
        public_url,
    })
}

/// Kept without a trailing slash, so callback paths can be appended to it.
/// The base URL providers call back. Production needs one, over `https`: receipts and
/// inbound STOP/START carry phone numbers and must not be readable on the wire.
fn public_url(
    get: &impl Fn(&str) -> Option<String>,
    env: Environment,
    delivery: bool,
) -> Result<Option<String>, ConfigError> {
    let production = env == Environment::Production && delivery;
    let Some(url) = get("SMSGW_PUBLIC_URL") else {
        if production {
            return Err(bad(
                "SMSGW_PUBLIC_URL",
                "is required in production: the https URL providers send receipts and STOP/START to",
            ));
        }
        return Ok(None);
    };
    let parsed = reqwest::Url::parse(&url)
        .map_err(|e| bad("SMSGW_PUBLIC_URL", format!("not a URL: {e}")))?;
    match parsed.scheme() {
        "https" => {}
        "http" if !production => {}
        "http" => {
            return Err(bad(
                "SMSGW_PUBLIC_URL",
                "must be an https URL in production: webhooks carry phone numbers",
            ));
        }
        _ => return Err(bad("SMSGW_PUBLIC_URL", "must be an http(s) URL")),
    }
    Ok(Some(url.trim_end_matches('/').to_owned()))
}

/// A few seconds for the headers: a client on a working network sends them at once, and
/// ingress proxies pass them on whole. Connections: far more than probes, scrapes and
/// receipts need at once, far fewer than the file descriptors the daemon may open.
fn limits(get: &impl Fn(&str) -> Option<String>) -> Result<HttpLimits, ConfigError> {
    let header_timeout = duration(get, "SMSGW_HTTP_HEADER_TIMEOUT", "5s")?;
    if !(Duration::from_millis(100)..=Duration::from_secs(300)).contains(&header_timeout) {
        return Err(bad(
            "SMSGW_HTTP_HEADER_TIMEOUT",
            "must be between 100ms and 5m",
        ));
    }
    Ok(HttpLimits {
        header_timeout,
        max_connections: number(get, "SMSGW_HTTP_MAX_CONNECTIONS", 256, 1, 100_000)?,
    })
}

/// `SMSGW_INBOX_HOSTS`: host names the development inbox answers to besides `localhost`,
/// the loopback addresses and the address it listens on, comma-separated, each a host
/// name or an IP address (IPv6 in brackets) without a port; lower case once read.
fn inbox_hosts(raw: Option<&str>) -> Result<Vec<String>, ConfigError> {
    let Some(raw) = raw else {
        return Ok(Vec::new());
    };
    raw.split(',')
        .map(str::trim)
        .map(|name| {
            url::Host::parse(name)
                .ok()
                .filter(|_| !name.is_empty() && !name.contains('*'))
                .map(|host| host.to_string())
                .ok_or_else(|| {
                    bad(
                        INBOX_HOSTS,
                        format!("'{name}' is not a host name or an IP address without a port"),
                    )
                })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::tests::{real_twilio, settings};

    #[test]
    fn inbox_hosts_are_names_or_addresses_without_ports() {
        assert_eq!(inbox_hosts(None).expect("unset"), Vec::<String>::new());
        assert_eq!(
            inbox_hosts(Some("SMSGW.test, 10.0.0.5,[::1]")).expect("valid"),
            ["smsgw.test", "10.0.0.5", "[::1]"]
        );
        for wrong in ["smsgw.test:9464", "a b", "*", "smsgw.test,", "http://x"] {
            let err = inbox_hosts(Some(wrong)).expect_err(wrong);
            assert_eq!(err.variable, INBOX_HOSTS);
        }
    }

    #[test]
    fn production_needs_an_https_public_url() {
        let base = real_twilio("production");
        let err = settings(&base).expect_err("no public URL");
        assert_eq!(err.variable, "SMSGW_PUBLIC_URL");
        let mut plain = base.clone();
        plain.push(("SMSGW_PUBLIC_URL", "http://smsgw.example.com"));
        let err = settings(&plain).expect_err("plain http");
        assert!(err.problem.contains("https"), "{err}");
        let mut secure = base.clone();
        secure.push(("SMSGW_PUBLIC_URL", "https://smsgw.example.com/"));
        let s = settings(&secure).expect("https is fine");
        assert_eq!(
            s.http.public_url.as_deref(),
            Some("https://smsgw.example.com")
        );
    }
}
