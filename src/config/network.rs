//! Who the HTTP surface answers, and how long a connection to RabbitMQ or a provider
//! may take to open.

use std::time::Duration;

use super::{ConfigError, bad, duration};

const INBOX_HOSTS: &str = "SMSGW_INBOX_HOSTS";

/// `SMSGW_INBOX_HOSTS`: host names the development inbox answers to besides `localhost`,
/// the loopback addresses and the address it listens on, comma-separated, each a host
/// name or an IP address (IPv6 in brackets) without a port; lower case once read.
pub(super) fn inbox_hosts(raw: Option<&str>) -> Result<Vec<String>, ConfigError> {
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

/// `SMSGW_BROKER_CONNECT_TIMEOUT`: how long one RabbitMQ node may take to take a
/// connection (TCP, TLS, the AMQP handshake, the publishing channel) before the next node
/// is tried; a node that black-holes connections costs this, once per connection.
pub(super) fn broker_connect_timeout(
    get: &impl Fn(&str) -> Option<String>,
) -> Result<Duration, ConfigError> {
    const VARIABLE: &str = "SMSGW_BROKER_CONNECT_TIMEOUT";
    let timeout = duration(get, VARIABLE, "15s")?;
    if !(Duration::from_millis(100)..=Duration::from_secs(300)).contains(&timeout) {
        return Err(bad(VARIABLE, "must be between 100ms and 5m"));
    }
    Ok(timeout)
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn the_broker_connect_timeout_is_bounded() {
        let get = |value: &'static str| move |_: &str| Some(value.to_owned());
        assert_eq!(
            broker_connect_timeout(&|_: &str| None).expect("default"),
            Duration::from_secs(15)
        );
        assert_eq!(
            broker_connect_timeout(&get("2s")).expect("valid"),
            Duration::from_secs(2)
        );
        for wrong in ["0s", "1h", "soon"] {
            let err = broker_connect_timeout(&get(wrong)).expect_err(wrong);
            assert_eq!(err.variable, "SMSGW_BROKER_CONNECT_TIMEOUT");
        }
    }
}
