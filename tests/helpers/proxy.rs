//! A TCP proxy a test owns, between the daemon and RabbitMQ or PostgreSQL, to break the
//! connection without touching the shared service: cut every connection, refuse new ones,
//! stall (hold the bytes, as a dead peer would), or go silent and heal (a partition that
//! drops packets without a reset, as a firewall losing its state or a load balancer's
//! idle timeout does).

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::watch,
};

struct Control {
    upstream: SocketAddr,
    refusing: AtomicBool,
    /// Bumped to cut every open connection.
    cuts: watch::Sender<u64>,
    stalled: watch::Sender<bool>,
    /// Bumped to freeze every open connection for good (new ones work).
    freezes: watch::Sender<u64>,
}

#[derive(Clone)]
pub struct Proxy {
    pub addr: SocketAddr,
    control: Arc<Control>,
}

impl Proxy {
    pub async fn start(upstream: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let addr = listener.local_addr().expect("proxy address");
        let control = Arc::new(Control {
            upstream,
            refusing: AtomicBool::new(false),
            cuts: watch::channel(0).0,
            stalled: watch::channel(false).0,
            freezes: watch::channel(0).0,
        });
        let accepting = control.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                if accepting.refusing.load(Ordering::SeqCst) {
                    drop(client);
                    continue;
                }
                tokio::spawn(relay(client, accepting.clone()));
            }
        });
        Proxy { addr, control }
    }

    /// Closes every open connection now.
    pub fn cut(&self) {
        self.control.cuts.send_modify(|n| *n += 1);
    }

    /// Refuses (closes at once) every new connection while `true`.
    pub fn refuse(&self, refusing: bool) {
        self.control.refusing.store(refusing, Ordering::SeqCst);
    }

    /// Open connections go silent for good (open, but no byte ever passes again), as
    /// with a peer that vanished without a reset; new connections work (during a
    /// silence: once it heals).
    pub fn freeze(&self) {
        self.control.freezes.send_modify(|n| *n += 1);
    }

    /// Stops forwarding bytes (both ways) while `true`; connections stay open.
    pub fn stall(&self, stalled: bool) {
        self.control.stalled.send_replace(stalled);
    }

    /// A silent partition: every connection, open or opened from now on, stays open but
    /// no byte passes in either direction, and nobody is told (no FIN, no RST). What was
    /// sent meanwhile arrives after [`Proxy::heal`], as TCP retransmits it; a peer that
    /// gave up on its connection has closed it by then.
    pub fn silence(&self) {
        self.stall(true);
    }

    /// Ends the partition begun by [`Proxy::silence`]: every connection passes again.
    pub fn heal(&self) {
        self.stall(false);
    }

    /// Ends the partition as a stateful firewall or NAT that lost its state does: new
    /// connections pass, but those open before stay silent for good (their packets are
    /// dropped), and nobody is told.
    pub fn heal_forgetting(&self) {
        self.freeze();
        self.stall(false);
    }

    pub fn is_silent(&self) -> bool {
        *self.control.stalled.borrow()
    }

    /// The upstream URL with this proxy's address in its place.
    pub fn url_for(&self, url: &str) -> String {
        let mut parsed = reqwest::Url::parse(url).expect("a URL");
        parsed.set_ip_host(self.addr.ip()).expect("host");
        parsed.set_port(Some(self.addr.port())).expect("port");
        parsed.to_string()
    }
}

async fn relay(client: TcpStream, control: Arc<Control>) {
    let mut cuts = control.cuts.subscribe();
    cuts.borrow_and_update();
    let mut freezes = control.freezes.subscribe();
    freezes.borrow_and_update();
    // During a partition a new connection reaches nobody until it heals.
    let mut stalled = control.stalled.subscribe();
    let reaches = tokio::select! {
        biased;
        _ = cuts.changed() => return,
        _ = freezes.changed() => false,
        healed = stalled.wait_for(|stalled| !*stalled) => healed.is_ok(),
    };
    if !reaches {
        let _ = cuts.changed().await;
        return;
    }
    let Ok(server) = TcpStream::connect(control.upstream).await else {
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (mut client_read, mut client_write) = client.into_split();
    let (mut server_read, mut server_write) = server.into_split();
    let frozen = {
        let up = pump(
            &mut client_read,
            &mut server_write,
            control.stalled.subscribe(),
        );
        let down = pump(
            &mut server_read,
            &mut client_write,
            control.stalled.subscribe(),
        );
        // Freezing wins over bytes that an unstall lets through at the same moment.
        tokio::select! {
            biased;
            _ = cuts.changed() => false,
            _ = freezes.changed() => true,
            _ = async { tokio::join!(up, down) } => false,
        }
    };
    if frozen {
        // Keep both sockets open and silent until the connection is cut.
        let _ = cuts.changed().await;
    }
}

async fn pump(
    from: &mut tokio::net::tcp::OwnedReadHalf,
    to: &mut tokio::net::tcp::OwnedWriteHalf,
    mut stalled: watch::Receiver<bool>,
) {
    let mut buffer = vec![0u8; 16 * 1024];
    loop {
        while *stalled.borrow_and_update() {
            if stalled.changed().await.is_err() {
                return;
            }
        }
        let n = match from.read(&mut buffer).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        while *stalled.borrow_and_update() {
            if stalled.changed().await.is_err() {
                return;
            }
        }
        if to.write_all(&buffer[..n]).await.is_err() {
            return;
        }
    }
}
