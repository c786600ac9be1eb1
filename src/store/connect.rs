//! How the store reaches PostgreSQL: the connection settings parsed from the URL, TLS, the
//! pool, and single connections outside the pool (migrations, LISTEN, creating the
//! database).
//!
//! TLS follows the URL's `sslmode` as libpq (and sqlx, which this replaced) read it, so a
//! URL that worked before behaves the same:
//!
//! - `disable`: no TLS.
//! - `prefer` (the default): TLS when the server offers it, plain otherwise.
//! - `require`: TLS or no connection.
//! - `verify-ca`, `verify-full`: TLS with the server's certificate checked against the
//!   system's root certificates (`verify-full` also checks that it names the host).
//!
//! `prefer` and `require` encrypt without checking the certificate, as libpq does: many
//! servers (Debian's packages among them) turn TLS on with a self-signed certificate, and
//! checking it would refuse every connection that works today. Whoever needs the server's
//! identity proven asks for `verify-full`. TLS is rustls with ring, like the rest of the
//! daemon, through `tokio-postgres-rustls`.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use deadpool_postgres::{
    Manager, ManagerConfig, Pool, PoolError, RecyclingMethod, Runtime, TimeoutType,
};
use rustls::{
    DigitallySignedStruct, SignatureScheme,
    client::{
        WebPkiServerVerifier,
        danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    },
    crypto::{CryptoProvider, WebPkiSupportedAlgorithms},
    pki_types::{CertificateDer, ServerName, UnixTime},
};
use tokio_postgres::{Client, Config, error::SqlState};
use tokio_postgres_rustls::MakeRustlsConnect;

use super::StoreError;

/// Longest wait for a connection from the pool, or for a new one to be set up (shorter
/// when the database timeout is).
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(5);
/// How much longer the daemon waits for a statement than the server lets it run: a slow
/// statement ends with the server's error, and only a link that went silent with the
/// daemon's own time limit.
const CLIENT_MARGIN: Duration = Duration::from_secs(2);
/// Keepalive probes sent before the kernel gives a silent connection up.
const KEEPALIVE_PROBES: u32 = 3;

/// The bounds of every database call, all from `SMSGW_DATABASE_TIMEOUT` (`limit`):
///
/// - the server ends a statement after `limit` (`statement_timeout`), and a session left
///   idle inside a transaction after twice that (`idle_in_transaction_session_timeout`),
///   so that a daemon that vanished mid-transaction releases its locks (the relay's
///   advisory lock among them) even when no reset ever reaches the server;
/// - the kernel probes a connection idle for `limit` (TCP keepalive, [`KEEPALIVE_PROBES`]
///   probes `limit / 3` apart) and drops one whose data goes unacknowledged for twice
///   `limit` (`TCP_USER_TIMEOUT`);
/// - the daemon waits `limit` plus [`CLIENT_MARGIN`] for any statement, then closes the
///   connection instead of returning it to the pool ([`settle`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Bounds {
    pub(crate) limit: Duration,
}

impl Bounds {
    /// How long the daemon waits for one statement (or a few, in one call).
    pub(crate) fn call(self) -> Duration {
        self.limit + CLIENT_MARGIN
    }

    /// A connection, then one call.
    pub(crate) fn operation(self) -> Duration {
        self.acquire() + self.call()
    }

    fn acquire(self) -> Duration {
        ACQUIRE_TIMEOUT.min(self.limit)
    }

    fn session_options(self) -> String {
        format!(
            "-c statement_timeout={} -c idle_in_transaction_session_timeout={}",
            self.limit.as_millis(),
            (self.limit * 2).as_millis()
        )
    }

    fn apply(self, config: &mut Config) {
        let options = match config.get_options() {
            Some(given) => format!("{given} {}", self.session_options()),
            None => self.session_options(),
        };
        config.options(options);
        config
            .keepalives(true)
            .keepalives_idle(self.limit)
            .keepalives_interval((self.limit / 3).max(Duration::from_secs(1)))
            .keepalives_retries(KEEPALIVE_PROBES)
            .tcp_user_timeout(self.limit * 2);
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(self.acquire());
        }
    }
}

/// Waits for `work` (statements on one connection) at most `limit`.
pub(crate) async fn within<T>(
    limit: Duration,
    work: impl Future<Output = Result<T, StoreError>>,
) -> Result<T, StoreError> {
    tokio::time::timeout(limit, work)
        .await
        .unwrap_or(Err(StoreError::Timeout(limit)))
}

/// Gives `client` back to the pool, or closes it when its work ran out of time: a
/// connection that went silent looks healthy to the pool and would be handed out again.
pub(crate) fn settle<T>(
    client: deadpool_postgres::Client,
    result: Result<T, StoreError>,
) -> Result<T, StoreError> {
    if matches!(result, Err(StoreError::Timeout(_))) {
        drop(deadpool_postgres::Client::take(client));
    }
    result
}

/// How much of the server's certificate is checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verify {
    Nothing,
    Chain,
    ChainAndName,
}

/// Everything needed to open a connection: settings and TLS.
#[derive(Clone)]
pub(crate) struct Connector {
    config: Config,
    tls: MakeRustlsConnect,
    pub(crate) bounds: Bounds,
}

impl std::fmt::Debug for Connector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connector")
            .field("host", &self.config.get_hosts())
            .field("dbname", &self.config.get_dbname())
            .finish_non_exhaustive()
    }
}

impl Connector {
    /// Parses a `postgres://` URL and adds the daemon's own settings, `limit` being the
    /// database timeout (see [`Bounds`]).
    pub(crate) fn from_url(url: &str, limit: Duration) -> Result<Self, StoreError> {
        let (url, verify) = split_verification(url);
        let mut config: Config = url
            .parse()
            .map_err(|e| StoreError::Config(format!("the database URL: {e}")))?;
        config.application_name("smsgw");
        let bounds = Bounds { limit };
        bounds.apply(&mut config);
        Ok(Connector {
            config,
            tls: MakeRustlsConnect::new(tls_config(verify)?),
            bounds,
        })
    }

    /// Connections whose status changes write no status events: the outbox triggers read
    /// this setting (see the `status_events` migration).
    pub(crate) fn without_events(mut self) -> Self {
        let options = match self.config.get_options() {
            Some(given) => format!("{given} -c smsgw.events=off"),
            None => "-c smsgw.events=off".to_owned(),
        };
        self.config.options(options);
        self
    }

    /// The same server and credentials, another database.
    pub(crate) fn for_database(&self, name: &str) -> Self {
        let mut other = self.clone();
        other.config.dbname(name);
        other
    }

    /// The database the URL names (PostgreSQL's default: the user's name).
    pub(crate) fn database(&self) -> Option<&str> {
        self.config.get_dbname().or(self.config.get_user())
    }

    /// A pool of at most `max_connections`; it connects on demand.
    pub(crate) fn pool(&self, max_connections: u32) -> Result<Pool, StoreError> {
        let manager = Manager::from_config(
            self.config.clone(),
            self.tls.clone(),
            // No test query when a connection goes back into use: a connection that went
            // silent would hang it. A dead one fails its next statement, and a silent one
            // times out there and is closed (`settle`).
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        Pool::builder(manager)
            .max_size(
                usize::try_from(max_connections)
                    .unwrap_or(usize::MAX)
                    .max(1),
            )
            .wait_timeout(Some(self.bounds.acquire()))
            .create_timeout(Some(self.bounds.acquire()))
            .recycle_timeout(Some(self.bounds.acquire()))
            .runtime(Runtime::Tokio1)
            .build()
            .map_err(|e| StoreError::Config(format!("the connection pool: {e}")))
    }

    /// One connection of its own, outside the pool, driven by a task that ends with it.
    pub(crate) async fn connect(&self) -> Result<Client, StoreError> {
        let (client, connection) = within(self.bounds.call(), async {
            Ok(self.config.connect(self.tls.clone()).await?)
        })
        .await?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "a database connection ended");
            }
        });
        Ok(client)
    }

    /// One connection whose asynchronous messages (notifications) the caller reads: it
    /// must poll the connection itself.
    pub(crate) async fn connect_raw(&self) -> Result<(Client, RawConnection), StoreError> {
        within(self.bounds.call(), async {
            Ok(self.config.connect(self.tls.clone()).await?)
        })
        .await
    }
}

/// A connection not yet driven by any task.
pub(crate) type RawConnection = tokio_postgres::Connection<
    tokio_postgres::Socket,
    <MakeRustlsConnect as tokio_postgres::tls::MakeTlsConnect<tokio_postgres::Socket>>::Stream,
>;

/// A connection from `pool`, trying for up to 5 s (at most the database timeout) while the server cannot be reached: a
/// server that restarts refuses connections for a moment, and a caller that gave up at once
/// would learn it is back only after its own back-off (seconds later). An error that
/// waiting cannot mend (a wrong password, an unknown database) returns at once.
pub(crate) async fn acquire(pool: &Pool) -> Result<deadpool_postgres::Client, StoreError> {
    let deadline = Instant::now()
        + pool
            .timeouts()
            .wait
            .unwrap_or(ACQUIRE_TIMEOUT)
            .min(ACQUIRE_TIMEOUT);
    let mut pause = Duration::from_millis(20);
    loop {
        match pool.get().await {
            Ok(client) => return Ok(client),
            Err(e) if worth_waiting(&e) && Instant::now() + pause < deadline => {
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_millis(500));
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// No connection now, perhaps one in a moment.
fn worth_waiting(e: &PoolError) -> bool {
    match e {
        PoolError::Backend(e) => e.as_db_error().is_none_or(|db| {
            [SqlState::CANNOT_CONNECT_NOW, SqlState::TOO_MANY_CONNECTIONS].contains(db.code())
        }),
        PoolError::Timeout(TimeoutType::Create) => true,
        _ => false,
    }
}

/// `tokio_postgres::Config` knows `disable`, `prefer` and `require`; the two verifying
/// modes are read here and passed on as `require`. The rest of the URL is left exactly as
/// written (re-encoding it could change what its other parameters say).
fn split_verification(url: &str) -> (String, Verify) {
    let Some((base, query)) = url.split_once('?') else {
        return (url.to_owned(), Verify::Nothing);
    };
    let mut verify = Verify::Nothing;
    let pairs: Vec<&str> = query
        .split('&')
        .map(|pair| match pair {
            "sslmode=verify-ca" => {
                verify = Verify::Chain;
                "sslmode=require"
            }
            "sslmode=verify-full" => {
                verify = Verify::ChainAndName;
                "sslmode=require"
            }
            other => other,
        })
        .collect();
    (format!("{base}?{}", pairs.join("&")), verify)
}

fn tls_config(verify: Verify) -> Result<rustls::ClientConfig, StoreError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| StoreError::Config(format!("TLS: {e}")))?;
    let verifier: Arc<dyn ServerCertVerifier> = match verify {
        Verify::Nothing => Arc::new(EncryptOnly(provider.signature_verification_algorithms)),
        Verify::Chain => Arc::new(ChainOnly(system_roots_verifier(provider)?)),
        Verify::ChainAndName => system_roots_verifier(provider)?,
    };
    Ok(builder
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth())
}

fn system_roots_verifier(
    provider: Arc<CryptoProvider>,
) -> Result<Arc<WebPkiServerVerifier>, StoreError> {
    let found = rustls_native_certs::load_native_certs();
    let mut roots = rustls::RootCertStore::empty();
    roots.add_parsable_certificates(found.certs);
    if roots.is_empty() {
        return Err(StoreError::Config(format!(
            "sslmode verify-ca/verify-full: no system root certificates could be loaded ({:?})",
            found.errors
        )));
    }
    WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider)
        .build()
        .map_err(|e| StoreError::Config(format!("TLS: {e}")))
}

/// `prefer`/`require`: any certificate, but the handshake itself is still checked (the
/// server proves it holds the key of the certificate it sent).
#[derive(Debug)]
struct EncryptOnly(WebPkiSupportedAlgorithms);

impl ServerCertVerifier for EncryptOnly {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_schemes()
    }
}

/// `verify-ca`: the chain must lead to a trusted root; the name in it is not checked.
#[derive(Debug)]
struct ChainOnly(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        use rustls::{CertificateError, Error};
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
        {
            Err(Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// `name` as an SQL identifier, quoted.
pub(crate) fn quote_identifier(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verifying_modes_reach_tokio_postgres_as_require() {
        let (url, verify) =
            split_verification("postgres://u:p@db.example:5432/smsgw?sslmode=verify-full");
        assert_eq!(verify, Verify::ChainAndName);
        let config: Config = url.parse().expect("parses");
        assert_eq!(
            config.get_ssl_mode(),
            tokio_postgres::config::SslMode::Require
        );
        assert_eq!(config.get_dbname(), Some("smsgw"));
        let (url, verify) = split_verification("postgres://db.example/smsgw?sslmode=verify-ca");
        assert_eq!(verify, Verify::Chain);
        assert!(url.contains("sslmode=require"));
    }

    #[test]
    fn other_urls_pass_unchanged() {
        for url in [
            "postgres://postgres@127.0.0.1:5432/smsgw?sslmode=disable",
            "postgres://postgres@127.0.0.1/smsgw?options=-c%20work_mem%3D8MB&sslmode=require",
            "postgres://postgres@127.0.0.1/smsgw",
        ] {
            assert_eq!(split_verification(url), (url.to_owned(), Verify::Nothing));
        }
        let (url, _) = split_verification(
            "postgres://u:p%20w@h/db?options=-c%20work_mem%3D8MB&sslmode=verify-full",
        );
        assert_eq!(
            url,
            "postgres://u:p%20w@h/db?options=-c%20work_mem%3D8MB&sslmode=require"
        );
    }

    #[test]
    fn the_daemon_adds_its_own_settings() {
        let connector = Connector::from_url(
            "postgres://postgres@127.0.0.1/smsgw?options=-c%20work_mem%3D8MB",
            Duration::from_secs(15),
        )
        .expect("parses");
        assert_eq!(connector.config.get_application_name(), Some("smsgw"));
        assert_eq!(
            connector.config.get_options(),
            Some(
                "-c work_mem=8MB -c statement_timeout=15000 \
                 -c idle_in_transaction_session_timeout=30000"
            )
        );
        assert_eq!(connector.database(), Some("smsgw"));
        assert_eq!(
            connector.for_database("postgres").database(),
            Some("postgres")
        );
    }

    #[test]
    fn every_connection_is_bounded_by_the_database_timeout() {
        let connector = Connector::from_url(
            "postgres://postgres@127.0.0.1/smsgw?connect_timeout=3",
            Duration::from_secs(6),
        )
        .expect("parses");
        let config = &connector.config;
        assert!(config.get_keepalives());
        assert_eq!(config.get_keepalives_idle(), Duration::from_secs(6));
        assert_eq!(
            config.get_keepalives_interval(),
            Some(Duration::from_secs(2))
        );
        assert_eq!(config.get_keepalives_retries(), Some(KEEPALIVE_PROBES));
        assert_eq!(
            config.get_tcp_user_timeout(),
            Some(&Duration::from_secs(12))
        );
        // What the URL says is kept.
        assert_eq!(config.get_connect_timeout(), Some(&Duration::from_secs(3)));
        assert_eq!(connector.bounds.call(), Duration::from_secs(8));
        assert_eq!(connector.bounds.acquire(), Duration::from_secs(5));
        let short = Bounds {
            limit: Duration::from_secs(2),
        };
        assert_eq!(short.acquire(), Duration::from_secs(2));
    }

    #[test]
    fn identifiers_are_quoted() {
        assert_eq!(quote_identifier("smsgw"), "\"smsgw\"");
        assert_eq!(quote_identifier("a\"b"), "\"a\"\"b\"");
    }
}
