//! The URLs of the broker and the database. They may hold a password, in the user part
//! (`amqp://user:password@host`) or in the query (`postgres://host/db?password=...`), so
//! they are printed only redacted: in `Debug`, in `Display`, in log lines and in
//! `smsgw check`. The URL itself is handed out only to connect with.

use std::fmt;

use url::Url;

/// What stands in for a password.
const HIDDEN: &str = "***";
/// What stands in for a URL that cannot be read: its password cannot be found to be
/// hidden, so none of it is shown.
const UNREADABLE: &str = "<unreadable URL, not shown>";

/// A service's URL, printed only with its passwords hidden.
#[derive(Clone, PartialEq, Eq)]
pub struct ServiceUrl(String);

impl ServiceUrl {
    pub fn new(url: impl Into<String>) -> Self {
        ServiceUrl(url.into())
    }

    /// The URL as given, password and all: only to connect with, never to print.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// The URL with every password replaced by `***`; each node of a broker list.
    pub fn redacted(&self) -> String {
        if is_amqp_scheme(&self.0) {
            return self.nodes().map(redact_url).collect::<Vec<_>>().join(",");
        }
        redact_url(&self.0)
    }

    /// The nodes of a comma-separated list of one cluster's URLs (`SMSGW_AMQP_URL`), in
    /// order; a single URL is a list of one.
    pub fn nodes(&self) -> impl Iterator<Item = &str> {
        self.0
            .split(',')
            .map(str::trim)
            .filter(|node| !node.is_empty())
    }
}

impl fmt::Debug for ServiceUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ServiceUrl({:?})", self.redacted())
    }
}

impl fmt::Display for ServiceUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted())
    }
}

/// `url` with the password of its user part and the values of password-like query
/// parameters replaced. A URL that cannot be read, or that has no `//` after its scheme
/// (`amqp:user:password@host`), is not shown at all: where its password is cannot be told.
pub(crate) fn redact_url(url: &str) -> String {
    let Ok(mut parsed) = Url::parse(url) else {
        return UNREADABLE.to_owned();
    };
    if parsed.cannot_be_a_base() {
        return UNREADABLE.to_owned();
    }
    if parsed.password().is_some() && parsed.set_password(Some(HIDDEN)).is_err() {
        return UNREADABLE.to_owned();
    }
    if parsed.query().is_some() {
        let pairs: Vec<(String, String)> = parsed
            .query_pairs()
            .map(|(key, value)| {
                let value = if is_secret_parameter(&key) {
                    HIDDEN.to_owned()
                } else {
                    value.into_owned()
                };
                (key.into_owned(), value)
            })
            .collect();
        parsed.query_pairs_mut().clear().extend_pairs(pairs);
    }
    parsed.to_string()
}

/// libpq's `password` and `sslpassword`, and any other parameter named like a secret.
fn is_secret_parameter(key: &str) -> bool {
    let key = key.to_ascii_lowercase();
    ["password", "passwd", "pwd", "secret", "token"]
        .iter()
        .any(|word| key.contains(word))
}

/// Whether `url` is meant for a broker: then it may be a comma-separated list of nodes,
/// each redacted on its own (read whole, the second node's password would pass as path).
fn is_amqp_scheme(url: &str) -> bool {
    let url = url.trim_start().to_ascii_lowercase();
    url.starts_with("amqp://") || url.starts_with("amqps://")
}

/// Whether `url` has the shape of an AMQP URL (`amqp://` or `amqps://`), so that a
/// malformed one is refused at start-up instead of being echoed, password and all, by the
/// broker client's parse error.
pub(crate) fn is_amqp_url(url: &str) -> bool {
    Url::parse(url).is_ok_and(|parsed| {
        matches!(parsed.scheme(), "amqp" | "amqps") && !parsed.cannot_be_a_base()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_password_of_the_user_part_is_hidden() {
        let url = ServiceUrl::new("amqp://smsgw:hunter2@rabbit:5672/%2f");
        assert_eq!(url.redacted(), "amqp://smsgw:***@rabbit:5672/%2f");
        assert_eq!(url.expose(), "amqp://smsgw:hunter2@rabbit:5672/%2f");
    }

    #[test]
    fn password_query_parameters_are_hidden() {
        for url in [
            "postgres://smsgw@db/smsgw?password=hunter2",
            "postgres://smsgw@db/smsgw?sslmode=require&password=hunter2",
            "postgres://smsgw@db/smsgw?PassWord=hunter2&sslpassword=hunter2",
            "postgres://smsgw:hunter2@db/smsgw?password=hunter2",
        ] {
            let redacted = redact_url(url);
            assert!(!redacted.contains("hunter2"), "{url} -> {redacted}");
            assert!(redacted.contains("***"), "{redacted}");
        }
        let kept = redact_url("postgres://smsgw@db/smsgw?sslmode=require&application_name=x");
        assert_eq!(
            kept,
            "postgres://smsgw@db/smsgw?sslmode=require&application_name=x"
        );
    }

    #[test]
    fn an_unreadable_url_is_not_shown_at_all() {
        for url in [
            "amqp:smsgw:hunter2@rabbit:5672",
            "smsgw:hunter2@rabbit",
            "host=db user=smsgw password=hunter2",
            "amqp://smsgw:hunter2@rab bit",
        ] {
            assert_eq!(redact_url(url), UNREADABLE, "{url}");
        }
    }

    #[test]
    fn debug_and_display_print_the_redacted_url() {
        let url = ServiceUrl::new("postgres://smsgw:hunter2@db/smsgw?password=hunter2");
        assert!(!format!("{url:?}").contains("hunter2"));
        assert!(!format!("{url}").contains("hunter2"));
        assert!(format!("{url:?}").contains("db/smsgw"));
    }

    #[test]
    fn only_amqp_urls_pass() {
        assert!(is_amqp_url("amqp://guest:guest@127.0.0.1:5672/%2f"));
        assert!(is_amqp_url("amqps://rabbit.example/smsgw?heartbeat=10"));
        for bad in [
            "amqp:guest:hunter2@127.0.0.1:5672",
            "http://rabbit",
            "rabbit:5672",
            "",
        ] {
            assert!(!is_amqp_url(bad), "{bad}");
        }
    }

    #[test]
    fn each_node_of_a_broker_list_is_redacted() {
        let url = ServiceUrl::new(
            "amqp://smsgw:hunter2@rabbit-0:5672/%2f, amqp://smsgw:hunter3@rabbit-1:5672/%2f",
        );
        assert_eq!(
            url.nodes().collect::<Vec<_>>(),
            [
                "amqp://smsgw:hunter2@rabbit-0:5672/%2f",
                "amqp://smsgw:hunter3@rabbit-1:5672/%2f"
            ]
        );
        let shown = url.redacted();
        assert!(!shown.contains("hunter"), "{shown}");
        assert!(
            shown.contains("rabbit-0") && shown.contains("rabbit-1"),
            "{shown}"
        );
    }
}
