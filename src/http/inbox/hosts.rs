//! The inbox answers only requests addressed to this machine: a page on another site can
//! make a developer's browser resolve its own name to 127.0.0.1 (DNS rebinding) and then
//! read the login codes, or empty the inbox, with the browser's same-origin blessing. The
//! name in `Host` is the one thing such a request cannot fake.

use std::{
    net::{IpAddr, SocketAddr},
    sync::Arc,
};

use axum::{
    extract::{Request, State},
    http::{StatusCode, header},
    middleware::Next,
    response::{IntoResponse, Response},
};

/// The host names (lower case, IPv6 in brackets) the inbox answers to.
#[derive(Debug, Clone)]
pub(crate) struct AllowedHosts(Arc<Vec<String>>);

impl AllowedHosts {
    /// `localhost`, the loopback addresses, the address listened on (unless it is every
    /// address) and the `configured` names.
    pub(crate) fn new(listening: Option<SocketAddr>, configured: &[String]) -> AllowedHosts {
        let mut names: Vec<String> = ["localhost", "127.0.0.1", "[::1]"]
            .into_iter()
            .map(str::to_owned)
            .collect();
        if let Some(address) = listening.filter(|a| !a.ip().is_unspecified()) {
            names.push(match address.ip() {
                IpAddr::V4(ip) => ip.to_string(),
                IpAddr::V6(ip) => format!("[{ip}]"),
            });
        }
        names.extend(configured.iter().cloned());
        AllowedHosts(Arc::new(names))
    }

    /// Whether a request's `Host` value (a name or an address, with or without a port)
    /// is one of ours.
    pub(crate) fn allows(&self, host: &str) -> bool {
        let name = without_port(host.trim()).trim_end_matches('.');
        url::Host::parse(name).is_ok_and(|parsed| self.0.contains(&parsed.to_string()))
    }
}

fn without_port(host: &str) -> &str {
    if host.starts_with('[') {
        return host.find(']').map_or(host, |end| &host[..=end]);
    }
    host.rsplit_once(':').map_or(host, |(name, _)| name)
}

/// Refuses, with 421 Misdirected Request, a request whose `Host` (or absolute URI) names
/// another host, or that names none.
pub(super) async fn refuse_other_hosts(
    State(allowed): State<AllowedHosts>,
    request: Request,
    next: Next,
) -> Response {
    let host = match request.uri().authority() {
        Some(authority) => Some(authority.as_str()),
        None => request
            .headers()
            .get(header::HOST)
            .and_then(|v| v.to_str().ok()),
    };
    if host.is_some_and(|h| allowed.allows(h)) {
        return next.run(request).await;
    }
    tracing::warn!(
        "an inbox request for another host was refused (DNS rebinding?); SMSGW_INBOX_HOSTS \
         adds names the inbox answers to"
    );
    (
        StatusCode::MISDIRECTED_REQUEST,
        "this inbox answers only requests addressed to localhost, its own address or \
         SMSGW_INBOX_HOSTS\n",
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_local_names_and_configured_ones_are_allowed() {
        let listening = "10.1.2.3:9464".parse().ok();
        let hosts = AllowedHosts::new(listening, &["smsgw.test".to_owned()]);
        for ok in [
            "localhost",
            "LOCALHOST:9464",
            "localhost.",
            "127.0.0.1:9464",
            "[::1]:9464",
            "[::1]",
            "10.1.2.3:9464",
            "smsgw.test",
            "smsgw.test:80",
        ] {
            assert!(hosts.allows(ok), "{ok}");
        }
        for refused in [
            "evil.example",
            "evil.example:9464",
            "localhost.evil.example",
            "127.0.0.1.nip.io:9464",
            "",
            "[::2]:9464",
            "10.1.2.4",
        ] {
            assert!(!hosts.allows(refused), "{refused}");
        }
    }

    #[test]
    fn listening_on_every_address_allows_none_of_them_by_itself() {
        let hosts = AllowedHosts::new("0.0.0.0:9464".parse().ok(), &[]);
        assert!(!hosts.allows("0.0.0.0:9464"));
        assert!(hosts.allows("127.0.0.1:9464"));
    }
}
