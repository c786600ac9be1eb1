//! Supervision without services: scripted fakes of a broker cluster and of in-flight
//! work.

use std::{
    cell::{Cell, RefCell},
    collections::VecDeque,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Instant,
};

use super::*;

/// How a scripted session ends.
#[derive(Clone, Copy)]
enum End {
    Lost,
    Stopped,
}

/// A cluster whose nodes all answer; its sessions end as scripted, its nodes in
/// `undeclarable` take the connection but refuse the topology.
struct Cluster {
    nodes: usize,
    undeclarable: Vec<usize>,
    /// Refuses the URL instead of connecting.
    bad_url: bool,
    /// Fails every connection, firing `shutdown` (stopped while waiting to retry).
    unreachable: bool,
    /// How each session ends, in turn; a session past the script is stopped.
    ends: RefCell<VecDeque<End>>,
    shutdown: CancellationToken,
    /// The node each connection went to, each session ran on, each close was for.
    connected: RefCell<Vec<usize>>,
    ran: RefCell<Vec<usize>>,
    closed: RefCell<Vec<usize>>,
    health: Health,
    /// What health said of the broker as each session ran, and as each was closed.
    up_when_running: RefCell<Vec<bool>>,
    up_when_closed: RefCell<Vec<bool>>,
}

impl Cluster {
    fn of(nodes: usize, ends: &[End]) -> Self {
        Cluster {
            nodes,
            undeclarable: Vec::new(),
            bad_url: false,
            unreachable: false,
            ends: RefCell::new(ends.iter().copied().collect()),
            shutdown: CancellationToken::new(),
            connected: RefCell::new(Vec::new()),
            ran: RefCell::new(Vec::new()),
            closed: RefCell::new(Vec::new()),
            health: Health::default(),
            up_when_running: RefCell::new(Vec::new()),
            up_when_closed: RefCell::new(Vec::new()),
        }
    }

    /// Runs the sessions; a loop that never ends fails the test rather than hang it.
    async fn run(&self) -> Result<Option<(usize, usize)>, DaemonError> {
        let running = run_sessions(self, &self.health, &self.shutdown);
        tokio::time::timeout(Duration::from_secs(5), running)
            .await
            .expect("the sessions end")
    }
}

impl Sessions for Cluster {
    /// The node's place in the list.
    type Session = usize;
    /// The node the stopped session ran on.
    type Kept = usize;

    async fn connect(&self, cursor: NodeCursor) -> Result<usize, BrokerError> {
        if self.bad_url {
            return Err(BrokerError::BadUrl);
        }
        if self.unreachable {
            self.shutdown.cancel();
            return Err(BrokerError::Timeout(Duration::from_secs(1)));
        }
        // Every node answers, so the first one tried takes the connection.
        let node = cursor.first() % self.nodes;
        self.connected.borrow_mut().push(node);
        Ok(node)
    }

    fn node_index(node: &usize) -> usize {
        *node
    }

    async fn declare(&self, node: &usize) -> Result<(), BrokerError> {
        if self.undeclarable.contains(node) {
            return Err(BrokerError::Nacked);
        }
        Ok(())
    }

    async fn run(&self, node: &usize, shutdown: &CancellationToken) -> SessionEnd<usize> {
        self.ran.borrow_mut().push(*node);
        self.up_when_running.borrow_mut().push(self.health.broker());
        let end = self.ends.borrow_mut().pop_front().unwrap_or(End::Stopped);
        match end {
            End::Lost => SessionEnd::Lost(format!("node {node} went away")),
            End::Stopped => {
                shutdown.cancel();
                SessionEnd::Stopped(*node)
            }
        }
    }

    async fn close(&self, node: usize) {
        self.closed.borrow_mut().push(node);
        self.up_when_closed.borrow_mut().push(self.health.broker());
    }

    fn redacted_url(&self) -> String {
        format!("{} nodes", self.nodes)
    }
}

#[tokio::test]
async fn a_lost_session_reconnects_from_the_node_after_its_own() {
    use End::{Lost, Stopped};
    let cluster = Cluster::of(3, &[Lost, Lost, Lost, Stopped]);
    let stopped = cluster.run().await.expect("no error");
    assert_eq!(*cluster.ran.borrow(), [0, 1, 2, 0]);
    assert_eq!(
        *cluster.closed.borrow(),
        [0, 1, 2],
        "each lost session closed"
    );
    assert_eq!(stopped, Some((0, 0)));
}

#[tokio::test]
async fn a_node_that_cannot_declare_the_queues_is_tried_last() {
    let cluster = Cluster {
        undeclarable: vec![0],
        ..Cluster::of(3, &[End::Stopped])
    };
    let stopped = cluster.run().await.expect("no error");
    assert_eq!(*cluster.connected.borrow(), [0, 1]);
    assert_eq!(*cluster.ran.borrow(), [1]);
    assert_eq!(stopped, Some((1, 1)));
}

#[tokio::test]
async fn a_stopped_session_is_left_open_for_the_drain() {
    let cluster = Cluster::of(2, &[End::Stopped]);
    let stopped = cluster.run().await.expect("no error");
    assert_eq!(stopped, Some((0, 0)));
    assert!(cluster.closed.borrow().is_empty(), "closing is the drain's");
    assert!(cluster.health.broker());
}

#[tokio::test]
async fn health_shows_the_broker_down_between_sessions() {
    let cluster = Cluster::of(2, &[End::Lost]);
    cluster.run().await.expect("no error");
    assert_eq!(*cluster.up_when_running.borrow(), [true, true]);
    assert_eq!(*cluster.up_when_closed.borrow(), [false]);
}

#[tokio::test]
async fn a_bad_url_is_a_configuration_error_not_retried() {
    let cluster = Cluster {
        bad_url: true,
        ..Cluster::of(1, &[])
    };
    let result = cluster.run().await;
    assert!(matches!(result, Err(DaemonError::Config(_))), "{result:?}");
    assert!(cluster.ran.borrow().is_empty());
}

#[tokio::test]
async fn stopping_while_waiting_for_the_broker_ends_without_a_session() {
    let cluster = Cluster {
        unreachable: true,
        ..Cluster::of(1, &[])
    };
    let result = cluster.run().await;
    assert!(matches!(result, Ok(None)), "{result:?}");
}

/// Runs `drain` with `close` noting whether `done` was set by then.
async fn drain_noting(
    tracker: &TaskTracker,
    grace: Duration,
    abandon: &CancellationToken,
    done: &AtomicBool,
) -> Option<bool> {
    let seen = Cell::new(None);
    let close = async { seen.set(Some(done.load(Ordering::SeqCst))) };
    drain(tracker, grace, abandon, close).await;
    seen.get()
}

#[tokio::test]
async fn draining_finishes_in_flight_messages_before_closing_the_channels() {
    let tracker = TaskTracker::new();
    let done = Arc::new(AtomicBool::new(false));
    let finished = done.clone();
    tracker.spawn(async move {
        tokio::time::sleep(Duration::from_millis(50)).await;
        finished.store(true, Ordering::SeqCst);
    });
    let abandon = CancellationToken::new();
    let grace = Duration::from_secs(30);
    let seen = drain_noting(&tracker, grace, &abandon, &done).await;
    assert_eq!(seen, Some(true), "closed after the message finished");
    assert!(!abandon.is_cancelled());
}

#[tokio::test]
async fn past_the_grace_period_in_flight_messages_are_abandoned_then_closed() {
    let tracker = TaskTracker::new();
    let abandon = CancellationToken::new();
    let gave_up = Arc::new(AtomicBool::new(false));
    let (told, noted) = (abandon.clone(), gave_up.clone());
    tracker.spawn(async move {
        told.cancelled().await;
        noted.store(true, Ordering::SeqCst);
    });
    let began = Instant::now();
    let seen = drain_noting(&tracker, Duration::from_millis(50), &abandon, &gave_up).await;
    assert!(abandon.is_cancelled());
    assert_eq!(seen, Some(true), "closed after the message gave up");
    assert!(
        began.elapsed() < Duration::from_secs(1),
        "{:?}",
        began.elapsed()
    );
}

#[tokio::test]
async fn a_message_deaf_to_abandon_holds_the_drain_two_seconds_at_most() {
    let tracker = TaskTracker::new();
    tracker.spawn(tokio::time::sleep(Duration::from_secs(3_600)));
    let abandon = CancellationToken::new();
    let began = Instant::now();
    let never = AtomicBool::new(false);
    let seen = drain_noting(&tracker, Duration::from_millis(10), &abandon, &never).await;
    assert_eq!(seen, Some(false), "closed all the same");
    let took = began.elapsed();
    assert!(
        took >= Duration::from_secs(2),
        "given its two seconds: {took:?}"
    );
    assert!(took < Duration::from_secs(3), "{took:?}");
}
