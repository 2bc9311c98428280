//! Redis deployments the tests start themselves: a Redis Cluster (the one every
//! behaviour test also runs on, shared by the test binary, and clusters of their own for
//! the failover tests) and a primary with a replica watched by three sentinels.
//!
//! Every `redis-server` runs under a small shell that holds a pipe from this process:
//! when the test binary ends, however it ends, the pipe closes and the shell kills its
//! server, so no run leaves servers behind.

use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use redis::aio::{ConnectionLike, MultiplexedConnection};
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, Pipeline, RedisFuture, Value};

/// One `redis-server` (or sentinel) process.
pub struct Node {
    pub port: u16,
    pid: u32,
    /// The watchdog shell and the pipe it waits on; dropping the pipe ends the server.
    watchdog: Option<(Child, ChildStdin)>,
}

impl Node {
    /// `redis-server <args>` on `port`, under the watchdog; returns once it answers PING.
    fn spawn(port: u16, args: &[String]) -> Self {
        let mut child = Command::new("sh")
            .arg("-c")
            .arg(r#"redis-server "$@" >/dev/null 2>&1 & echo $!; read _; kill -9 $! 2>/dev/null"#)
            .arg("sh")
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("sh and redis-server on PATH");
        let stdin = child.stdin.take().unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let pid = line.trim().parse().expect("redis-server's pid");
        let node = Self {
            port,
            pid,
            watchdog: Some((child, stdin)),
        };
        node.wait_until_up();
        node
    }

    /// A data node: cluster-enabled or not, in `dir`.
    pub fn data(dir: &std::path::Path, extra: &[&str]) -> Self {
        let port = free_port_pair();
        let mut args: Vec<String> = [
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            dir.to_str().unwrap(),
            "--cluster-config-file",
            &format!("nodes-{port}.conf"),
        ]
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
        args.extend(extra.iter().map(|s| (*s).to_owned()));
        Self::spawn(port, &args)
    }

    /// A data node that also listens for TLS on a port of its own (plain stays open for
    /// the test's own checks): `tls` is the certificate, key and CA files, and `extra`
    /// more arguments (e.g. cluster ones). Returns the node and its TLS port.
    pub fn data_with_tls(
        dir: &std::path::Path,
        tls: (&str, &str, &str),
        extra: &[&str],
    ) -> (Self, u16) {
        let tls_port = free_port_pair();
        let (cert, key, ca) = tls;
        let port = tls_port.to_string();
        let mut args = vec![
            "--tls-port",
            &port,
            "--tls-cert-file",
            cert,
            "--tls-key-file",
            key,
            "--tls-ca-cert-file",
            ca,
        ];
        args.extend_from_slice(extra);
        (Self::data(dir, &args), tls_port)
    }

    /// A sentinel from its configuration file, answering (plain) on `port`.
    pub fn sentinel(port: u16, conf: &std::path::Path) -> Self {
        Self::spawn(
            port,
            &[conf.to_str().unwrap().to_owned(), "--sentinel".to_owned()],
        )
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// A plain connection to this node alone.
    pub fn sync(&self) -> redis::Connection {
        redis::Client::open(format!("redis://{}/", self.addr()))
            .unwrap()
            .get_connection_with_timeout(Duration::from_secs(2))
            .unwrap()
    }

    fn wait_until_up(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let up = redis::Client::open(format!("redis://{}/", self.addr()))
                .unwrap()
                .get_connection_with_timeout(Duration::from_millis(200))
                .and_then(|mut c| redis::cmd("PING").query::<String>(&mut c))
                .is_ok();
            if up {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "redis on {} did not start",
                self.port
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL: the node is gone at once, as a crashed host is.
    pub fn kill(&mut self) {
        if let Some((mut child, stdin)) = self.watchdog.take() {
            let _ = Command::new("kill")
                .args(["-9", &self.pid.to_string()])
                .status();
            drop(stdin);
            let _ = child.wait();
        }
    }

    pub fn is_running(&self) -> bool {
        self.watchdog.is_some()
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A port that is free, and whose cluster bus port (+10000) is free too.
pub fn free_port() -> u16 {
    free_port_pair()
}

fn free_port_pair() -> u16 {
    loop {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        if port > 55_000 {
            continue;
        }
        if std::net::TcpListener::bind(("127.0.0.1", port + 10_000)).is_ok() {
            return port;
        }
    }
}

pub fn scratch_dir(kind: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "authd-test-{kind}-{}",
        uuid::Uuid::new_v4().simple()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A Redis Cluster on loopback ports.
pub struct RedisCluster {
    pub nodes: Vec<Node>,
    dir: PathBuf,
}

impl RedisCluster {
    /// `primaries` primaries, each with `replicas` replicas; a node is thought down after
    /// `node_timeout` (a replica takes over after about that). Blocks until every slot
    /// is served (`cluster_state:ok` on every node).
    pub fn start(primaries: usize, replicas: usize, node_timeout: Duration) -> Self {
        let dir = scratch_dir("cluster");
        let timeout = node_timeout.as_millis().to_string();
        let nodes: Vec<Node> = (0..primaries * (1 + replicas))
            .map(|_| {
                Node::data(
                    &dir,
                    &[
                        "--cluster-enabled",
                        "yes",
                        "--cluster-node-timeout",
                        &timeout,
                        // A replica may take over however long it was cut off: the
                        // failover tests kill primaries on purpose.
                        "--cluster-replica-validity-factor",
                        "0",
                    ],
                )
            })
            .collect();
        let created = Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(nodes.iter().map(Node::addr))
            .args(["--cluster-replicas", &replicas.to_string(), "--cluster-yes"])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .output()
            .expect("redis-cli on PATH");
        assert!(
            created.status.success(),
            "redis-cli --cluster create: {}",
            String::from_utf8_lossy(&created.stderr)
        );
        let cluster = Self { nodes, dir };
        cluster.wait_ok(Duration::from_secs(30));
        cluster
    }

    /// Every running node says `cluster_state:ok`, and every replica is linked to its
    /// primary.
    pub fn wait_ok(&self, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            let ok = self.nodes.iter().filter(|n| n.is_running()).all(|n| {
                let mut c = n.sync();
                let state = redis::cmd("CLUSTER")
                    .arg("INFO")
                    .query::<String>(&mut c)
                    .is_ok_and(|info| info.contains("cluster_state:ok"));
                // A replica counts once it is linked to its primary.
                let linked = redis::cmd("INFO")
                    .arg("replication")
                    .query::<String>(&mut c)
                    .is_ok_and(|i| {
                        i.contains("role:master") || i.contains("master_link_status:up")
                    });
                state && linked
            });
            if ok {
                return;
            }
            assert!(Instant::now() < deadline, "the cluster did not become ok");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `host:port,…` of every node, for `REDIS_CLUSTER_NODES`.
    pub fn seeds(&self) -> String {
        self.nodes
            .iter()
            .map(Node::addr)
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The index of the node that serves `key`'s slot as primary now.
    pub fn primary_of(&self, key: &str) -> usize {
        let node = self.nodes.iter().find(|n| n.is_running()).unwrap();
        let slot: u16 = redis::cmd("CLUSTER")
            .arg("KEYSLOT")
            .arg(key)
            .query(&mut node.sync())
            .unwrap();
        let slots: Vec<(u16, u16, (String, u16))> = redis::cmd("CLUSTER")
            .arg("SLOTS")
            .query::<Vec<Value>>(&mut node.sync())
            .unwrap()
            .into_iter()
            .map(|range| {
                let Value::Array(parts) = range else {
                    panic!("CLUSTER SLOTS")
                };
                let start: u16 = redis::from_redis_value(parts[0].clone()).unwrap();
                let end: u16 = redis::from_redis_value(parts[1].clone()).unwrap();
                let Value::Array(primary) = parts[2].clone() else {
                    panic!("CLUSTER SLOTS primary")
                };
                let host: String = redis::from_redis_value(primary[0].clone()).unwrap();
                let port: u16 = redis::from_redis_value(primary[1].clone()).unwrap();
                (start, end, (host, port))
            })
            .collect();
        let (_, _, (_, port)) = slots
            .iter()
            .find(|(start, end, _)| (*start..=*end).contains(&slot))
            .expect("a slot without a primary");
        self.nodes.iter().position(|n| n.port == *port).unwrap()
    }
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        self.nodes.clear();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

pub async fn cluster_conn(seeds: &str) -> ClusterConnection {
    redis::cluster::ClusterClient::new(
        seeds
            .split(',')
            .map(|a| format!("redis://{a}/"))
            .collect::<Vec<_>>(),
    )
    .unwrap()
    .get_async_connection()
    .await
    .unwrap()
}

/// The 3-primary cluster this test binary's behaviour tests share (each test under a
/// fresh key prefix), started at its first use and gone with the test binary.
pub fn shared_cluster() -> &'static RedisCluster {
    static CLUSTER: OnceLock<RedisCluster> = OnceLock::new();
    CLUSTER.get_or_init(|| RedisCluster::start(3, 0, Duration::from_millis(2000)))
}

/// A primary, its replica and three sentinels watching them under [`SENTINEL_MASTER`].
pub struct SentinelSetup {
    pub primary: Node,
    pub replica: Node,
    pub sentinels: Vec<Node>,
    dir: PathBuf,
}

/// The name the sentinels monitor the primary under.
pub const SENTINEL_MASTER: &str = "authd";

impl SentinelSetup {
    /// Sentinels that think a primary down after `down_after` and then fail over.
    pub fn start(down_after: Duration) -> Self {
        let dir = scratch_dir("sentinel");
        let primary = Node::data(&dir, &[]);
        let replica = Node::data(
            &dir,
            &["--replicaof", "127.0.0.1", &primary.port.to_string()],
        );
        let sentinels = (0..3)
            .map(|i| {
                let port = free_port_pair();
                let conf = dir.join(format!("sentinel-{i}.conf"));
                let mut f = std::fs::File::create(&conf).unwrap();
                writeln!(
                    f,
                    "port {port}\nbind 127.0.0.1\ndir {}\n\
                     sentinel monitor {SENTINEL_MASTER} 127.0.0.1 {} 2\n\
                     sentinel down-after-milliseconds {SENTINEL_MASTER} {}\n\
                     sentinel failover-timeout {SENTINEL_MASTER} 2000\n\
                     sentinel parallel-syncs {SENTINEL_MASTER} 1",
                    dir.display(),
                    primary.port,
                    down_after.as_millis()
                )
                .unwrap();
                Node::sentinel(port, &conf)
            })
            .collect();
        let setup = Self {
            primary,
            replica,
            sentinels,
            dir,
        };
        setup.wait_replica_in_sync(Duration::from_secs(10));
        setup
    }

    /// `host:port,…` of the sentinels, for `REDIS_SENTINELS`.
    pub fn sentinel_addrs(&self) -> String {
        self.sentinels
            .iter()
            .map(Node::addr)
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The port of the primary the sentinels name now.
    pub fn named_primary(&self) -> Option<u16> {
        self.sentinels
            .iter()
            .filter(|s| s.is_running())
            .find_map(|s| {
                redis::cmd("SENTINEL")
                    .arg("get-master-addr-by-name")
                    .arg(SENTINEL_MASTER)
                    .query::<Option<(String, u16)>>(&mut s.sync())
                    .ok()
                    .flatten()
                    .map(|(_, port)| port)
            })
    }

    /// Waits until the replica is connected to the primary and the sentinels know it.
    fn wait_replica_in_sync(&self, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            let linked = redis::cmd("INFO")
                .arg("replication")
                .query::<String>(&mut self.replica.sync())
                .is_ok_and(|i| i.contains("master_link_status:up"));
            let known = self.sentinels.iter().all(|s| {
                redis::cmd("SENTINEL")
                    .arg("replicas")
                    .arg(SENTINEL_MASTER)
                    .query::<Vec<Value>>(&mut s.sync())
                    .is_ok_and(|r| !r.is_empty())
            });
            if linked && known {
                return;
            }
            assert!(Instant::now() < deadline, "the replica did not sync");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for SentinelSetup {
    fn drop(&mut self) {
        self.sentinels.clear();
        self.kill_all();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl SentinelSetup {
    fn kill_all(&mut self) {
        self.primary.kill();
        self.replica.kill();
    }
}

/// A test's view of its app's Redis: one server or a cluster, used alike.
#[derive(Clone)]
pub enum TestRedis {
    Node(MultiplexedConnection),
    Cluster(ClusterConnection),
}

impl ConnectionLike for TestRedis {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            TestRedis::Node(c) => c.req_packed_command(cmd),
            TestRedis::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            TestRedis::Node(c) => c.req_packed_commands(pipeline, offset, count),
            TestRedis::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        0
    }
}

/// A primary whose replica replicates through a [`Proxy`](super::proxy::Proxy): stalling
/// the proxy makes the replica lag as far behind as a test wants, which loopback alone
/// never does. No sentinels: the test promotes the replica itself.
pub struct LaggingReplica {
    pub primary: Node,
    pub replica: Node,
    pub link: super::proxy::Proxy,
    dir: PathBuf,
}

impl LaggingReplica {
    /// Both up, the replica linked and in sync.
    pub async fn start() -> Self {
        let dir = scratch_dir("lagging");
        let primary = tokio::task::block_in_place(|| Node::data(&dir, &[]));
        let link = super::proxy::Proxy::start(([127, 0, 0, 1], primary.port).into()).await;
        let replica = tokio::task::block_in_place(|| {
            Node::data(
                &dir,
                &["--replicaof", "127.0.0.1", &link.addr.port().to_string()],
            )
        });
        let setup = Self {
            primary,
            replica,
            link,
            dir,
        };
        setup.wait_in_sync().await;
        setup
    }

    /// Waits until the replica holds everything the primary has written so far.
    pub async fn wait_in_sync(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let synced = tokio::task::block_in_place(|| {
                let offset = |node: &Node, field: &str| {
                    redis::cmd("INFO")
                        .arg("replication")
                        .query::<String>(&mut node.sync())
                        .ok()
                        .and_then(|info| {
                            info.lines()
                                .find_map(|l| l.strip_prefix(field))
                                .and_then(|v| v.trim().parse::<i64>().ok())
                        })
                };
                let primary = offset(&self.primary, "master_repl_offset:");
                let replica = offset(&self.replica, "slave_repl_offset:");
                primary.is_some() && primary == replica
            });
            if synced {
                return;
            }
            assert!(Instant::now() < deadline, "the replica did not sync");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Kills the primary and makes the replica a primary (`REPLICAOF NO ONE`), keeping
    /// only what it had received.
    pub fn fail_over(&mut self) {
        self.primary.kill();
        let _: String = redis::cmd("REPLICAOF")
            .arg("NO")
            .arg("ONE")
            .query(&mut self.replica.sync())
            .unwrap();
    }
}

impl Drop for LaggingReplica {
    fn drop(&mut self) {
        self.primary.kill();
        self.replica.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
