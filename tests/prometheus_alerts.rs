//! A real Prometheus scraping a live relay with `deploy/prometheus/alerts.yml`
//! (SPEC 6, 11): the broker is cut, the broker-down alert fires through
//! Prometheus' HTTP API, and resolves once the broker is back.
//!
//! `prometheus` comes from Debian's package; `scripts/test` installs it
//! (through `scripts/check-deploy`) when missing. Without it this test fails
//! loudly.

mod support;

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use support::proxy::FaultProxy;
use support::*;

/// The alert under test and how long its `for:` clause holds it pending.
const ALERT: &str = "SendtalkRelayBrokerDisconnected";
const ALERT_FOR: Duration = Duration::from_secs(120);

struct Prometheus {
    child: Child,
    url: String,
    dir: PathBuf,
}

impl Prometheus {
    fn start(target: &str) -> Prometheus {
        let binary = ["/usr/bin/prometheus", "/usr/local/bin/prometheus"]
            .into_iter()
            .find(|p| std::path::Path::new(p).exists())
            .expect("prometheus is not installed: run scripts/test, which installs it (apt-get install prometheus)");
        let dir = std::env::temp_dir().join(unique("prometheus"));
        std::fs::create_dir_all(&dir).unwrap();
        let rules = std::fs::canonicalize("deploy/prometheus/alerts.yml").unwrap();
        let config = dir.join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
                 rule_files:\n  - {}\n\
                 scrape_configs:\n  - job_name: sendtalk-relay-admin\n    static_configs:\n      - targets: ['{target}']\n",
                rules.display()
            ),
        )
        .unwrap();
        let port = free_port();
        let child = Command::new(binary)
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(child_stderr())
            .spawn()
            .unwrap();
        Prometheus {
            child,
            url: format!("http://127.0.0.1:{port}"),
            dir,
        }
    }

    /// The state of `ALERT` (`pending`, `firing`), or `None` when inactive.
    async fn alert_state(&self) -> Option<String> {
        let body: serde_json::Value = reqwest::get(format!("{}/api/v1/alerts", self.url))
            .await
            .ok()?
            .json()
            .await
            .ok()?;
        body["data"]["alerts"]
            .as_array()?
            .iter()
            .find(|a| a["labels"]["alertname"] == ALERT)
            .and_then(|a| a["state"].as_str().map(String::from))
    }

    /// True once Prometheus has scraped the relay at least once.
    async fn target_up(&self) -> bool {
        let url = format!("{}/api/v1/query?query=up", self.url);
        let Ok(r) = reqwest::get(url).await else {
            return false;
        };
        let Ok(body) = r.json::<serde_json::Value>().await else {
            return false;
        };
        body["data"]["result"]
            .as_array()
            .is_some_and(|r| r.iter().any(|s| s["value"][1] == "1"))
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_fires_the_broker_down_alert_and_resolves_it() {
    let broker = FaultProxy::start("127.0.0.1:5672".parse().unwrap()).await;
    let app = spawn_app_with(Options::default().env("AMQP__URI", broker.amqp_uri())).await;
    let admin = app.admin_url.trim_start_matches("http://").to_string();
    let prometheus = Prometheus::start(&admin);
    assert!(
        eventually(Duration::from_secs(30), || prometheus.target_up()).await,
        "Prometheus scrapes the relay"
    );
    assert_eq!(
        prometheus.alert_state().await,
        None,
        "no alert while connected"
    );

    broker.cut();
    let cut_at = Instant::now();
    assert!(
        eventually(Duration::from_secs(15), || async {
            prometheus.alert_state().await.as_deref() == Some("pending")
        })
        .await,
        "the alert goes pending once the gauge reads 0"
    );
    assert!(
        eventually(ALERT_FOR + Duration::from_secs(30), || async {
            prometheus.alert_state().await.as_deref() == Some("firing")
        })
        .await,
        "the alert fires after its for: clause"
    );
    let fired_after = cut_at.elapsed();
    assert!(fired_after >= ALERT_FOR, "fired after {fired_after:?}");

    broker.restore();
    assert!(
        eventually(Duration::from_secs(30), || async {
            prometheus.alert_state().await.is_none()
        })
        .await,
        "the alert resolves once the broker is back"
    );
    eprintln!("{ALERT}: fired {fired_after:?} after the cut, resolved after the restore");
}
