#![allow(clippy::unwrap_used)]
//! Private Redis servers per test: a six-node Redis Cluster (three masters,
//! three replicas) or a master, a replica and three sentinels, each
//! `redis-server` on free loopback ports with its data in a temporary
//! directory, so a test may SIGKILL a master without touching the machine's
//! shared Redis on 6379.
//!
//! Clean-up happens three ways: `stop` on drop (also while a test panics),
//! and a reaper process outside the test's process group that kills every
//! server the group started (their pids are appended to a file as they
//! start) and deletes the directory if the test process dies without
//! unwinding (nextest's timeout kill).
//!
//! `redis-server` and `redis-cli` must be installed: a missing one fails the
//! test loudly, it never skips.

use std::collections::HashSet;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::rabbit_node::Reaper;

/// Longest a server may take to answer PING after it was started.
const START_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest a new cluster may take to agree on its slots and replicas.
const CLUSTER_READY_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest the sentinels may take to find each other and the replica
/// (hello messages go out every 2 s).
const SENTINEL_READY_TIMEOUT: Duration = Duration::from_secs(30);
/// Starts are retried on new ports when a port was taken between the probe
/// and the server's bind (another test process picked it too).
const START_ATTEMPTS: usize = 4;
/// Cluster nodes also listen on port + 10000 (the cluster bus), so ports are
/// drawn below the ephemeral range (32768+) with the bus port below 55536.
const PORT_RANGE: std::ops::Range<u16> = 20000..32000;

/// Writes a server's configuration file from its port and directory.
type ConfigFile<'a> = &'a dyn Fn(u16, &Path) -> String;

/// One `redis-server` process.
pub struct RedisNode {
    port: u16,
    child: Child,
    dir: PathBuf,
    killed: bool,
    /// Set when the server listens for TLS only (its port is `tls-port`).
    tls: Option<TestTls>,
}

impl RedisNode {
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `redis://` or, for a TLS server, `rediss://`.
    pub fn url(&self) -> String {
        let scheme = if self.tls.is_some() {
            "rediss"
        } else {
            "redis"
        };
        format!("{scheme}://127.0.0.1:{}", self.port)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILLs the server (no shutdown, no save) and waits for it to die.
    pub fn kill(&mut self) {
        if !self.killed {
            self.killed = true;
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }

    pub fn is_killed(&self) -> bool {
        self.killed
    }

    /// A plain connection to this one server.
    pub fn connection(&self) -> redis::Connection {
        self.try_connection(Duration::from_secs(2))
            .unwrap_or_else(|e| panic!("redis on {} answers: {e}", self.port))
    }

    /// A connection that trusts the test CA when the server speaks TLS.
    fn try_connection(&self, timeout: Duration) -> redis::RedisResult<redis::Connection> {
        let client = match &self.tls {
            Some(tls) => redis::Client::build_with_tls(self.url(), tls.certificates())?,
            None => redis::Client::open(self.url())?,
        };
        client.get_connection_with_timeout(timeout)
    }

    /// Runs one command on this server and returns its answer as text.
    pub fn cmd(&self, args: &[&str]) -> String {
        let mut cmd = redis::cmd(args[0]);
        for a in &args[1..] {
            cmd.arg(*a);
        }
        let value: redis::Value = cmd
            .query(&mut self.connection())
            .unwrap_or_else(|e| panic!("{args:?} on {}: {e}", self.port));
        value_text(&value)
    }

    fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.dir.join("redis.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }
}

impl Drop for RedisNode {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A test CA and a server certificate it signed for 127.0.0.1, made with
/// `openssl` (a self-signed CA certificate cannot serve as the server's own:
/// webpki refuses a CA certificate as an end entity).
#[derive(Clone)]
pub struct TestTls {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl TestTls {
    fn make(dir: &Path) -> TestTls {
        let tls = TestTls {
            ca: dir.join("ca.pem"),
            cert: dir.join("server.pem"),
            key: dir.join("server.key"),
        };
        let ca_key = dir.join("ca.key");
        let csr = dir.join("server.csr");
        let ext = dir.join("server.ext");
        std::fs::write(
            &ext,
            "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\n\
             extendedKeyUsage=serverAuth,clientAuth\n",
        )
        .unwrap();
        let days = ["-days", "1"];
        openssl(
            Command::new("openssl")
                .args(["req", "-x509", "-newkey", "rsa:2048", "-nodes"])
                .args(days)
                .args(["-subj", "/CN=sendtalk-relay test CA", "-keyout"])
                .arg(&ca_key)
                .arg("-out")
                .arg(&tls.ca),
        );
        openssl(
            Command::new("openssl")
                .args(["req", "-newkey", "rsa:2048", "-nodes"])
                .args(["-subj", "/CN=127.0.0.1", "-keyout"])
                .arg(&tls.key)
                .arg("-out")
                .arg(&csr),
        );
        openssl(
            Command::new("openssl")
                .args(["x509", "-req", "-in"])
                .arg(&csr)
                .arg("-CA")
                .arg(&tls.ca)
                .arg("-CAkey")
                .arg(&ca_key)
                .args(["-CAcreateserial"])
                .args(days)
                .arg("-extfile")
                .arg(&ext)
                .arg("-out")
                .arg(&tls.cert),
        );
        tls
    }

    /// The CA as the redis crate takes it, for the test's own clients.
    pub fn certificates(&self) -> redis::TlsCertificates {
        redis::TlsCertificates {
            client_tls: None,
            root_cert: Some(std::fs::read(&self.ca).unwrap()),
        }
    }

    /// The server's TLS arguments: TLS only, on `port`, for clients,
    /// replication and the cluster bus alike.
    fn server_args(&self, port: u16) -> Vec<String> {
        let mut args: Vec<String> = ["--port", "0", "--tls-port"]
            .iter()
            .map(ToString::to_string)
            .collect();
        args.push(port.to_string());
        for (flag, path) in [
            ("--tls-cert-file", &self.cert),
            ("--tls-key-file", &self.key),
            ("--tls-ca-cert-file", &self.ca),
        ] {
            args.push(flag.to_string());
            args.push(path.display().to_string());
        }
        for flag in ["--tls-auth-clients", "no", "--tls-replication", "yes"] {
            args.push(flag.to_string());
        }
        args
    }
}

fn openssl(cmd: &mut Command) {
    let out = cmd.output().expect("openssl is installed");
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A directory, a pid file and a reaper shared by a group of servers.
struct Group {
    dir: PathBuf,
    pids: PathBuf,
    ports: HashSet<u16>,
    tls: Option<TestTls>,
    _reaper: Reaper,
}

impl Group {
    fn new(kind: &str, tls: bool) -> Group {
        require_tools();
        let id = uuid::Uuid::new_v4().simple().to_string();
        let dir = std::env::temp_dir().join(format!("st-redis-{kind}-{}", &id[..12]));
        std::fs::create_dir_all(&dir).unwrap();
        let pids = dir.join("pids");
        std::fs::write(&pids, "").unwrap();
        // Started before any server, so that no exit path leaves one behind.
        // The comm check guards against a pid reused by another process.
        let script = format!(
            "while kill -0 {test} 2>/dev/null; do sleep 1; done\n\
             for p in $(cat '{pids}' 2>/dev/null); do\n\
               if [ \"$(cat /proc/$p/comm 2>/dev/null)\" = redis-server ]; then kill -9 $p; fi\n\
             done\n\
             rm -rf '{dir}'\n",
            test = std::process::id(),
            pids = pids.display(),
            dir = dir.display(),
        );
        let reaper = Reaper::spawn(&script);
        Group {
            tls: tls.then(|| TestTls::make(&dir)),
            dir,
            pids,
            ports: HashSet::new(),
            _reaper: reaper,
        }
    }

    /// Starts one server with `args` (its port, directory and log are
    /// added here) and waits for it to answer PING; `config` is written to
    /// a file given as the first argument (sentinels need one).
    fn start(&mut self, name: &str, config: Option<ConfigFile<'_>>, args: &[String]) -> RedisNode {
        for attempt in 1..=START_ATTEMPTS {
            let port = self.free_port();
            let dir = self.dir.join(format!("{name}-{port}"));
            std::fs::create_dir_all(&dir).unwrap();
            let mut cmd = Command::new("redis-server");
            if let Some(config) = config {
                let file = dir.join("redis.conf");
                std::fs::write(&file, config(port, &dir)).unwrap();
                cmd.arg(&file);
            }
            match &self.tls {
                Some(tls) => cmd.args(tls.server_args(port)),
                None => cmd.args(["--port", &port.to_string()]),
            };
            cmd.args(["--bind", "127.0.0.1"])
                .arg("--dir")
                .arg(&dir)
                .arg("--logfile")
                .arg(dir.join("redis.log"))
                .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
                .args(["--protected-mode", "no"])
                .args(args)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null());
            let child = cmd
                .spawn()
                .unwrap_or_else(|e| panic!("redis-server starts: {e}"));
            writeln!(
                std::fs::OpenOptions::new()
                    .append(true)
                    .open(&self.pids)
                    .unwrap(),
                "{}",
                child.id()
            )
            .unwrap();
            let mut node = RedisNode {
                port,
                child,
                dir,
                killed: false,
                tls: self.tls.clone(),
            };
            let deadline = Instant::now() + START_TIMEOUT;
            loop {
                if let Ok(Some(_)) = node.child.try_wait() {
                    node.killed = true;
                    let log = node.log_tail();
                    if attempt < START_ATTEMPTS && log.contains("in use") {
                        eprintln!("private redis {name}: port {port} taken, retrying");
                        break;
                    }
                    panic!("private redis {name} on {port} exited at start:\n{log}");
                }
                let up = node
                    .try_connection(Duration::from_millis(300))
                    .is_ok_and(|mut c| redis::cmd("PING").query::<String>(&mut c).is_ok());
                if up {
                    return node;
                }
                assert!(
                    Instant::now() <= deadline,
                    "private redis {name} on {port} not answering within {START_TIMEOUT:?}:\n{}",
                    node.log_tail()
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        unreachable!("the last attempt returns or panics")
    }

    fn free_port(&mut self) -> u16 {
        loop {
            let port = rand::random_range(PORT_RANGE);
            if self.ports.contains(&port) || port == 25672 {
                continue;
            }
            if port_is_free(port) && port_is_free(port + 10000) {
                self.ports.insert(port);
                return port;
            }
        }
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A six-node Redis Cluster: three masters, each with one replica.
pub struct RedisCluster {
    // Field order: the nodes die before the group deletes their directory.
    pub nodes: Vec<RedisNode>,
    group: Group,
}

impl RedisCluster {
    /// Starts six nodes, creates the cluster with `redis-cli --cluster
    /// create --cluster-replicas 1`, and returns once every slot is served
    /// and every replica is in sync.
    ///
    /// `cluster-require-full-coverage no`: while one master fails over, the
    /// others keep serving their slots (the setting the README recommends).
    pub fn start() -> RedisCluster {
        Self::start_with(false)
    }

    /// Like [`Self::start`]; with `tls`, every node speaks TLS only (clients,
    /// replication and the cluster bus) with a certificate of a test CA.
    pub fn start_with(tls: bool) -> RedisCluster {
        let started = Instant::now();
        let mut group = Group::new("cluster", tls);
        let mut nodes = Vec::new();
        for i in 0..6 {
            let args: Vec<String> = [
                "--cluster-enabled",
                "yes",
                "--cluster-node-timeout",
                "1000",
                "--cluster-config-file",
                "nodes.conf",
                "--cluster-require-full-coverage",
                "no",
                "--tls-cluster",
                if tls { "yes" } else { "no" },
            ]
            .iter()
            .map(ToString::to_string)
            .collect();
            nodes.push(group.start(&format!("node{i}"), None, &args));
        }
        let addrs: Vec<String> = nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        let mut create = Command::new("timeout");
        create.args(["60", "redis-cli"]);
        if let Some(tls) = &group.tls {
            create.arg("--tls").arg("--cacert").arg(&tls.ca);
        }
        let out = create
            .args(["--cluster", "create"])
            .args(&addrs)
            .args(["--cluster-replicas", "1", "--cluster-yes"])
            .stdin(Stdio::null())
            .output()
            .expect("redis-cli runs");
        assert!(
            out.status.success(),
            "redis-cli --cluster create failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let cluster = RedisCluster { nodes, group };
        cluster.wait_ready(CLUSTER_READY_TIMEOUT);
        eprintln!(
            "private Redis Cluster on ports {:?} ready in {:?}",
            cluster.ports(),
            started.elapsed()
        );
        cluster
    }

    pub fn ports(&self) -> Vec<u16> {
        self.nodes.iter().map(|n| n.port).collect()
    }

    /// The test CA and certificate, when the cluster speaks TLS.
    pub fn tls(&self) -> Option<&TestTls> {
        self.group.tls.as_ref()
    }

    /// Every node, comma-separated, for `SENDTALK_RELAY__REDIS__URLS`.
    pub fn urls(&self) -> String {
        self.nodes
            .iter()
            .map(RedisNode::url)
            .collect::<Vec<_>>()
            .join(",")
    }

    /// A node still running.
    pub fn live(&self) -> &RedisNode {
        self.nodes.iter().find(|n| !n.killed).expect("a live node")
    }

    pub fn node(&self, port: u16) -> &RedisNode {
        self.nodes.iter().find(|n| n.port == port).unwrap()
    }

    pub fn node_mut(&mut self, port: u16) -> &mut RedisNode {
        self.nodes.iter_mut().find(|n| n.port == port).unwrap()
    }

    /// Which master serves each slot, as a live node sees it now.
    pub fn slot_owners(&self) -> Vec<u16> {
        let mut owners = vec![0u16; 16384];
        let mut conn = self.live().connection();
        let slots: Vec<redis::Value> = redis::cmd("CLUSTER").arg("SLOTS").query(&mut conn).unwrap();
        for range in slots {
            let redis::Value::Array(items) = range else {
                continue;
            };
            let (redis::Value::Int(from), redis::Value::Int(to)) = (&items[0], &items[1]) else {
                continue;
            };
            let redis::Value::Array(master) = &items[2] else {
                continue;
            };
            let redis::Value::Int(port) = master[1] else {
                continue;
            };
            let port = u16::try_from(port).expect("CLUSTER SLOTS gives a TCP port");
            for slot in *from..=*to {
                owners[usize::try_from(slot).expect("CLUSTER SLOTS gives 0-16383")] = port;
            }
        }
        owners
    }

    /// The master ports, in order.
    pub fn masters(&self) -> Vec<u16> {
        let mut masters: Vec<u16> = self.slot_owners();
        masters.sort_unstable();
        masters.dedup();
        masters.retain(|p| *p != 0);
        masters
    }

    /// SIGKILLs the node on `port`; returns the instant of the kill.
    pub fn kill(&mut self, port: u16) -> Instant {
        let node = self.node_mut(port);
        let pid = node.pid();
        node.kill();
        eprintln!("SIGKILLed Redis Cluster master on port {port} (pid {pid})");
        Instant::now()
    }

    /// A connection to the cluster that follows redirections.
    pub fn client(&self) -> redis::cluster::ClusterConnection {
        let urls: Vec<String> = self
            .nodes
            .iter()
            .filter(|n| !n.killed)
            .map(RedisNode::url)
            .collect();
        let mut builder = redis::cluster::ClusterClient::builder(urls);
        if let Some(tls) = self.tls() {
            builder = builder.certs(tls.certificates());
        }
        builder.build().unwrap().get_connection().unwrap()
    }

    /// Waits until every live node reports `cluster_state:ok`, all 16384
    /// slots are served by live masters, and every live replica's link to
    /// its master is up.
    pub fn wait_ready(&self, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            let ok = self.nodes.iter().filter(|n| !n.killed).all(|n| {
                let info = n.cmd(&["CLUSTER", "INFO"]);
                let repl = n.cmd(&["INFO", "replication"]);
                info.contains("cluster_state:ok")
                    && info.contains("cluster_slots_ok:16384")
                    && (repl.contains("role:master") || repl.contains("master_link_status:up"))
            });
            let live: HashSet<u16> = self
                .nodes
                .iter()
                .filter(|n| !n.killed)
                .map(|n| n.port)
                .collect();
            if ok && self.slot_owners().iter().all(|p| live.contains(p)) {
                return;
            }
            assert!(
                Instant::now() <= deadline,
                "Redis Cluster {:?} not ready within {within:?}:\n{}",
                self.ports(),
                self.live().cmd(&["CLUSTER", "NODES"])
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

/// A master, one replica and three sentinels monitoring them.
pub struct RedisSentinels {
    pub master: RedisNode,
    pub replica: RedisNode,
    pub sentinels: Vec<RedisNode>,
    pub service: String,
    group: Group,
}

impl RedisSentinels {
    /// Starts the master, the replica (`--replicaof`), then three
    /// sentinels (`sentinel monitor <service> ... 2`, down after 1 s,
    /// failover timeout 3 s); returns once the replica is in sync and every
    /// sentinel knows the replica and the two other sentinels.
    pub fn start() -> RedisSentinels {
        Self::start_with(false)
    }

    /// Like [`Self::start`]; with `tls`, every server and sentinel speaks
    /// TLS only, and the sentinels reach the master and each other by TLS.
    pub fn start_with(tls: bool) -> RedisSentinels {
        let started = Instant::now();
        let mut group = Group::new("sentinel", tls);
        let service = format!("st-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
        let master = group.start("master", None, &[]);
        let replica = group.start(
            "replica",
            None,
            &[
                "--replicaof".to_string(),
                "127.0.0.1".to_string(),
                master.port.to_string(),
            ],
        );
        let master_port = master.port;
        let svc = service.clone();
        let config = move |port: u16, dir: &Path| {
            format!(
                "port {port}\nbind 127.0.0.1\ndir {dir}\n\
                 sentinel monitor {svc} 127.0.0.1 {master_port} 2\n\
                 sentinel down-after-milliseconds {svc} 1000\n\
                 sentinel failover-timeout {svc} 3000\n",
                dir = dir.display()
            )
        };
        let mut sentinels = Vec::new();
        for i in 0..3 {
            sentinels.push(group.start(
                &format!("sentinel{i}"),
                Some(&config),
                &["--sentinel".to_string()],
            ));
        }
        let me = RedisSentinels {
            master,
            replica,
            sentinels,
            service,
            group,
        };
        let deadline = Instant::now() + SENTINEL_READY_TIMEOUT;
        loop {
            let synced = me
                .replica
                .cmd(&["INFO", "replication"])
                .contains("master_link_status:up");
            let known = me.sentinels.iter().all(|s| {
                let info = s.cmd(&["SENTINEL", "MASTER", &me.service]);
                info.contains("num-slaves 1") && info.contains("num-other-sentinels 2")
            });
            if synced && known {
                break;
            }
            assert!(
                Instant::now() <= deadline,
                "sentinels not ready within {SENTINEL_READY_TIMEOUT:?}: {}",
                me.sentinels[0].cmd(&["SENTINEL", "MASTER", &me.service])
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        eprintln!(
            "private Redis master {} + replica {} + sentinels {:?} ready in {:?}",
            me.master.port,
            me.replica.port,
            me.sentinels.iter().map(|s| s.port).collect::<Vec<_>>(),
            started.elapsed()
        );
        me
    }

    /// The test CA and certificate, when the servers speak TLS.
    pub fn tls(&self) -> Option<&TestTls> {
        self.group.tls.as_ref()
    }

    /// The sentinels, comma-separated, for `SENDTALK_RELAY__REDIS__URLS`.
    pub fn urls(&self) -> String {
        self.sentinels
            .iter()
            .map(RedisNode::url)
            .collect::<Vec<_>>()
            .join(",")
    }

    /// SIGKILLs the master; returns the instant of the kill.
    pub fn kill_master(&mut self) -> Instant {
        let pid = self.master.pid();
        self.master.kill();
        eprintln!(
            "SIGKILLed the sentinel-monitored master on port {} (pid {pid})",
            self.master.port
        );
        Instant::now()
    }

    /// The master port a live sentinel names now.
    pub fn current_master_port(&self) -> u16 {
        let mut conn = self.sentinels[0].connection();
        let (_, port): (String, u16) = redis::cmd("SENTINEL")
            .arg("GET-MASTER-ADDR-BY-NAME")
            .arg(&self.service)
            .query(&mut conn)
            .unwrap();
        port
    }
}

/// One standalone server.
pub struct RedisServer {
    pub node: RedisNode,
    group: Group,
}

impl RedisServer {
    /// Starts one server; with `tls`, it speaks TLS only.
    pub fn start(tls: bool) -> RedisServer {
        let mut group = Group::new("single", tls);
        let node = group.start("single", None, &[]);
        RedisServer { node, group }
    }

    pub fn tls(&self) -> Option<&TestTls> {
        self.group.tls.as_ref()
    }
}

/// The cluster slot of `key` (CRC16/XMODEM of the key or its hash tag,
/// modulo 16384), computed here independently of the relay.
pub fn key_slot(key: &str) -> u16 {
    let bytes = key.as_bytes();
    let hashed = match bytes.iter().position(|b| *b == b'{') {
        Some(open) => match bytes[open + 1..].iter().position(|b| *b == b'}') {
            Some(len) if len > 0 => &bytes[open + 1..open + 1 + len],
            _ => bytes,
        },
        None => bytes,
    };
    let mut crc: u16 = 0;
    for b in hashed {
        crc ^= u16::from(*b) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc % 16384
}

fn require_tools() {
    for tool in ["redis-server", "redis-cli"] {
        let found = Command::new(tool)
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        assert!(
            found,
            "`{tool}` is required by the Redis cluster and sentinel tests (Debian: apt-get install redis-server redis-tools)"
        );
    }
}

fn port_is_free(port: u16) -> bool {
    std::net::TcpListener::bind(("127.0.0.1", port)).is_ok()
}

fn value_text(v: &redis::Value) -> String {
    match v {
        redis::Value::BulkString(b) => String::from_utf8_lossy(b).into_owned(),
        redis::Value::SimpleString(s) => s.clone(),
        redis::Value::Int(i) => i.to_string(),
        redis::Value::Array(items) => items.iter().map(value_text).collect::<Vec<_>>().join(" "),
        redis::Value::Nil => String::new(),
        other => format!("{other:?}"),
    }
}
