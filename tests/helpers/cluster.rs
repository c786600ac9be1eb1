//! A RabbitMQ cluster of the test's own: three nodes on this machine with their own node
//! names, ports, cookie and data directories, never the machine's own node. Dropped (also
//! when the test fails), it kills its nodes and removes their directories.

use std::{
    path::{Path, PathBuf},
    process::{Command, Output},
    time::{Duration, Instant},
};

use super::free_port;

/// Where Debian's package keeps the server's own scripts (the ones on `PATH` switch to
/// the `rabbitmq` user); `SMSGW_TEST_RABBITMQ_BIN` names another directory.
const PACKAGE_BIN: &str = "/usr/lib/rabbitmq/bin";
/// Every node of a test cluster is named with this, so that leftovers can be found.
pub const NODE_PREFIX: &str = "smsgw-cluster-";

pub struct Cluster {
    dir: PathBuf,
    pub nodes: Vec<Node>,
}

pub struct Node {
    pub name: String,
    pub amqp_port: u16,
    dist_port: u16,
    dir: PathBuf,
}

fn bin(script: &str) -> PathBuf {
    let dir = std::env::var("SMSGW_TEST_RABBITMQ_BIN").unwrap_or_else(|_| PACKAGE_BIN.into());
    Path::new(&dir).join(script)
}

impl Cluster {
    /// Starts `size` nodes and joins them into one cluster.
    pub fn start(size: usize) -> Cluster {
        // The test's process id in every name, so that a later clean-up can tell the
        // nodes of a killed run from those of a running one.
        let tag = std::process::id();
        let dir = std::env::temp_dir().join(format!(
            "{NODE_PREFIX}{tag}-{}",
            uuid::Uuid::new_v4().simple()
        ));
        std::fs::create_dir_all(&dir).expect("cluster directory");
        let cookie = dir.join(".erlang.cookie");
        std::fs::write(&cookie, uuid::Uuid::new_v4().simple().to_string()).expect("cookie");
        set_owner_only(&cookie);
        let nodes = (1..=size)
            .map(|n| Node::configure(&dir, &format!("{NODE_PREFIX}{tag}-{n}@localhost")))
            .collect();
        let cluster = Cluster { dir, nodes };
        for n in 0..size {
            cluster.boot(n);
        }
        for n in 0..size {
            cluster.await_startup(n);
        }
        for n in 1..size {
            cluster.ctl(n, &["stop_app"]);
            cluster.ctl(n, &["join_cluster", &cluster.nodes[0].name]);
            cluster.ctl(n, &["start_app"]);
        }
        cluster
    }

    /// `amqp://` URL of node `n`.
    pub fn url(&self, n: usize) -> String {
        format!(
            "amqp://guest:guest@127.0.0.1:{}/%2f",
            self.nodes[n].amqp_port
        )
    }

    /// A comma-separated list of the nodes' URLs, in the order given.
    pub fn urls(&self, order: &[usize]) -> String {
        order
            .iter()
            .map(|&n| self.url(n))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Stops node `n` (the other nodes stay clustered without it).
    pub fn stop(&self, n: usize) {
        self.ctl(n, &["stop"]);
    }

    /// Starts node `n` again; it rejoins the cluster from its own data.
    pub fn restart(&self, n: usize) {
        self.boot(n);
        self.await_startup(n);
    }

    /// The node that leads quorum queue `queue`.
    pub fn leader_of(&self, queue: &str, ask: usize) -> usize {
        let listing = self.ctl(ask, &["list_queues", "name", "leader", "--quiet"]);
        let leader = listing
            .lines()
            .filter_map(|line| line.split_once('\t'))
            .find(|(name, _)| *name == queue)
            .map(|(_, leader)| leader.trim().to_owned())
            .unwrap_or_else(|| panic!("no leader for {queue} in {listing}"));
        self.nodes
            .iter()
            .position(|node| node.name == leader)
            .unwrap_or_else(|| panic!("{leader} is not a node of this cluster"))
    }

    /// How many nodes hold a replica of quorum queue `queue`.
    pub fn members_of(&self, queue: &str, ask: usize) -> usize {
        let listing = self.ctl(ask, &["list_queues", "name", "members", "--quiet"]);
        listing
            .lines()
            .filter_map(|line| line.split_once('\t'))
            .find(|(name, _)| *name == queue)
            .map(|(_, members)| members.matches(NODE_PREFIX).count())
            .unwrap_or(0)
    }

    /// Runs `rabbitmqctl` against node `n`; its output, or a panic with its error.
    pub fn ctl(&self, n: usize, args: &[&str]) -> String {
        let output = self.ctl_output(n, args);
        assert!(
            output.status.success(),
            "rabbitmqctl {args:?} on {} failed: {}",
            self.nodes[n].name,
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    fn ctl_output(&self, n: usize, args: &[&str]) -> Output {
        Command::new(bin("rabbitmqctl"))
            .env("HOME", &self.dir)
            .args(["-n", &self.nodes[n].name])
            .args(args)
            .output()
            .expect("rabbitmqctl runs")
    }

    fn boot(&self, n: usize) {
        let node = &self.nodes[n];
        let status = node
            .server_command(&self.dir)
            .arg("-detached")
            .status()
            .expect("rabbitmq-server runs");
        assert!(status.success(), "{} did not start", node.name);
    }

    fn await_startup(&self, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let output = self.ctl_output(n, &["await_startup", "--timeout", "60"]);
            if output.status.success() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{} never started: {}",
                self.nodes[n].name,
                String::from_utf8_lossy(&output.stderr)
            );
            std::thread::sleep(Duration::from_millis(500));
        }
    }
}

impl Node {
    fn configure(cluster: &Path, name: &str) -> Node {
        let dir = cluster.join(name.split('@').next().unwrap_or(name));
        std::fs::create_dir_all(&dir).expect("node directory");
        let amqp_port = free_port();
        let config = format!("listeners.tcp.default = 127.0.0.1:{amqp_port}\n");
        std::fs::write(dir.join("rabbitmq.conf"), config).expect("node config");
        std::fs::write(dir.join("enabled_plugins"), "[].\n").expect("plugins file");
        std::fs::write(dir.join("rabbitmq-env.conf"), "").expect("env file");
        Node {
            name: name.to_owned(),
            amqp_port,
            dist_port: free_port(),
            dir,
        }
    }

    /// The server with everything of its own: none of the machine's configuration.
    fn server_command(&self, home: &Path) -> Command {
        let mut command = Command::new(bin("rabbitmq-server"));
        let dir = |name: &str| self.dir.join(name);
        command
            .env("HOME", home)
            .env("RABBITMQ_CONF_ENV_FILE", dir("rabbitmq-env.conf"))
            .env("RABBITMQ_CONFIG_FILE", dir("rabbitmq"))
            .env("RABBITMQ_ENABLED_PLUGINS_FILE", dir("enabled_plugins"))
            .env("RABBITMQ_MNESIA_BASE", dir("mnesia"))
            .env("RABBITMQ_LOG_BASE", dir("log"))
            .env("RABBITMQ_PID_FILE", dir("pid"))
            .env("RABBITMQ_NODENAME", &self.name)
            .env("RABBITMQ_NODE_IP_ADDRESS", "127.0.0.1")
            .env("RABBITMQ_NODE_PORT", self.amqp_port.to_string())
            .env("RABBITMQ_DIST_PORT", self.dist_port.to_string())
            .env("ERL_EPMD_ADDRESS", "127.0.0.1");
        command
    }

    fn kill(&self) {
        if let Ok(pid) = std::fs::read_to_string(self.dir.join("pid")) {
            let _ = Command::new("kill").args(["-9", pid.trim()]).status();
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for node in &self.nodes {
            node.kill();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[cfg(unix)]
fn set_owner_only(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o400)).expect("cookie mode");
}
