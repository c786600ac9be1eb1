//! Where RabbitMQ is and the shape of the queues smsgw declares on it: the nodes
//! (`SMSGW_AMQP_URL`), how long one may take to take a connection
//! (`SMSGW_BROKER_CONNECT_TIMEOUT`), the lanes' delivery limit (`SMSGW_DELIVERY_LIMIT`)
//! and the retry tiers (`SMSGW_RETRY_DELAYS`).

use std::time::Duration;

use super::{
    ConfigError, ServiceUrl, bad,
    parse::{duration, number},
    service_url,
};

/// The broker's address and the queues' shape.
#[derive(Debug, Clone)]
pub struct BrokerSettings {
    /// One node or a comma-separated list of one cluster's nodes. May hold a password:
    /// printed only redacted.
    pub url: ServiceUrl,
    /// How long one broker node may take to take a connection.
    pub connect_timeout: Duration,
    /// `x-delivery-limit` of the lane queues: after this many deliveries without a
    /// settlement (daemon crashes) a message is dead-lettered by the broker.
    pub delivery_limit: u32,
    /// Retry tiers, shortest first; the n-th temporary failure waits the n-th delay
    /// (the last one repeats).
    pub retry_delays: Vec<Duration>,
}

pub(super) fn broker(get: &impl Fn(&str) -> Option<String>) -> Result<BrokerSettings, ConfigError> {
    let retry_delays = retry_delays(get)?;
    Ok(BrokerSettings {
        url: amqp_url(get)?,
        connect_timeout: connect_timeout(get)?,
        delivery_limit: number(get, "SMSGW_DELIVERY_LIMIT", 10, 2, 1_000)?,
        retry_delays,
    })
}

/// A malformed URL is refused here, and not quoted: it may hold a password.
fn amqp_url(get: &impl Fn(&str) -> Option<String>) -> Result<ServiceUrl, ConfigError> {
    let url =
        get("SMSGW_AMQP_URL").unwrap_or_else(|| "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned());
    let url = ServiceUrl::new(url);
    if url.nodes().next().is_none() || !url.nodes().all(service_url::is_amqp_url) {
        return Err(bad(
            "SMSGW_AMQP_URL",
            "not an amqp:// or amqps:// URL, or a comma-separated list of them (e.g. \
             amqp://user:password@host:5672/%2f); not shown, as it may hold a password",
        ));
    }
    Ok(url)
}

/// `SMSGW_BROKER_CONNECT_TIMEOUT`: how long one RabbitMQ node may take to take a
/// connection (TCP, TLS, the AMQP handshake, the publishing channel) before the next node
/// is tried; a node that black-holes connections costs this, once per connection.
fn connect_timeout(get: &impl Fn(&str) -> Option<String>) -> Result<Duration, ConfigError> {
    const VARIABLE: &str = "SMSGW_BROKER_CONNECT_TIMEOUT";
    let timeout = duration(get, VARIABLE, "15s")?;
    if !(Duration::from_millis(100)..=Duration::from_secs(300)).contains(&timeout) {
        return Err(bad(VARIABLE, "must be between 100ms and 5m"));
    }
    Ok(timeout)
}

fn retry_delays(get: &impl Fn(&str) -> Option<String>) -> Result<Vec<Duration>, ConfigError> {
    let raw = get("SMSGW_RETRY_DELAYS").unwrap_or_else(|| "10s,1m,5m,30m,2h".to_owned());
    parse_delays(&raw).map_err(|problem| bad("SMSGW_RETRY_DELAYS", problem))
}

/// Parses `10s,1m,5m` into durations: each at least 1 ms, at most 24 h, strictly growing.
pub fn parse_delays(raw: &str) -> Result<Vec<Duration>, String> {
    let mut delays = Vec::new();
    for part in raw.split(',') {
        let part = part.trim();
        let delay = humantime::parse_duration(part)
            .map_err(|e| format!("'{part}' is not a duration ({e})"))?;
        if delay < Duration::from_millis(1) || delay > Duration::from_secs(24 * 3600) {
            return Err(format!("'{part}' must be between 1ms and 24h"));
        }
        if delays.last().is_some_and(|last| *last >= delay) {
            return Err("delays must grow from one tier to the next".to_owned());
        }
        delays.push(delay);
    }
    if delays.len() > 20 {
        return Err("at most 20 tiers".to_owned());
    }
    Ok(delays)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::tests::settings;

    #[test]
    fn retry_delays_must_grow() {
        assert!(parse_delays("10s,1m,5m").is_ok());
        assert!(parse_delays("1m,10s").is_err());
        assert!(parse_delays("soon").is_err());
        assert!(parse_delays("0s").is_err());
    }

    #[test]
    fn the_broker_connect_timeout_is_bounded() {
        let get = |value: &'static str| move |_: &str| Some(value.to_owned());
        assert_eq!(
            connect_timeout(&|_: &str| None).expect("default"),
            Duration::from_secs(15)
        );
        assert_eq!(
            connect_timeout(&get("2s")).expect("valid"),
            Duration::from_secs(2)
        );
        for wrong in ["0s", "1h", "soon"] {
            let err = connect_timeout(&get(wrong)).expect_err(wrong);
            assert_eq!(err.variable, "SMSGW_BROKER_CONNECT_TIMEOUT");
        }
    }

    #[test]
    fn passwords_are_redacted_from_urls() {
        let s =
            settings(&[("SMSGW_AMQP_URL", "amqp://user:hunter2@rabbit:5672/%2f")]).expect("valid");
        assert!(!s.broker.url.redacted().contains("hunter2"));
    }

    #[test]
    fn a_malformed_amqp_url_is_refused_without_quoting_it() {
        let err = settings(&[("SMSGW_AMQP_URL", "amqp:user:hunter2@rabbit:5672")])
            .expect_err("no // after the scheme");
        assert_eq!(err.variable, "SMSGW_AMQP_URL");
        assert!(!err.to_string().contains("hunter2"), "{err}");
    }

    #[test]
    fn a_broker_list_is_read_node_by_node() {
        let s = settings(&[(
            "SMSGW_AMQP_URL",
            "amqp://guest:guest@rabbit-0:5672/%2f,amqp://guest:guest@rabbit-1:5672/%2f",
        )])
        .expect("two nodes");
        assert_eq!(s.broker.url.nodes().count(), 2);
        for bad in ["amqp://guest:hunter2@rabbit-0:5672/%2f,rabbit-1:5672", ","] {
            let err = settings(&[("SMSGW_AMQP_URL", bad)]).expect_err(bad);
            assert!(!err.to_string().contains("hunter2"), "{err}");
        }
    }
}
