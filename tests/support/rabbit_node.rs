#![allow(clippy::unwrap_used)]
//! A private RabbitMQ node per test: its own node name, AMQP and
//! distribution ports, data, logs and configuration in a temporary
//! directory, so a test may stop it, raise resource alarms on it or break it
//! without touching the machine's shared broker (`rabbit@localhost` on 5672).
//!
//! The node is the Debian `rabbitmq-server`, started through the packaged
//! wrapper, which switches from root to the `rabbitmq` user. That user's
//! HOME is /var/lib/rabbitmq, so the node and every `rabbitmqctl` run share
//! the machine's Erlang cookie and nothing has to be copied. The shared
//! `epmd` is used as it is and never stopped.
//!
//! Clean-up happens three ways: [`PrivateRabbit::stop`], `Drop` (also while
//! a test panics), and a reaper process outside the test's process group
//! that kills the node and deletes its directory if the test process dies
//! without unwinding (nextest's timeout kill).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use lapin::{Connection, ConnectionProperties};

/// Longest a node may take to boot: about 5 s alone, more when several
/// test processes boot nodes at once on 2 cores.
const BOOT_TIMEOUT: Duration = Duration::from_secs(40);
/// Longest one CLI call may take before it is killed.
const CLI_TIMEOUT_SECS: u32 = 30;
/// The relative watermark the node is configured with; the alarm is
/// cleared by returning to it.
const NORMAL_WATERMARK: &str = "0.4";
/// Boots are retried with new ports only when a port was taken between
/// picking it and the node binding it.
const BOOT_ATTEMPTS: usize = 3;

pub struct PrivateRabbit {
    node: String,
    port: u16,
    dist_port: u16,
    dir: PathBuf,
    /// The node's OS pid (its `beam.smp` process), once found.
    pid: Option<u32>,
    reaper: Option<Reaper>,
    stopped: bool,
}

impl PrivateRabbit {
    /// Boots a fresh node and returns once it accepts AMQP connections.
    /// Panics with the node's log tail if it cannot; never skips.
    pub async fn start() -> PrivateRabbit {
        let started = Instant::now();
        for attempt in 1..=BOOT_ATTEMPTS {
            let mut node = Self::launch();
            match node.await_boot().await {
                Boot::Ready => {
                    node.check_ready().await;
                    eprintln!(
                        "private RabbitMQ {} ready on 127.0.0.1:{} in {:?}",
                        node.node,
                        node.port,
                        started.elapsed()
                    );
                    return node;
                }
                // Another process took a port between the probe and the
                // bind; the node stopped itself. Try again with new ports.
                Boot::PortTaken if attempt < BOOT_ATTEMPTS => {
                    eprintln!(
                        "private RabbitMQ {}: port taken, retrying with new ports",
                        node.node
                    );
                    drop(node);
                }
                Boot::PortTaken => node.fail("a port was taken on every attempt"),
                Boot::Died => node.fail(
                    "the node exited during boot (with an empty log, its error went to \
                     the detached VM's stdout: run rabbitmq-server in the foreground \
                     with the same RABBITMQ_* variables to see it)",
                ),
                Boot::TimedOut => node.fail(&format!("not ready within {BOOT_TIMEOUT:?}")),
            }
        }
        unreachable!("the last attempt returns or panics")
    }

    /// `amqp://guest:guest@127.0.0.1:<port>/%2f`: guest may log in because
    /// the node listens on loopback only.
    pub fn amqp_uri(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The Erlang node name (`st-<random>@localhost`).
    pub fn node_name(&self) -> &str {
        &self.node
    }

    /// The node's directory (data under `mnesia/`, logs under `log/`).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The node's OS pid (`None` only before boot).
    pub fn os_pid(&self) -> Option<u32> {
        self.pid
    }

    /// Runs `rabbitmqctl -q -n <node> <args>` and returns its output; panics
    /// with the output when the command fails.
    pub fn ctl(&self, args: &[&str]) -> String {
        let (ok, out) = self.cli("rabbitmqctl", args);
        assert!(
            ok,
            "rabbitmqctl {} on {} failed:\n{out}",
            args.join(" "),
            self.node
        );
        out
    }

    /// Raises (`true`) or clears (`false`) the node's memory alarm, and
    /// returns once the node reports that state. While it is raised the
    /// node blocks publishing connections (`connection.blocked`); clearing
    /// it sends `connection.unblocked`.
    ///
    /// The alarm comes from a watermark of 1 byte, which any running node
    /// exceeds; setting the watermark re-checks memory at once.
    pub fn set_memory_alarm(&self, on: bool) {
        if on {
            self.ctl(&["set_vm_memory_high_watermark", "absolute", "1"]);
        } else {
            self.ctl(&["set_vm_memory_high_watermark", NORMAL_WATERMARK]);
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if self.memory_alarm() == on {
                return;
            }
            assert!(
                Instant::now() <= deadline,
                "memory alarm on {} did not turn {}: alarms are {}",
                self.node,
                if on { "on" } else { "off" },
                self.ctl(&["eval", "rabbit_alarm:get_alarms()."])
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Whether the node currently has a memory alarm.
    pub fn memory_alarm(&self) -> bool {
        self.ctl(&["eval", "rabbit_alarm:get_alarms()."])
            .contains("memory")
    }

    /// Stops the node and waits until its process is gone (killing it if a
    /// clean stop fails), which releases its ports. The directory is kept
    /// until drop, for its logs.
    pub fn stop(&mut self) {
        if let Err(e) = self.shutdown() {
            panic!("{e}\n{}", self.log_tail(30));
        }
    }

    // --- start-up ---

    /// Writes the node's directory and starts `rabbitmq-server -detached`.
    fn launch() -> PrivateRabbit {
        let id = uuid::Uuid::new_v4().simple().to_string();
        let node = format!("st-{}@localhost", &id[..12]);
        let dir = std::env::temp_dir().join(format!("st-rabbit-{}", &id[..12]));
        let port = free_port(&[]);
        let dist_port = free_port(&[port]);
        std::fs::create_dir_all(dir.join("mnesia")).unwrap();
        std::fs::create_dir_all(dir.join("log")).unwrap();
        // The Debian config pins 5672, so the node gets a file of its own.
        // Guest keeps its loopback-only login: the node listens on loopback.
        std::fs::write(
            dir.join("rabbitmq.conf"),
            format!(
                "listeners.tcp.local = 127.0.0.1:{port}\n\
                 vm_memory_high_watermark.relative = {NORMAL_WATERMARK}\n\
                 log.console = false\n\
                 log.file.level = info\n"
            ),
        )
        .unwrap();
        std::fs::write(dir.join("advanced.config"), "[].\n").unwrap();
        std::fs::write(dir.join("enabled_plugins"), "[].\n").unwrap();
        // Replaces /etc/rabbitmq/rabbitmq-env.conf, whose NODENAME would
        // otherwise compete with ours; keeps its loopback-only distribution.
        std::fs::write(
            dir.join("rabbitmq-env.conf"),
            "ERL_EPMD_ADDRESS=127.0.0.1\n\
             export ERL_FLAGS=\"-kernel inet_dist_use_interface {127,0,0,1}\"\n",
        )
        .unwrap();
        // The wrapper runs the node as `rabbitmq`, which must own its files.
        run_checked(
            Command::new("chown")
                .args(["-R", "rabbitmq:rabbitmq"])
                .arg(&dir),
        );

        let mut me = PrivateRabbit {
            node,
            port,
            dist_port,
            dir,
            pid: None,
            reaper: None,
            stopped: false,
        };
        // Before the node exists, so that no exit path can leave it behind.
        me.reaper = Some(me.spawn_reaper());
        let mut cmd = Command::new("rabbitmq-server");
        me.base_env(&mut cmd);
        cmd.arg("-detached")
            .env("RABBITMQ_NODENAME", &me.node)
            .env("RABBITMQ_NODE_IP_ADDRESS", "127.0.0.1")
            .env("RABBITMQ_NODE_PORT", port.to_string())
            .env("RABBITMQ_DIST_PORT", dist_port.to_string())
            .env("RABBITMQ_MNESIA_BASE", me.dir.join("mnesia"))
            .env("RABBITMQ_LOG_BASE", me.dir.join("log"))
            .env("RABBITMQ_CONFIG_FILE", me.dir.join("rabbitmq.conf"))
            .env(
                "RABBITMQ_ADVANCED_CONFIG_FILE",
                me.dir.join("advanced.config"),
            )
            .env(
                "RABBITMQ_ENABLED_PLUGINS_FILE",
                me.dir.join("enabled_plugins"),
            )
            .env("RABBITMQ_PID_FILE", me.pid_file());
        let out = cmd.output().expect("rabbitmq-server runs");
        if !out.status.success() {
            me.fail(&format!(
                "rabbitmq-server -detached failed: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        me
    }

    /// Waits for the node's own log to report a finished boot. The log, not
    /// the port, is the signal: a port that answers could belong to another
    /// node that picked the same one.
    async fn await_boot(&mut self) -> Boot {
        let launched = Instant::now();
        loop {
            // Found by its environment, not its pid file: a node that dies
            // early (distribution port taken) never writes one, nor a log.
            if self.pid.is_none() {
                self.pid = self.find_beam();
            }
            let alive = self.pid.is_some_and(|pid| self.is_our_beam(pid));
            let log = std::fs::read_to_string(self.log_file()).unwrap_or_default();
            if log.contains("Server startup complete") && alive {
                return Boot::Ready;
            }
            // erl -detached forks before it execs the VM: allow it a moment.
            let gone = if self.pid.is_some() {
                !alive
            } else {
                launched.elapsed() > Duration::from_secs(5)
            };
            if gone || log.contains("eaddrinuse") {
                self.wait_gone(Duration::from_secs(10));
                // A node that died frees its own ports: one still bound is
                // someone else's.
                let taken = log.contains("eaddrinuse")
                    || !port_is_free(self.port)
                    || !port_is_free(self.dist_port);
                return if taken { Boot::PortTaken } else { Boot::Died };
            }
            if launched.elapsed() > BOOT_TIMEOUT {
                return Boot::TimedOut;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Proves the node is usable the ways tests use it: the CLI reaches it
    /// (cookie and node name are right) and a client completes an AMQP
    /// handshake on its port.
    async fn check_ready(&self) {
        self.ctl(&["await_startup", "--timeout", "20"]);
        match Connection::connect(&self.amqp_uri(), ConnectionProperties::default()).await {
            Ok(conn) => {
                let _ = conn.close(200, "ready check".into()).await;
            }
            Err(e) => self.fail(&format!("AMQP connect to {} failed: {e}", self.amqp_uri())),
        }
    }

    /// A process, in a process group of its own so a kill of the test's
    /// group spares it, that waits for the test process to end and then
    /// kills the node and deletes its directory. Killed by `Drop`.
    fn spawn_reaper(&self) -> Reaper {
        // Scans twice: a VM still exec'ing during the first scan is caught
        // by the second.
        let script = format!(
            "while kill -0 {test} 2>/dev/null; do sleep 1; done\n\
             for round in 1 2; do\n\
               for d in /proc/[0-9]*; do\n\
                 if [ \"$(cat $d/comm 2>/dev/null)\" = beam.smp ] && \
                    grep -qxzF 'RABBITMQ_NODENAME={node}' $d/environ 2>/dev/null; then\n\
                   kill -9 ${{d#/proc/}}\n\
                 fi\n\
               done\n\
               sleep 2\n\
             done\n\
             rm -rf '{dir}'\n",
            test = std::process::id(),
            node = self.node,
            dir = self.dir.display(),
        );
        Reaper::spawn(&script)
    }

    fn fail(&self, why: &str) -> ! {
        panic!(
            "private RabbitMQ {} (AMQP {}, dist {}) failed to start: {why}\n\
             --- log tail ({}) ---\n{}",
            self.node,
            self.port,
            self.dist_port,
            self.log_file().display(),
            self.log_tail(40)
        )
    }

    // --- shutdown ---

    fn shutdown(&mut self) -> Result<(), String> {
        if self.stopped {
            return Ok(());
        }
        self.stopped = true;
        if self.pid.is_none() {
            self.pid = self.find_beam();
        }
        let Some(pid) = self.pid else {
            // The node never got far enough to run, or died on its own.
            return Ok(());
        };
        if !self.is_our_beam(pid) {
            return Ok(());
        }
        // With the pid file, `stop` returns only once the process is gone.
        let pid_file = self.pid_file().display().to_string();
        let (ok, out) = self.cli("rabbitmqctl", &["stop", &pid_file]);
        if !ok || !self.wait_gone(Duration::from_secs(5)) {
            eprintln!(
                "private RabbitMQ {}: clean stop failed, killing pid {pid}:\n{out}",
                self.node
            );
            let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
            if !self.wait_gone(Duration::from_secs(10)) {
                return Err(format!(
                    "private RabbitMQ {} (pid {pid}) survived kill -9",
                    self.node
                ));
            }
        }
        Ok(())
    }

    /// Waits up to `within` for the node's process to exit.
    fn wait_gone(&self, within: Duration) -> bool {
        let Some(pid) = self.pid else {
            return true;
        };
        let deadline = Instant::now() + within;
        while self.is_our_beam(pid) {
            if Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        true
    }

    /// Whether `pid` is still this node's VM: guards against killing an
    /// unrelated process that reused the pid, and against the shared `epmd`
    /// (which a node would start, with its environment, if none ran).
    fn is_our_beam(&self, pid: u32) -> bool {
        let is_beam = std::fs::read_to_string(format!("/proc/{pid}/comm"))
            .is_ok_and(|comm| comm.trim() == "beam.smp");
        let wanted = format!("RABBITMQ_NODENAME={}", self.node);
        is_beam
            && std::fs::read(format!("/proc/{pid}/environ"))
                .is_ok_and(|env| env.split(|b| *b == 0).any(|var| var == wanted.as_bytes()))
    }

    /// This node's VM, looked up among all processes.
    fn find_beam(&self) -> Option<u32> {
        std::fs::read_dir("/proc")
            .ok()?
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
            .find(|pid| self.is_our_beam(*pid))
    }

    // --- helpers ---

    /// Runs a RabbitMQ CLI tool against this node, with a time limit so a
    /// hung call fails the test instead of stalling it.
    fn cli(&self, tool: &str, args: &[&str]) -> (bool, String) {
        let mut cmd = Command::new("timeout");
        self.base_env(&mut cmd);
        cmd.args([
            "-k",
            "5",
            &CLI_TIMEOUT_SECS.to_string(),
            tool,
            "-q",
            "-n",
            &self.node,
        ])
        .args(args);
        let out = cmd.output().unwrap_or_else(|e| panic!("{tool} runs: {e}"));
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.success(), text)
    }

    /// A clean environment: no RABBITMQ_* or ERL_* variables from the test
    /// run, the node's own env file instead of the Debian one.
    fn base_env(&self, cmd: &mut Command) {
        cmd.env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            // The Elixir CLI warns on every call without a UTF-8 locale.
            .env("LANG", "C.UTF-8")
            .env("LC_ALL", "C.UTF-8")
            .env("RABBITMQ_CONF_ENV_FILE", self.dir.join("rabbitmq-env.conf"))
            .stdin(Stdio::null());
    }

    fn pid_file(&self) -> PathBuf {
        self.dir.join("pid")
    }

    fn log_file(&self) -> PathBuf {
        self.dir.join("log").join(format!("{}.log", self.node))
    }

    fn log_tail(&self, lines: usize) -> String {
        let log = std::fs::read_to_string(self.log_file()).unwrap_or_else(|e| format!("<{e}>"));
        let all: Vec<&str> = log.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}

impl Drop for PrivateRabbit {
    fn drop(&mut self) {
        if let Err(e) = self.shutdown() {
            // No panic here: it would abort a test that is already unwinding.
            eprintln!("{e}");
        }
        let _ = std::fs::remove_dir_all(&self.dir);
        // Nothing is left for the reaper to do.
        self.reaper.take();
    }
}

enum Boot {
    Ready,
    PortTaken,
    Died,
    TimedOut,
}

fn port_is_free(port: u16) -> bool {
    std::net::TcpListener::bind(("127.0.0.1", port)).is_ok()
}

/// A loopback port below the ephemeral range (32768+), so outgoing
/// connections cannot take it between the probe and the node's bind, and
/// away from the shared node's 5672 and 25672.
fn free_port(not: &[u16]) -> u16 {
    loop {
        let port = rand::random_range(20000..32000);
        if port == 25672 || not.contains(&port) {
            continue;
        }
        if port_is_free(port) {
            return port;
        }
    }
}

fn run_checked(cmd: &mut Command) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?} runs: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A shell script in a process group of its own, which nextest's kill of
/// the test's group spares. Dropping it kills the whole group (the script
/// and its `sleep`).
pub(super) struct Reaper(Child);

impl Reaper {
    pub(super) fn spawn(script: &str) -> Reaper {
        use std::os::unix::process::CommandExt as _;
        let child = Command::new("sh")
            .args(["-c", script])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .expect("sh starts");
        Reaper(child)
    }
}

impl Drop for Reaper {
    fn drop(&mut self) {
        // The group id is the script's pid (process_group(0)).
        let _ = Command::new("kill")
            .args(["-KILL", "--", &format!("-{}", self.0.id())])
            .status();
        let _ = self.0.wait();
    }
}
