//! The broker: the only module that speaks AMQP.
//!
//! Topology (declared idempotently at every start):
//!
//! ```text
//!  web app ──▶ sms.jobs (topic) ──type──▶ sms.urgent  (login_code, booking_change, booking_cancellation)
//!                 │                 └───▶ sms.default (booking_confirmation, booking_reminder)
//!                 │                 └───▶ sms.bulk    (announcement)
//!                 └─ unroutable ─▶ sms.unrouted (fanout) ─▶ sms.default (decoded, dead-lettered)
//!
//!  retry / defer ─▶ sms.retry.<delay> (fanout) ─▶ sms.retry.<delay> queue, TTL = delay
//!                                  └─ expired ─▶ sms.requeue (direct, key = type) ─▶ its lane
//!
//!  dead letters ─▶ sms.dead (fanout) ─▶ sms.dead queue
//!  lanes past x-delivery-limit ──────────▲ (the broker dead-letters them itself)
//!
//!  smsgw dlq replay ─▶ sms.replay (fanout) ─▶ sms.jobs (exchange-to-exchange binding)
//!
//!  status events (relay) ─▶ sms.events (topic, key = <type>.<status>) ─▶ the web app's queues
//! ```
//!
//! Every queue is a quorum queue; the broker dead-letters at-least-once. Every publish of
//! ours waits for the broker's confirm before the delivery it replaces is acked.
//!
//! Our `x-smsgw-*` headers (attempts, retry times, replay and requeue marks) are read only
//! from deliveries that came through `sms.requeue` or `sms.replay`, exchanges only smsgw
//! publishes to. On anything else, a publish to `sms.jobs`, they are removed on arrival.
//!
//! - `topology`: the queues and exchanges, declared at every start.
//! - `delivery`: consuming a lane; a delivery decoded into plain data for the pipeline.
//! - `acks`: a lane's acks gathered into `multiple` acks.
//! - `publish`: confirmed publishing, and carrying out a [`Disposition`] once.
//! - `settle`: carrying it out with retries, giving the delivery back when they fail.
//! - `dead`: browsing, replaying and (retention) removing the dead letters.
//! - `events`: publishing status events.
//! - `headers`: our headers and AMQP values.
//!
//! [`Disposition`]: crate::disposition::Disposition

mod acks;
mod dead;
mod delivery;
mod events;
mod headers;
mod publish;
mod settle;
mod topology;

use std::{sync::Arc, time::Duration};

use crate::config::{BrokerSettings, redact_url};
use futures_util::StreamExt;
use lapin::{
    Channel, Connection, ConnectionProperties, options::ConfirmSelectOptions, types::LongString,
    uri::AMQPUri,
};

pub use self::{
    dead::{DeadBrowser, DeadLetter, DeadPruned, MAX_BROWSE, SILENCE, Shortfall},
    delivery::{Delivery, Incoming, LaneConsumer},
    events::OutgoingEvent,
    headers::*,
    topology::{Topology, lane_queue, tier_name},
};

pub const JOBS_EXCHANGE: &str = "sms.jobs";
pub const UNROUTED_EXCHANGE: &str = "sms.unrouted";
pub const REQUEUE_EXCHANGE: &str = "sms.requeue";
pub const DEAD_EXCHANGE: &str = "sms.dead";
/// Where `smsgw dlq replay` publishes: bound to `sms.jobs`, so a replay is routed as a
/// fresh publish is, yet its delivery names this exchange and its headers are trusted.
pub const REPLAY_EXCHANGE: &str = "sms.replay";
pub const DEAD_QUEUE: &str = "sms.dead";
pub const EVENTS_EXCHANGE: &str = "sms.events";

/// How long we wait for the broker to confirm a publish or take an ack.
const BROKER_TIMEOUT: Duration = Duration::from_secs(15);

#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("AMQP error: {0}")]
    Amqp(#[from] lapin::Error),
    #[error("the broker refused the publish (nack)")]
    Nacked,
    #[error("the broker could not route the publish: {0}")]
    Returned(String),
    #[error("the broker did not answer within {0:?}")]
    Timeout(Duration),
    /// The client library's own parse error may quote the URL, password and all.
    #[error(
        "the AMQP URL cannot be read (want amqp://user:password@host:port/vhost); not shown, \
         as it may hold a password"
    )]
    BadUrl,
}

impl BrokerError {
    /// A topology mismatch (a queue declared with other arguments) will not fix itself.
    pub fn is_precondition_failed(&self) -> bool {
        matches!(self, BrokerError::Amqp(e) if e.to_string().contains("PRECONDITION_FAILED"))
    }
}

async fn within<T, E>(future: impl Future<Output = Result<T, E>>) -> Result<T, BrokerError>
where
    BrokerError: From<E>,
{
    match tokio::time::timeout(BROKER_TIMEOUT, future).await {
        Ok(result) => result.map_err(BrokerError::from),
        Err(_) => Err(BrokerError::Timeout(BROKER_TIMEOUT)),
    }
}

/// What the connection tells us besides deliveries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BrokerEvent {
    /// The broker stopped accepting publishes (a memory or disk alarm).
    Blocked(String),
    Unblocked,
}

/// A connection with a confirmed publishing channel.
#[derive(Clone)]
pub struct Broker {
    connection: Arc<Connection>,
    publisher: Channel,
    topology: Arc<Topology>,
    /// The node connected to, its password hidden.
    node: String,
    /// Its place in the node list.
    node_index: usize,
}

impl std::fmt::Debug for Broker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Broker")
            .field("connected", &self.is_connected())
            .finish()
    }
}

/// Heartbeat interval (seconds) unless the URL sets one: a dead peer is noticed in
/// seconds, not minutes.
const HEARTBEAT_SECS: u16 = 20;

/// The places of `count` nodes in the order to try them, from the `first`-th on and
/// round to the start.
fn node_order(count: usize, first: usize) -> impl Iterator<Item = usize> {
    (0..count).map(move |n| (n + first) % count)
}

/// Parses the URL here rather than in `Connection::connect`, whose error quotes it.
fn parse_url(url: &str) -> Result<AMQPUri, BrokerError> {
    let mut uri: AMQPUri = url.parse().map_err(|_| BrokerError::BadUrl)?;
    uri.query.heartbeat.get_or_insert(HEARTBEAT_SECS);
    Ok(uri)
}

/// Where the next connection starts in a list of nodes: past the node of the last one,
/// so that a node that went away (or took the connection, then failed) is tried last,
/// and a node that black-holes costs its connect timeout once, not at every reconnect.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NodeCursor(usize);

impl NodeCursor {
    /// The place of the node to try first.
    pub fn first(self) -> usize {
        self.0
    }

    /// Notes the node a connection went to ([`Broker::node_index`]): the next connection
    /// starts after it.
    pub fn connected_to(&mut self, node_index: usize) {
        self.0 = node_index + 1;
    }
}

impl Broker {
    /// Connects to the first node of `settings.url` (one URL, or a comma-separated list of
    /// one cluster's nodes) that answers, giving each `settings.connect_timeout` to open the
    /// connection and its channel.
    pub async fn connect(settings: &BrokerSettings, name: &str) -> Result<Self, BrokerError> {
        Self::connect_from(settings, NodeCursor::default(), name).await
    }

    /// As [`Broker::connect`], trying the nodes from the `cursor`'s on (and then from the
    /// start): a node that just failed is tried last.
    pub async fn connect_from(
        settings: &BrokerSettings,
        cursor: NodeCursor,
        name: &str,
    ) -> Result<Self, BrokerError> {
        let nodes: Vec<&str> = settings.url.nodes().collect();
        let topology = Topology::from(settings);
        let connect_timeout = settings.connect_timeout;
        let mut failure = BrokerError::BadUrl;
        for index in node_order(nodes.len(), cursor.first()) {
            let node = nodes[index];
            let connecting = Self::connect_node(node, name, topology.clone());
            let connected = match tokio::time::timeout(connect_timeout, connecting).await {
                Ok(connected) => connected,
                Err(_) => Err(BrokerError::Timeout(connect_timeout)),
            };
            match connected {
                Ok(broker) => return Ok(broker.numbered(index)),
                Err(e @ BrokerError::BadUrl) => return Err(e),
                Err(e) => {
                    tracing::warn!(node = %redact_url(node), error = %e, "broker node unavailable");
                    failure = e;
                }
            }
        }
        Err(failure)
    }

    fn numbered(mut self, index: usize) -> Self {
        self.node_index = index;
        self
    }

    /// Which node of the list this connection went to (0 for the first).
    pub fn node_index(&self) -> usize {
        self.node_index
    }

    async fn connect_node(url: &str, name: &str, topology: Topology) -> Result<Self, BrokerError> {
        let properties =
            ConnectionProperties::default().with_connection_name(LongString::from(name));
        let connection = Connection::connect_uri(parse_url(url)?, properties).await?;
        let publisher = connection.create_channel().await?;
        publisher
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        Ok(Broker {
            connection: Arc::new(connection),
            publisher,
            topology: Arc::new(topology),
            node: redact_url(url),
            node_index: 0,
        })
    }

    /// Connection events (blocked, unblocked) until the connection ends.
    pub fn events(&self) -> impl futures_util::Stream<Item = BrokerEvent> + Send + 'static {
        self.connection
            .events_listener()
            .filter_map(|event| async move {
                match event {
                    lapin::Event::ConnectionBlocked(reason) => Some(BrokerEvent::Blocked(reason)),
                    lapin::Event::ConnectionUnblocked => Some(BrokerEvent::Unblocked),
                    _ => None,
                }
            })
    }

    /// The node this connection went to (its URL with the password hidden).
    pub fn node(&self) -> &str {
        &self.node
    }

    pub fn is_connected(&self) -> bool {
        self.connection.status().connected() && self.publisher.status().connected()
    }

    pub async fn close(&self) {
        let _ = within(self.publisher.close(200, "smsgw stopping".into())).await;
        let _ = within(self.connection.close(200, "smsgw stopping".into())).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_nodes_are_tried_from_the_one_after_the_last_used_and_round() {
        assert_eq!(node_order(3, 0).collect::<Vec<_>>(), [0, 1, 2]);
        assert_eq!(node_order(3, 1).collect::<Vec<_>>(), [1, 2, 0]);
        // Past the last node: from the start again.
        assert_eq!(node_order(3, 3).collect::<Vec<_>>(), [0, 1, 2]);
        assert_eq!(node_order(1, 1).collect::<Vec<_>>(), [0]);
    }

    #[test]
    fn a_cursor_starts_at_the_first_node_then_after_the_last_connected() {
        let mut cursor = NodeCursor::default();
        assert_eq!(node_order(3, cursor.first()).collect::<Vec<_>>(), [0, 1, 2]);
        cursor.connected_to(1);
        assert_eq!(node_order(3, cursor.first()).collect::<Vec<_>>(), [2, 0, 1]);
        cursor.connected_to(2);
        assert_eq!(node_order(3, cursor.first()).collect::<Vec<_>>(), [0, 1, 2]);
    }

    #[test]
    fn a_malformed_url_is_refused_without_quoting_it() {
        for url in [
            "amqp:guest:hunter2@127.0.0.1:5672",
            "amqp://guest:hunter2@127.0.0.1:5672/%2f?heartbeat=often",
            "http://guest:hunter2@127.0.0.1:5672",
        ] {
            let err = parse_url(url).expect_err(url);
            assert!(!err.to_string().contains("hunter2"), "{err}");
        }
    }

    #[test]
    fn a_heartbeat_is_added_unless_the_url_sets_one() {
        let uri = parse_url("amqp://guest:guest@127.0.0.1:5672/%2f").expect("valid");
        assert_eq!(uri.query.heartbeat, Some(HEARTBEAT_SECS));
        let uri = parse_url("amqp://127.0.0.1/%2f?heartbeat=2").expect("valid");
        assert_eq!(uri.query.heartbeat, Some(2));
        assert_eq!(uri.vhost, "/");
    }
}
