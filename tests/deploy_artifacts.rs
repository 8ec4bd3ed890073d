//! The deployment artefacts under `deploy/` agree with the relay they deploy:
//! probes hit the admin listener's real port and paths, grace periods outlast
//! `shutdown.grace_secs`, every `SENDTALK_RELAY__*` variable names a real
//! configuration key, the Kubernetes configuration file loads, and every
//! metric a dashboard or an alert queries is one the relay exports.
//!
//! The replicated set-ups (`compose.ha.yaml`, the `kubernetes-ha` overlay)
//! point the relay at every RabbitMQ node, every sentinel (or cluster seeds)
//! and a quorum queue, with topologies that agree with that: node names,
//! sentinel quorum, the shared Erlang cookie, the same start scripts in
//! compose and Kubernetes, every Secret key present in the template.
//!
//! No network and no running services: files are parsed and compared with
//! `sendtalk_relay::config` and `sendtalk_relay::metrics`. The external
//! checkers (promtool, yamllint, hadolint, systemd-analyze...) run from
//! `scripts/check-deploy`.

#![allow(clippy::unwrap_used)] // helpers outside #[test] fns panic on purpose

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use sendtalk_relay::config::{
    default_keys, DedupBackend, DedupStore, RedisMode, RedisSettings, RedisUrl, Settings, SinkKind,
    CONFIG_FILE_ENV,
};
use sendtalk_relay::metrics::Metrics;
use serde::Deserialize as _;
use serde_json::Value;

const ENV_PREFIX: &str = "SENDTALK_RELAY__";

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy")
}

fn read(relative: &str) -> String {
    let path = deploy_dir().join(relative);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

/// Every YAML document of a file, as JSON values (multi-document files too).
fn yaml_documents(relative: &str) -> Vec<Value> {
    let text = read(relative);
    serde_norway::Deserializer::from_str(&text)
        .map(|doc| {
            Value::deserialize(doc).unwrap_or_else(|e| panic!("{relative} is not valid YAML: {e}"))
        })
        .filter(|doc| !doc.is_null())
        .collect()
}

/// Every `.yaml` / `.yml` file under `deploy/`, relative to it.
fn yaml_files() -> Vec<String> {
    fn walk(dir: &Path, base: &Path, out: &mut Vec<String>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(&path, base, out);
            } else if path.extension().is_some_and(|e| e == "yaml" || e == "yml") {
                out.push(
                    path.strip_prefix(base)
                        .unwrap()
                        .to_string_lossy()
                        .into_owned(),
                );
            }
        }
    }
    let mut out = Vec::new();
    walk(&deploy_dir(), &deploy_dir(), &mut out);
    out.sort();
    out
}

/// Every Kubernetes object in `deploy/kubernetes/`.
fn kubernetes_objects() -> Vec<Value> {
    yaml_files()
        .iter()
        .filter(|f| f.starts_with("kubernetes/"))
        .flat_map(|f| yaml_documents(f))
        .filter(|doc| doc["kind"] != "Kustomization")
        .collect()
}

fn object(kind: &str) -> Value {
    let mut found: Vec<Value> = kubernetes_objects()
        .into_iter()
        .filter(|o| o["kind"] == kind)
        .collect();
    assert_eq!(
        found.len(),
        1,
        "expected exactly one {kind} in deploy/kubernetes"
    );
    found.remove(0)
}

fn relay_container() -> Value {
    let deployment = object("Deployment");
    let containers = deployment["spec"]["template"]["spec"]["containers"]
        .as_array()
        .expect("Deployment has containers")
        .clone();
    containers
        .into_iter()
        .find(|c| c["name"] == "relay")
        .expect("Deployment has a container named relay")
}

fn container_env(container: &Value) -> BTreeMap<String, Value> {
    container["env"]
        .as_array()
        .map(|env| {
            env.iter()
                .map(|e| (e["name"].as_str().unwrap().to_string(), e.clone()))
                .collect()
        })
        .unwrap_or_default()
}

fn compose() -> Value {
    yaml_documents("compose.yaml").remove(0)
}

/// A compose `environment`, given as a map or as a `KEY=value` list.
fn compose_env(service: &Value) -> BTreeMap<String, String> {
    match &service["environment"] {
        Value::Object(map) => map
            .iter()
            .map(|(k, v)| {
                let v = v.as_str().map_or_else(|| v.to_string(), String::from);
                (k.clone(), v)
            })
            .collect(),
        Value::Array(list) => list
            .iter()
            .filter_map(Value::as_str)
            .map(|s| {
                let (k, v) = s.split_once('=').unwrap_or((s, ""));
                (k.to_string(), v.to_string())
            })
            .collect(),
        _ => BTreeMap::new(),
    }
}

/// The relay's settings as compose's `SENDTALK_RELAY__*` variables make them,
/// with compose interpolation (`${VAR:?msg}`, `${VAR:-default}`) resolved.
fn compose_relay_settings(env: &BTreeMap<String, String>) -> Settings {
    let vars: Vec<(String, String)> = env
        .iter()
        .filter(|(k, _)| k.starts_with(ENV_PREFIX))
        .map(|(k, v)| {
            let v = match k.as_str() {
                _ if !v.contains("${") => v.clone(),
                "SENDTALK_RELAY__AUTH__SECRETS" => "a-secret".into(),
                _ => v.replace("${RABBITMQ_PASSWORD:-sendtalk}", "sendtalk"),
            };
            (k.clone(), v)
        })
        .collect();
    Settings::load(None, vars).unwrap_or_else(|e| panic!("compose relay env: {e}"))
}

fn systemd_unit() -> String {
    read("systemd/sendtalk-relay.service")
}

/// `Key=value` settings of the unit (comments skipped; repeated keys kept).
fn systemd_settings(key: &str) -> Vec<String> {
    systemd_unit()
        .lines()
        .map(str::trim)
        .filter(|l| !l.starts_with('#') && !l.starts_with(';'))
        .filter_map(|l| l.strip_prefix(key).and_then(|rest| rest.strip_prefix('=')))
        .map(String::from)
        .collect()
}

/// The variables set by systemd `Environment=` lines (`A=1 "B=2 3"`).
fn systemd_env() -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for line in systemd_settings("Environment") {
        let mut rest = line.as_str();
        while !rest.trim_start().is_empty() {
            rest = rest.trim_start();
            let (assignment, tail) = if let Some(quoted) = rest.strip_prefix('"') {
                let end = quoted.find('"').expect("closing quote in Environment=");
                (&quoted[..end], &quoted[end + 1..])
            } else {
                let end = rest.find(char::is_whitespace).unwrap_or(rest.len());
                (&rest[..end], &rest[end..])
            };
            let (k, v) = assignment
                .split_once('=')
                .expect("Environment= takes KEY=value");
            out.insert(k.to_string(), v.to_string());
            rest = tail;
        }
    }
    out
}

/// `ENV KEY=value` lines of the Dockerfile.
fn dockerfile_env() -> BTreeMap<String, String> {
    read("Dockerfile")
        .lines()
        .filter_map(|l| l.trim().strip_prefix("ENV "))
        .flat_map(|rest| {
            rest.split_whitespace()
                .map(String::from)
                .collect::<Vec<_>>()
        })
        .filter_map(|a| {
            a.split_once('=')
                .map(|(k, v)| (k.to_string(), v.to_string()))
        })
        .collect()
}

/// The default of a configuration key, as its TOML value.
fn default_of(key: &str) -> toml::Value {
    let keys = default_keys();
    let text = keys
        .get(key)
        .unwrap_or_else(|| panic!("`{key}` is not a configuration key"));
    let doc: toml::Table = format!("v = {text}").parse().unwrap();
    doc["v"].clone()
}

fn default_admin_listen() -> SocketAddr {
    default_of("admin.listen")
        .as_str()
        .unwrap()
        .parse()
        .unwrap()
}

fn default_grace_secs() -> u64 {
    u64::try_from(default_of("shutdown.grace_secs").as_integer().unwrap()).unwrap()
}

/// The ConfigMap's relay.toml loaded by the relay's own loader; the secret
/// it leaves to a mounted file is supplied here.
fn configmap_settings() -> Settings {
    let configmap = object("ConfigMap");
    let toml = configmap["data"]["relay.toml"]
        .as_str()
        .expect("ConfigMap has data.relay.toml");
    let path = std::env::temp_dir().join(format!(
        "sendtalk-relay-configmap-{}.toml",
        uuid::Uuid::new_v4().simple()
    ));
    std::fs::write(&path, toml).unwrap();
    let loaded = Settings::load(
        Some(&path),
        [("SENDTALK_RELAY__AUTH__SECRETS".to_string(), "x".to_string())],
    );
    let _ = std::fs::remove_file(&path);
    loaded.unwrap_or_else(|e| panic!("the ConfigMap's relay.toml does not load: {e}"))
}

/// The effective grace: the ConfigMap may raise it above the default.
fn grace_secs() -> u64 {
    default_grace_secs().max(configmap_settings().shutdown.grace.as_secs())
}

/// A container port given by number or by name.
fn resolve_port(container: &Value, port: &Value) -> u64 {
    if let Some(n) = port.as_u64() {
        return n;
    }
    let name = port.as_str().expect("a port is a number or a name");
    container["ports"]
        .as_array()
        .and_then(|ports| ports.iter().find(|p| p["name"] == name))
        .and_then(|p| p["containerPort"].as_u64())
        .unwrap_or_else(|| panic!("no container port named {name}"))
}

/// Seconds of a compose duration (`35s`, `1m30s`, `2m`).
fn compose_duration_secs(text: &str) -> u64 {
    let mut total = 0;
    let mut number = String::new();
    for c in text.chars() {
        match c {
            '0'..='9' => number.push(c),
            'h' | 'm' | 's' => {
                let n: u64 = number.parse().unwrap();
                total += n * match c {
                    'h' => 3600,
                    'm' => 60,
                    _ => 1,
                };
                number.clear();
            }
            other => panic!("unexpected {other:?} in duration {text}"),
        }
    }
    assert!(number.is_empty(), "duration {text} lacks a unit");
    total
}

/// Every `sendtalk_relay_[a-z_]+` name in `text`.
fn queried_metrics(text: &str) -> BTreeSet<String> {
    const PREFIX: &str = "sendtalk_relay_";
    let mut out = BTreeSet::new();
    let mut rest = text;
    while let Some(at) = rest.find(PREFIX) {
        let tail = &rest[at + PREFIX.len()..];
        let len = tail
            .find(|c: char| !(c.is_ascii_lowercase() || c == '_'))
            .unwrap_or(tail.len());
        if len > 0 {
            out.insert(format!("{PREFIX}{}", &tail[..len]));
        }
        rest = &tail[len..];
    }
    out
}

/// The values an `outcome` matcher names (`outcome="x"`, `outcome=~"x|y"`).
fn queried_outcomes(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for (at, _) in text.match_indices("outcome=") {
        let rest = &text[at + "outcome=".len()..];
        let rest = rest.strip_prefix('~').unwrap_or(rest);
        let rest = rest.trim_start_matches('\\');
        let Some(rest) = rest.strip_prefix('"') else {
            continue;
        };
        let end = rest.find(['"', '\\']).unwrap_or(rest.len());
        out.extend(rest[..end].split('|').map(String::from));
    }
    out
}

/// Sample names (histograms with their `_bucket`, `_sum`, `_count`) and the
/// exposition text of a fresh registry.
fn exported() -> (BTreeSet<String>, String) {
    let text = Metrics::new().render();
    let names = text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| {
            let end = l.find(['{', ' ']).unwrap_or(l.len());
            l[..end].to_string()
        })
        .collect();
    (names, text)
}

/// `(where, text)` of every file whose queries must use exported metrics.
fn monitoring_files() -> Vec<(&'static str, String)> {
    [
        "grafana/sendtalk-relay.json",
        "prometheus/alerts.yml",
        "prometheus/alerts_test.yml",
    ]
    .into_iter()
    .map(|f| (f, read(f)))
    .collect()
}

#[test]
fn every_yaml_manifest_parses_and_every_kubernetes_object_is_named() {
    let files = yaml_files();
    for expected in [
        "compose.yaml",
        "kubernetes/deployment.yaml",
        "kubernetes/configmap.yaml",
        "prometheus/alerts.yml",
    ] {
        assert!(
            files.iter().any(|f| f == expected),
            "deploy/{expected} is missing"
        );
    }
    for file in &files {
        assert!(!yaml_documents(file).is_empty(), "{file} is empty");
    }
    let kinds: BTreeSet<String> = kubernetes_objects()
        .iter()
        .map(|o| {
            assert!(
                o["apiVersion"].is_string(),
                "object without apiVersion: {o}"
            );
            assert!(
                o["metadata"]["name"].is_string(),
                "object without a name: {o}"
            );
            o["kind"].as_str().unwrap().to_string()
        })
        .collect();
    for kind in [
        "Deployment",
        "Service",
        "ConfigMap",
        "Secret",
        "PodDisruptionBudget",
        "HorizontalPodAutoscaler",
        "ServiceMonitor",
    ] {
        assert!(kinds.contains(kind), "deploy/kubernetes has no {kind}");
    }
    serde_json::from_str::<Value>(&read("grafana/sendtalk-relay.json"))
        .expect("the Grafana dashboard is valid JSON");
}

#[test]
fn kubernetes_probes_use_the_admin_listener_port_and_paths() {
    let admin = default_admin_listen();
    assert_eq!(
        admin.port(),
        9090,
        "admin.listen default changed: update deploy/"
    );
    let container = relay_container();
    let probe = |name: &str| -> (String, u64) {
        let get = &container[name]["httpGet"];
        assert!(get.is_object(), "{name} must be an httpGet probe");
        (
            get["path"].as_str().unwrap().to_string(),
            resolve_port(&container, &get["port"]),
        )
    };
    assert_eq!(
        probe("livenessProbe"),
        ("/healthz".into(), u64::from(admin.port()))
    );
    assert_eq!(
        probe("readinessProbe"),
        ("/readyz".into(), u64::from(admin.port()))
    );
    if container["startupProbe"].is_object() {
        assert_eq!(
            probe("startupProbe"),
            ("/healthz".into(), u64::from(admin.port()))
        );
    }
    // The kubelet probes the pod IP: the admin listener must not be loopback.
    let settings = configmap_settings();
    assert_eq!(settings.admin.listen.port(), admin.port());
    assert!(
        settings.admin.listen.ip().is_unspecified(),
        "admin.listen in the ConfigMap must be 0.0.0.0 for the probes, got {}",
        settings.admin.listen
    );
    let http = resolve_port(&container, &Value::from("http"));
    assert_eq!(http, u64::from(settings.http.listen.port()));
}

#[test]
fn container_healthchecks_run_the_relays_own_healthcheck() {
    // SPEC 8: the probe reads admin.listen from the container's own
    // configuration, so moving the admin port cannot break it.
    let dockerfile = read("Dockerfile");
    let healthcheck = dockerfile
        .split("HEALTHCHECK")
        .nth(1)
        .expect("the Dockerfile has a HEALTHCHECK")
        .split("\nENTRYPOINT")
        .next()
        .unwrap();
    assert!(
        healthcheck.contains(r#"CMD ["/usr/local/bin/sendtalk-relay", "healthcheck"]"#),
        "{healthcheck}"
    );
    assert!(
        !healthcheck.contains("/dev/tcp"),
        "no port hard-wired: {healthcheck}"
    );
    assert!(dockerfile.contains("EXPOSE 8080 9090"));
    assert!(dockerfile.contains("VOLUME [\"/var/lib/sendtalk-relay\"]"));

    let compose = compose();
    let relay = &compose["services"]["relay"];
    let test = relay["healthcheck"]["test"].to_string();
    assert_eq!(test, r#"["CMD","sendtalk-relay","healthcheck"]"#);
}

#[test]
fn termination_grace_outlasts_the_relay_shutdown_grace() {
    let grace = grace_secs();
    let deployment = object("Deployment");
    let pod = &deployment["spec"]["template"]["spec"];
    let termination = pod["terminationGracePeriodSeconds"]
        .as_u64()
        .expect("terminationGracePeriodSeconds is set");
    // A preStop sleep runs before SIGTERM and counts against the same budget.
    let pre_stop = relay_container()["lifecycle"]["preStop"]["exec"]["command"]
        .as_array()
        .and_then(|c| match c.as_slice() {
            [cmd, secs] if cmd == "sleep" => secs.as_str().and_then(|s| s.parse::<u64>().ok()),
            _ => None,
        })
        .unwrap_or(0);
    assert!(
        termination > grace + pre_stop,
        "terminationGracePeriodSeconds {termination} must exceed preStop {pre_stop} + shutdown.grace_secs {grace}"
    );

    let compose = compose();
    let stop = compose["services"]["relay"]["stop_grace_period"]
        .as_str()
        .expect("compose relay sets stop_grace_period (Docker's default is 10 s)");
    assert!(
        compose_duration_secs(stop) > grace,
        "stop_grace_period {stop} <= {grace}s"
    );

    let timeout = systemd_settings("TimeoutStopSec");
    let [timeout] = timeout.as_slice() else {
        panic!("the unit sets TimeoutStopSec once");
    };
    let secs: u64 = timeout.trim_end_matches('s').parse().unwrap();
    assert!(
        secs > grace,
        "TimeoutStopSec {secs} <= shutdown.grace_secs {grace}"
    );
    assert_eq!(systemd_settings("KillSignal"), ["SIGTERM"]);
}

#[test]
fn every_relay_environment_variable_names_a_real_config_key() {
    let keys = default_keys();
    let mut named: Vec<(String, String)> = Vec::new();
    for name in container_env(&relay_container()).keys() {
        named.push(("kubernetes/deployment.yaml".into(), name.clone()));
    }
    let compose = compose();
    for (service, definition) in compose["services"].as_object().unwrap() {
        for name in compose_env(definition).keys() {
            named.push((format!("compose.yaml service {service}"), name.clone()));
        }
    }
    for (service, definition) in compose_ha()["services"].as_object().unwrap() {
        for name in compose_env(definition).keys() {
            named.push((format!("compose.ha.yaml service {service}"), name.clone()));
        }
    }
    let patch = yaml_documents("kubernetes-ha/relay-deployment.yaml").remove(0);
    for container in patch["spec"]["template"]["spec"]["containers"]
        .as_array()
        .unwrap()
    {
        for name in container_env(container).keys() {
            named.push(("kubernetes-ha/relay-deployment.yaml".into(), name.clone()));
        }
    }
    for name in systemd_env().keys() {
        named.push(("systemd/sendtalk-relay.service".into(), name.clone()));
    }
    for name in dockerfile_env().keys() {
        named.push(("Dockerfile".into(), name.clone()));
    }
    let relay_vars: Vec<_> = named
        .iter()
        .filter(|(_, name)| name.starts_with(ENV_PREFIX))
        .collect();
    assert!(
        relay_vars.len() >= 10,
        "too few SENDTALK_RELAY__ variables found: {relay_vars:?}"
    );
    for (place, name) in relay_vars {
        let key = name[ENV_PREFIX.len()..]
            .to_ascii_lowercase()
            .replace("__", ".");
        assert!(
            keys.contains_key(&key),
            "{place}: {name} maps to `{key}`, which is not a configuration key"
        );
    }
    // The only other relay variable is the file name; a typo of it would be
    // silently ignored.
    for (place, name) in &named {
        if name.starts_with("SENDTALK_RELAY") && !name.starts_with(ENV_PREFIX) {
            assert_eq!(name, CONFIG_FILE_ENV, "{place}: unknown variable {name}");
        }
    }
}

#[test]
fn compose_configures_a_complete_relay_through_the_environment_only() {
    let compose = compose();
    let services = compose["services"].as_object().unwrap();
    let relay = &services["relay"];
    assert!(relay["volumes"]
        .to_string()
        .contains("/var/lib/sendtalk-relay"));
    assert!(relay["command"].is_null() || !relay["command"].to_string().contains("--config"));
    let env = compose_env(relay);
    assert!(
        !env.contains_key(CONFIG_FILE_ENV),
        "compose configures the relay by environment only"
    );
    // No file means embedded defaults (stdout, memory, loopback): each must be
    // overridden, and the result must load.
    assert!(
        env["SENDTALK_RELAY__AUTH__SECRETS"].starts_with("${SENDTALK_WEBHOOK_SECRET"),
        "the secret comes from the caller's environment"
    );
    let settings = compose_relay_settings(&env);
    assert_eq!(settings.sink, SinkKind::Amqp);
    assert_eq!(settings.dedup.backend(), DedupBackend::Redis);
    assert!(settings.http.listen.ip().is_unspecified());
    assert!(settings.admin.listen.ip().is_unspecified());
    assert!(!settings.using_dev_secret);

    for (name, service) in services {
        if let Some(deps) = service["depends_on"].as_object() {
            for (dep, how) in deps {
                assert_eq!(how["condition"], "service_healthy", "{name} -> {dep}");
                assert!(
                    services[dep]["healthcheck"]["test"].is_array(),
                    "{dep} needs a healthcheck for {name} to wait on"
                );
            }
        }
    }
    assert!(services["relay"]["depends_on"]["redis"].is_object());
    assert!(services["relay"]["depends_on"]["rabbitmq"].is_object());
    let redis = services["redis"]["command"].to_string();
    assert!(
        redis.contains("--appendonly") && redis.contains("yes"),
        "{redis}"
    );
    assert!(services["rabbitmq"]["image"]
        .as_str()
        .unwrap()
        .starts_with("rabbitmq:3-management"));
    assert!(
        services["consumer"].is_object(),
        "compose runs the example consumer"
    );
}

#[test]
fn compose_simulator_delivers_to_the_relay_webhook_with_its_mode_and_secret() {
    let compose = compose();
    let services = compose["services"].as_object().unwrap();
    let sim = compose_env(&services["sim"]);
    let relay = compose_env(&services["relay"]);
    let settings = compose_relay_settings(&relay);

    let url = format!(
        "http://relay:{}{}",
        settings.http.listen.port(),
        settings.http.webhook_path
    );
    assert_eq!(sim["SENDTALK_SIM_WEBHOOK_URL"], url);
    assert_eq!(
        sim["SENDTALK_SIM_SECRET"], relay["SENDTALK_RELAY__AUTH__SECRETS"],
        "the simulator signs with the relay's (single) secret"
    );
    let mode = sim
        .get("SENDTALK_SIM_AUTH_MODE")
        .map_or("secret-header", String::as_str);
    assert_eq!(
        mode,
        settings.auth.mode.as_str(),
        "simulator and relay auth mode"
    );
    // The simulator's header defaults per mode as the relay's does.
    let header = sim.get("SENDTALK_SIM_HEADER").map_or(
        match mode {
            "hmac-sha256" => "X-SendTalk-Signature",
            _ => "X-Secret-Key",
        },
        String::as_str,
    );
    assert!(
        header.eq_ignore_ascii_case(settings.auth.header()),
        "{header}"
    );
    assert!(
        services["sim"]["healthcheck"]["test"]
            .to_string()
            .contains("/dev/tcp/127.0.0.1/8099"),
        "the sim health check probes its own port"
    );
}

#[test]
fn configmap_relay_toml_loads_and_matches_the_pod_layout() {
    let settings = configmap_settings();
    assert_eq!(settings.sink, SinkKind::Amqp);
    assert_eq!(
        settings.dedup.backend(),
        DedupBackend::Redis,
        "replicas must share dedup"
    );
    assert!(settings.http.listen.ip().is_unspecified());

    let container = relay_container();
    let env = container_env(&container);
    let mounts = container["volumeMounts"].as_array().unwrap();
    let mount_of = |path: &str| {
        mounts
            .iter()
            .filter(|m| path.starts_with(m["mountPath"].as_str().unwrap()))
            .max_by_key(|m| m["mountPath"].as_str().unwrap().len())
            .unwrap_or_else(|| panic!("{path} is not on a mounted volume"))
            .clone()
    };
    let volumes = object("Deployment")["spec"]["template"]["spec"]["volumes"].clone();
    let volume = |name: &Value| {
        volumes
            .as_array()
            .unwrap()
            .iter()
            .find(|v| &v["name"] == name)
            .unwrap()
            .clone()
    };

    // SENDTALK_RELAY_CONFIG names the mounted ConfigMap file.
    let config_path = env[CONFIG_FILE_ENV]["value"].as_str().unwrap();
    let mount = mount_of(config_path);
    assert_eq!(mount["mountPath"], config_path);
    assert_eq!(mount["subPath"], "relay.toml");
    assert_eq!(
        volume(&mount["name"])["configMap"]["name"],
        object("ConfigMap")["metadata"]["name"]
    );

    // The spool is on the emptyDir, as is the image's SENDTALK_RELAY__SPOOL__DIR
    // (which wins over the file).
    let spool = settings.spool.dir.to_string_lossy().into_owned();
    assert_eq!(dockerfile_env()["SENDTALK_RELAY__SPOOL__DIR"], spool);
    assert!(volume(&mount_of(&spool)["name"])["emptyDir"].is_object());

    // Each secret file is a key of the mounted Secret.
    let files = env["SENDTALK_RELAY__AUTH__SECRET_FILES"]["value"]
        .as_str()
        .unwrap();
    let secret = object("Secret");
    for file in files.split(',') {
        let mount = mount_of(file);
        let source = volume(&mount["name"]);
        assert_eq!(source["secret"]["secretName"], secret["metadata"]["name"]);
        let item = file[mount["mountPath"].as_str().unwrap().len()..].trim_start_matches('/');
        let key = source["secret"]["items"]
            .as_array()
            .and_then(|items| items.iter().find(|i| i["path"] == item))
            .map_or(item, |i| i["key"].as_str().unwrap());
        assert!(
            secret["stringData"][key].is_string(),
            "Secret has no key {key}"
        );
    }
    for (name, value) in &env {
        if let Some(key) = value["valueFrom"]["secretKeyRef"]["key"].as_str() {
            assert!(
                secret["stringData"][key].is_string(),
                "{name}: Secret has no key {key}"
            );
        }
    }
}

#[test]
fn kubernetes_security_and_resources_follow_the_operations_contract() {
    let deployment = object("Deployment");
    assert_eq!(deployment["spec"]["replicas"], 3);
    let pod = &deployment["spec"]["template"]["spec"];
    let container = relay_container();
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    assert_eq!(container["securityContext"]["readOnlyRootFilesystem"], true);
    assert_eq!(container["resources"]["requests"]["memory"], "32Mi");
    assert_eq!(container["resources"]["requests"]["cpu"], "100m");
    assert_eq!(container["resources"]["limits"]["memory"], "128Mi");

    let selector = &deployment["spec"]["selector"]["matchLabels"];
    let pod_labels = &deployment["spec"]["template"]["metadata"]["labels"];
    for (k, v) in selector.as_object().unwrap() {
        assert_eq!(&pod_labels[k], v, "pod template lacks selector label {k}");
    }
    assert_eq!(
        &object("PodDisruptionBudget")["spec"]["selector"]["matchLabels"],
        selector
    );
    let hpa = object("HorizontalPodAutoscaler");
    assert_eq!(hpa["apiVersion"], "autoscaling/v2");
    assert_eq!(
        hpa["spec"]["scaleTargetRef"]["name"],
        deployment["metadata"]["name"]
    );
    assert_eq!(hpa["spec"]["metrics"][0]["resource"]["name"], "cpu");
}

#[test]
fn servicemonitor_scrapes_metrics_on_the_admin_port() {
    let monitor = object("ServiceMonitor");
    assert_eq!(monitor["apiVersion"], "monitoring.coreos.com/v1");
    let container = relay_container();
    let pod_labels = object("Deployment")["spec"]["template"]["metadata"]["labels"].clone();
    let selector = monitor["spec"]["selector"]["matchLabels"]
        .as_object()
        .unwrap()
        .clone();
    let services: Vec<Value> = kubernetes_objects()
        .into_iter()
        .filter(|o| o["kind"] == "Service")
        .filter(|s| {
            selector
                .iter()
                .all(|(k, v)| &s["metadata"]["labels"][k] == v)
        })
        .collect();
    assert_eq!(
        services.len(),
        1,
        "the ServiceMonitor selects exactly one Service"
    );
    let service = &services[0];
    for (k, v) in service["spec"]["selector"].as_object().unwrap() {
        assert_eq!(
            &pod_labels[k], v,
            "the Service does not select the relay pods"
        );
    }
    for endpoint in monitor["spec"]["endpoints"].as_array().unwrap() {
        assert_eq!(endpoint["path"], "/metrics");
        let port = service["spec"]["ports"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == endpoint["port"])
            .expect("the endpoint names a Service port");
        assert_eq!(
            resolve_port(&container, &port["targetPort"]),
            u64::from(default_admin_listen().port())
        );
    }
}

#[test]
fn systemd_unit_keeps_the_spool_in_its_state_directory() {
    assert_eq!(systemd_settings("DynamicUser"), ["yes"]);
    let state = systemd_settings("StateDirectory");
    assert_eq!(state, ["sendtalk-relay"]);
    let env = systemd_env();
    assert!(env["SENDTALK_RELAY__SPOOL__DIR"].starts_with("/var/lib/sendtalk-relay/"));
    // The credential named by auth.secret_files is the one LoadCredential loads.
    let credential = systemd_settings("LoadCredential");
    let [credential] = credential.as_slice() else {
        panic!("one LoadCredential");
    };
    let id = credential.split(':').next().unwrap();
    assert_eq!(
        env["SENDTALK_RELAY__AUTH__SECRET_FILES"],
        format!("%d/{id}")
    );
    let exec = systemd_settings("ExecStart");
    assert_eq!(
        exec,
        ["/usr/local/bin/sendtalk-relay --config /etc/sendtalk-relay/relay.toml"]
    );
}

#[test]
fn every_metric_queried_by_dashboards_and_alerts_is_exported() {
    let (names, text) = exported();
    let mut checked = 0;
    for (file, content) in monitoring_files() {
        let queried = queried_metrics(&content);
        assert!(!queried.is_empty(), "{file} queries no relay metric");
        for name in &queried {
            assert!(
                names.contains(name),
                "{file} queries {name}, which the relay does not export; it exports {names:?}"
            );
            checked += 1;
        }
        for outcome in queried_outcomes(&content) {
            assert!(
                text.contains(&format!("outcome=\"{outcome}\"")),
                "{file} matches outcome {outcome:?}, which webhooks_total never carries"
            );
        }
    }
    assert!(checked >= 20, "only {checked} metric references found");
    // Spot-check that the dashboard covers what operators look at.
    let dashboard = read("grafana/sendtalk-relay.json");
    for needed in [
        "sendtalk_relay_request_duration_seconds_bucket",
        "sendtalk_relay_publish_duration_seconds_bucket",
        "sendtalk_relay_spool_depth",
        "sendtalk_relay_spool_bytes",
        "sendtalk_relay_amqp_connected",
        "sendtalk_relay_redis_connected",
        "outcome=\\\"duplicate\\\"",
    ] {
        assert!(
            dashboard.contains(needed),
            "the dashboard does not show {needed}"
        );
    }
}

#[test]
fn spool_near_full_threshold_follows_the_default_spool_max_bytes() {
    let max_bytes = default_of("spool.max_bytes").as_integer().unwrap();
    let alerts = yaml_documents("prometheus/alerts.yml").remove(0);
    let rule = alerts["groups"][0]["rules"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["alert"] == "SendtalkRelaySpoolNearFull")
        .expect("a SendtalkRelaySpoolNearFull alert")
        .clone();
    let expr = rule["expr"].as_str().unwrap();
    assert!(
        expr.contains(&format!("0.8 * {max_bytes}")),
        "{expr} must compare with 0.8 * spool.max_bytes ({max_bytes})"
    );
    assert_eq!(
        configmap_settings().spool.max_bytes,
        u64::try_from(max_bytes).unwrap(),
        "the ConfigMap changes spool.max_bytes: update the alert threshold"
    );
}

// ---- the replicated back-ends: deploy/compose.ha.yaml, deploy/kubernetes-ha ----

fn compose_ha() -> Value {
    yaml_documents("compose.ha.yaml").remove(0)
}

/// Compose interpolation as `docker compose` does it with nothing exported:
/// `$$` is a literal `$`, `${VAR:-default}` its default, and a required
/// `${VAR:?message}` a placeholder (a secret the caller supplies).
fn interpolate(text: &str) -> String {
    let mut out = String::new();
    let mut rest = text;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        let tail = &rest[at..];
        if let Some(after) = tail.strip_prefix("$$") {
            out.push('$');
            rest = after;
        } else if let Some(inner) = tail.strip_prefix("${") {
            let end = inner.find('}').expect("closing brace of ${...}");
            let expr = &inner[..end];
            if let Some((_, default)) = expr.split_once(":-") {
                out.push_str(default);
            } else if let Some((name, _)) = expr.split_once(":?") {
                out.push_str("placeholder-");
                out.push_str(&name.to_ascii_lowercase());
            } else {
                panic!("${{{expr}}} has no default: `docker compose` would use an empty string");
            }
            rest = &inner[end + 1..];
        } else {
            panic!("bare $ in {text:?}: escape it as $$");
        }
    }
    out.push_str(rest);
    out
}

/// A service's `environment` with compose interpolation resolved.
fn compose_env_resolved(service: &Value) -> BTreeMap<String, String> {
    compose_env(service)
        .into_iter()
        .map(|(k, v)| (k, interpolate(&v)))
        .collect()
}

/// Settings loaded the way the relay does it: an optional file, then the
/// environment's `SENDTALK_RELAY__*` variables.
fn load_settings(toml: Option<&str>, env: &BTreeMap<String, String>) -> Settings {
    let vars: Vec<(String, String)> = env
        .iter()
        .filter(|(k, _)| k.starts_with(ENV_PREFIX))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let Some(toml) = toml else {
        return Settings::load(None, vars).unwrap_or_else(|e| panic!("{e}"));
    };
    let path = std::env::temp_dir().join(format!(
        "sendtalk-relay-deploy-{}.toml",
        uuid::Uuid::new_v4().simple()
    ));
    std::fs::write(&path, toml).unwrap();
    let loaded = Settings::load(Some(&path), vars);
    let _ = std::fs::remove_file(&path);
    loaded.unwrap_or_else(|e| panic!("{e}"))
}

/// `amqp.uri`, each with its password redacted (host, port and user stay).
fn amqp_uris(settings: &Settings) -> Vec<String> {
    settings.amqp.uris.iter().map(ToString::to_string).collect()
}

/// `redis.mode`, the URLs it uses (`redis.url`, the seeds or the sentinels)
/// and `redis.sentinel_service` (empty outside sentinel mode).
fn redis_of(settings: &Settings) -> (RedisMode, Vec<String>, String) {
    let DedupStore::Redis(redis) = &settings.dedup.store else {
        panic!("dedup.backend is not redis");
    };
    let urls = |list: &[RedisUrl]| list.iter().map(|u| u.expose().to_string()).collect();
    match redis {
        RedisSettings::Standalone(url) => (
            RedisMode::Standalone,
            vec![url.expose().to_string()],
            String::new(),
        ),
        RedisSettings::Cluster(seeds) => (RedisMode::Cluster, urls(seeds), String::new()),
        RedisSettings::Sentinel { sentinels, service } => {
            (RedisMode::Sentinel, urls(sentinels), service.clone())
        }
    }
}

/// `host:port` of a `scheme://[user[:password]@]host:port[/path]` URL.
fn host_port(url: &str) -> String {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let rest = rest.rsplit_once('@').map_or(rest, |(_, r)| r);
    rest.split('/').next().unwrap().to_string()
}

fn services_of(compose: &Value) -> &serde_json::Map<String, Value> {
    compose["services"].as_object().unwrap()
}

fn profiles(service: &Value) -> Vec<String> {
    service["profiles"]
        .as_array()
        .map(|p| p.iter().map(|s| s.as_str().unwrap().to_string()).collect())
        .unwrap_or_default()
}

/// The compose services whose command runs `script` (a mounted config).
fn services_running(compose: &Value, script: &str) -> Vec<String> {
    services_of(compose)
        .iter()
        .filter(|(_, s)| s["command"].to_string().contains(script))
        .map(|(name, _)| name.clone())
        .collect()
}

/// The relay services of compose.ha.yaml with their settings (the mounted
/// config file and the environment).
fn compose_ha_relays() -> Vec<(String, Value, Settings)> {
    let compose = compose_ha();
    services_of(&compose)
        .iter()
        .filter(|(_, s)| s["image"] == "sendtalk-relay:local")
        .map(|(name, service)| {
            let env = compose_env_resolved(service);
            let file = env.get(CONFIG_FILE_ENV).map(|path| {
                let config = service["configs"]
                    .as_array()
                    .and_then(|c| c.iter().find(|c| c["target"] == path.as_str()))
                    .unwrap_or_else(|| {
                        panic!("{name}: {CONFIG_FILE_ENV}={path} is not a mounted config")
                    });
                let source = config["source"].as_str().unwrap();
                interpolate(compose["configs"][source]["content"].as_str().unwrap())
            });
            let settings = load_settings(file.as_deref(), &env);
            (name.clone(), service.clone(), settings)
        })
        .collect()
}

#[test]
fn ha_compose_relays_use_the_replicated_back_ends() {
    let compose = compose_ha();
    let services = services_of(&compose);
    let rabbitmq: Vec<&String> = services
        .iter()
        .filter(|(_, s)| s["image"].as_str().unwrap_or("").starts_with("rabbitmq:"))
        .map(|(n, _)| n)
        .collect();
    assert_eq!(rabbitmq.len(), 3, "a three-node RabbitMQ cluster");
    let sentinels = services_running(&compose, "sentinel-start.sh");
    let cluster_nodes: Vec<String> = services
        .iter()
        .filter(|(_, s)| s["command"].to_string().contains("--cluster-enabled yes"))
        .map(|(n, _)| n.clone())
        .collect();
    let base_relay = &base_compose_relay();
    let grace = grace_secs();

    let relays = compose_ha_relays();
    let mut modes = BTreeSet::new();
    for (name, service, settings) in &relays {
        assert_eq!(settings.sink, SinkKind::Amqp, "{name}");
        assert_eq!(settings.dedup.backend(), DedupBackend::Redis, "{name}");
        assert!(settings.http.listen.ip().is_unspecified(), "{name}");
        assert_eq!(settings.admin.listen.port(), default_admin_listen().port());
        assert!(!settings.using_dev_secret, "{name}");
        // Every RabbitMQ node, in order, and a replicated queue.
        let uris: Vec<String> = amqp_uris(settings).iter().map(|u| host_port(u)).collect();
        let nodes: Vec<String> = rabbitmq.iter().map(|n| format!("{n}:5672")).collect();
        assert_eq!(uris, nodes, "{name}: amqp.uri lists the cluster's nodes");
        assert!(
            settings.amqp.queues.iter().any(|q| q.quorum),
            "{name}: a quorum queue"
        );
        // The operational contract of the base file holds here too.
        assert_eq!(
            service["healthcheck"]["test"],
            base_relay["healthcheck"]["test"]
        );
        let stop = service["stop_grace_period"]
            .as_str()
            .expect("stop_grace_period");
        assert!(compose_duration_secs(stop) > grace, "{name}: {stop}");
        assert!(service["volumes"]
            .to_string()
            .contains("/var/lib/sendtalk-relay"));

        let profile = profiles(service);
        assert_eq!(profile.len(), 1, "{name} runs in exactly one profile");
        assert!(modes.insert(profile[0].clone()), "one relay per profile");
        let depends = service["depends_on"].as_object().expect("depends_on");
        for node in &rabbitmq {
            assert_eq!(
                depends[node.as_str()]["condition"],
                "service_healthy",
                "{name} -> {node}"
            );
        }
        let (mode, urls, service) = redis_of(settings);
        let urls: Vec<String> = urls.iter().map(|u| host_port(u)).collect();
        match mode {
            RedisMode::Sentinel => {
                assert_eq!(profile[0], "sentinel");
                let expected: Vec<String> =
                    sentinels.iter().map(|s| format!("{s}:26379")).collect();
                assert_eq!(urls, expected, "{name}: redis.urls lists every sentinel");
                for sentinel in &sentinels {
                    let env = compose_env_resolved(&services[sentinel]);
                    assert_eq!(env["MASTER_NAME"], service);
                    assert_eq!(depends[sentinel.as_str()]["condition"], "service_healthy");
                }
            }
            RedisMode::Cluster => {
                assert_eq!(profile[0], "cluster");
                assert!(!urls.is_empty());
                for url in &urls {
                    let (host, port) = url.split_once(':').unwrap();
                    assert!(
                        cluster_nodes.iter().any(|n| n == host),
                        "{name}: seed {url}"
                    );
                    assert_eq!(port, "6379");
                }
                assert_eq!(
                    depends["redis-cluster-init"]["condition"], "service_completed_successfully",
                    "{name} waits for the cluster to be created"
                );
            }
            RedisMode::Standalone => panic!("{name}: a replicated set-up, not standalone"),
        }
    }
    assert_eq!(
        modes,
        BTreeSet::from(["cluster".to_string(), "sentinel".to_string()])
    );

    // A service of a profile depends only on services that run with it.
    for (name, service) in services {
        let mine = profiles(service);
        for dep in service["depends_on"]
            .as_object()
            .into_iter()
            .flat_map(|d| d.keys())
        {
            let theirs = profiles(&services[dep]);
            assert!(
                theirs.is_empty() || theirs.iter().any(|p| mine.contains(p)),
                "{name} (profiles {mine:?}) depends on {dep} (profiles {theirs:?})"
            );
            let condition = &service["depends_on"][dep]["condition"];
            if condition == "service_healthy" {
                assert!(
                    services[dep]["healthcheck"]["test"].is_array(),
                    "{dep} needs a healthcheck"
                );
            }
        }
    }
}

/// The relay service of deploy/compose.yaml, the reference for the others.
fn base_compose_relay() -> Value {
    compose()["services"]["relay"].clone()
}

#[test]
fn ha_compose_rabbitmq_nodes_form_one_cluster_sharing_the_erlang_cookie() {
    let compose = compose_ha();
    let services = services_of(&compose);
    let nodes: Vec<(&String, &Value)> = services
        .iter()
        .filter(|(_, s)| s["image"].as_str().unwrap_or("").starts_with("rabbitmq:"))
        .collect();
    let mut conf_nodes = BTreeSet::new();
    for (name, service) in &nodes {
        assert!(profiles(service).is_empty(), "{name} runs in every profile");
        // classic_config names rabbit@<host name>: it must be fixed.
        assert_eq!(service["hostname"].as_str(), Some(name.as_str()));
        let configs = service["configs"].as_array().expect("configs");
        let conf = configs
            .iter()
            .find(|c| {
                c["target"]
                    .as_str()
                    .unwrap()
                    .starts_with("/etc/rabbitmq/conf.d/")
            })
            .expect("a conf.d file");
        let text = compose["configs"][conf["source"].as_str().unwrap()]["content"]
            .as_str()
            .unwrap();
        let settings: BTreeMap<&str, &str> = text
            .lines()
            .filter(|l| !l.trim_start().starts_with('#'))
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.trim(), v.trim()))
            .collect();
        assert_eq!(
            settings["cluster_formation.peer_discovery_backend"],
            "classic_config"
        );
        conf_nodes = settings
            .iter()
            .filter(|(k, _)| k.starts_with("cluster_formation.classic_config.nodes."))
            .map(|(_, v)| (*v).to_string())
            .collect();
        // The shared cookie: the secret, installed where Erlang reads it.
        assert_eq!(service["secrets"], serde_json::json!(["erlang-cookie"]));
        let entrypoint = service["entrypoint"].to_string();
        assert!(
            entrypoint.contains("/run/secrets/erlang-cookie /var/lib/rabbitmq/.erlang.cookie")
                && entrypoint.contains("-m 0400 -o rabbitmq"),
            "{name}: {entrypoint}"
        );
        assert_eq!(service["command"], serde_json::json!(["rabbitmq-server"]));
        assert!(service["volumes"]
            .to_string()
            .contains(":/var/lib/rabbitmq"));
    }
    let expected: BTreeSet<String> = nodes.iter().map(|(n, _)| format!("rabbit@{n}")).collect();
    assert_eq!(conf_nodes, expected, "classic_config lists every node");
    assert!(compose["secrets"]["erlang-cookie"]["environment"].is_string());

    // The example consumer reads the relay's quorum queue with the same
    // declaration (a classic redeclare would fail PRECONDITION_FAILED).
    let consumer = compose_env_resolved(&services["consumer"]);
    for (name, _, settings) in compose_ha_relays() {
        let queue = settings
            .amqp
            .queues
            .iter()
            .find(|q| q.name == consumer["QUEUE"])
            .unwrap_or_else(|| panic!("{name} declares no queue {}", consumer["QUEUE"]));
        assert!(queue.quorum);
        assert_eq!(consumer["QUEUE_TYPE"], "quorum");
        assert_eq!(consumer["BINDING"], queue.binding_key);
        assert_eq!(consumer["EXCHANGE"], settings.amqp.exchange.as_str());
    }
    let broker = host_port(&consumer["AMQP_URI"]);
    assert!(
        nodes.iter().any(|(n, _)| broker == format!("{n}:5672")),
        "{broker}"
    );
}

#[test]
fn ha_compose_redis_topologies_are_complete() {
    let compose = compose_ha();
    let services = services_of(&compose);
    // Sentinel: two data nodes, three sentinels, a majority quorum.
    let data = services_running(&compose, "redis-start.sh");
    let sentinels = services_running(&compose, "sentinel-start.sh");
    assert_eq!(data.len(), 2, "one master and one replica");
    assert_eq!(sentinels.len(), 3);
    for name in data.iter().chain(&sentinels) {
        let service = &services[name];
        assert_eq!(profiles(service), ["sentinel"], "{name}");
        assert_eq!(
            service["hostname"].as_str(),
            Some(name.as_str()),
            "{name} announces its name"
        );
        let env = compose_env_resolved(service);
        assert_eq!(env["SENTINELS"].split(' ').collect::<Vec<_>>(), sentinels);
        assert_eq!(env["DATA_NODES"].split(' ').collect::<Vec<_>>(), data);
        assert!(data.contains(&env["FIRST_MASTER"]));
        assert_eq!(env["REDIS_PASSWORD"], env["REDISCLI_AUTH"]);
        assert!(service["healthcheck"]["test"].is_array(), "{name}");
        if sentinels.contains(name) {
            let quorum: usize = env["QUORUM"].parse().unwrap();
            assert_eq!(
                quorum,
                sentinels.len() / 2 + 1,
                "a majority of the sentinels"
            );
            assert!(
                service["volumes"].to_string().contains(":/data"),
                "sentinel keeps its file"
            );
        }
    }
    // Cluster: six nodes (three masters, a replica each) joined by the
    // init job, which waits for all of them.
    let nodes: Vec<(&String, &Value)> = services
        .iter()
        .filter(|(_, s)| s["command"].to_string().contains("--cluster-enabled yes"))
        .collect();
    assert_eq!(nodes.len(), 6);
    let init = &services["redis-cluster-init"];
    let create = init["command"].to_string();
    assert!(create.contains("--cluster create") && create.contains("--cluster-replicas 1"));
    assert!(create.contains("for n in 1 2 3 4 5 6"), "{create}");
    for (name, service) in &nodes {
        assert_eq!(profiles(service), ["cluster"]);
        assert!(
            name.starts_with("redis-node-"),
            "{name}: the init job names redis-node-N"
        );
        assert_eq!(service["hostname"].as_str(), Some(name.as_str()));
        let command = service["command"].to_string();
        for needed in [
            // While one master fails over, the others keep their slots.
            "--cluster-require-full-coverage no",
            // Clients are redirected to names, not container addresses.
            "--cluster-preferred-endpoint-type hostname",
            "--masterauth",
            "--appendonly yes",
        ] {
            assert!(command.contains(needed), "{name}: {needed}");
        }
        assert_eq!(
            init["depends_on"][name.as_str()]["condition"],
            "service_healthy"
        );
    }
    assert_eq!(init["restart"], "no");
}

/// The objects of a file of deploy/kubernetes-ha.
fn ha_objects(file: &str) -> Vec<Value> {
    yaml_documents(&format!("kubernetes-ha/{file}"))
}

fn ha_object(file: &str, kind: &str, name: &str) -> Value {
    ha_objects(file)
        .into_iter()
        .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("kubernetes-ha/{file} has no {kind} {name}"))
}

/// `stringData` of a Secret of the HA template.
fn ha_secret(name: &str) -> Value {
    ha_object("secret.template.yaml", "Secret", name)["stringData"].clone()
}

fn env_value(container: &Value, name: &str) -> String {
    container["env"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == name)
        .and_then(|e| e["value"].as_str())
        .unwrap_or_else(|| panic!("no env {name} with a value"))
        .to_string()
}

#[test]
fn ha_redis_start_scripts_are_the_same_in_compose_and_kubernetes() {
    let compose = compose_ha();
    let configmap = ha_object("redis-sentinel.yaml", "ConfigMap", "redis-sentinel-scripts");
    for script in ["redis-start", "sentinel-start"] {
        let composed = compose["configs"][script]["content"]
            .as_str()
            .unwrap()
            .replace("$$", "$");
        assert_eq!(
            composed,
            configmap["data"][format!("{script}.sh")].as_str().unwrap(),
            "{script}.sh differs between compose.ha.yaml and kubernetes-ha/redis-sentinel.yaml"
        );
    }
}

#[test]
fn ha_kubernetes_overlay_patches_the_relay_onto_the_replicated_back_ends() {
    let kustomization = yaml_documents("kubernetes-ha/kustomization.yaml").remove(0);
    let resources: Vec<&str> = kustomization["resources"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r.as_str().unwrap())
        .collect();
    let patches: Vec<&str> = kustomization["patches"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["path"].as_str().unwrap())
        .collect();
    assert_eq!(resources[0], "../kubernetes", "an overlay of the base");
    for file in yaml_files()
        .iter()
        .filter_map(|f| f.strip_prefix("kubernetes-ha/"))
    {
        let listed = resources.contains(&file) || patches.contains(&file);
        match file {
            "kustomization.yaml" => {}
            // As in the base: never applied by accident.
            "secret.template.yaml" => assert!(!listed),
            _ => assert!(listed, "kubernetes-ha/{file} is not in the kustomization"),
        }
    }

    // The relay's environment after the strategic-merge patch: the base's
    // variables less those deleted, plus the patch's.
    let patch = ha_objects("relay-deployment.yaml").remove(0);
    assert_eq!(
        patch["metadata"]["name"],
        object("Deployment")["metadata"]["name"]
    );
    let patched = &patch["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(patched["name"], "relay");
    let mut env = container_env(&relay_container());
    for e in patched["env"].as_array().unwrap() {
        let name = e["name"].as_str().unwrap().to_string();
        if e["$patch"] == "delete" {
            assert!(
                env.remove(&name).is_some(),
                "the patch deletes {name}, absent from the base"
            );
        } else {
            env.insert(name, e.clone());
        }
    }
    let secret = ha_secret("sendtalk-relay");
    let mut vars = BTreeMap::new();
    for (name, value) in &env {
        if let Some(v) = value["value"].as_str() {
            vars.insert(name.clone(), v.to_string());
        } else {
            let r = &value["valueFrom"]["secretKeyRef"];
            assert_eq!(r["name"], "sendtalk-relay", "{name}");
            let key = r["key"].as_str().unwrap();
            let v = secret[key]
                .as_str()
                .unwrap_or_else(|| panic!("{name}: the HA Secret has no {key}"));
            vars.insert(name.clone(), v.to_string());
        }
    }
    // The mounted webhook secret is a file: supply the value directly.
    vars.remove("SENDTALK_RELAY__AUTH__SECRET_FILES");
    vars.insert("SENDTALK_RELAY__AUTH__SECRETS".into(), "x".into());

    let configmap = ha_objects("relay-configmap.yaml").remove(0);
    assert_eq!(
        configmap["metadata"]["name"],
        object("ConfigMap")["metadata"]["name"]
    );
    let settings = load_settings(configmap["data"]["relay.toml"].as_str(), &vars);
    assert_eq!(settings.sink, SinkKind::Amqp);
    assert_eq!(settings.dedup.backend(), DedupBackend::Redis);

    // What the base's tests check of its file still holds: probes, grace,
    // spool volume and the alert threshold.
    let base = configmap_settings();
    assert_eq!(settings.admin.listen, base.admin.listen);
    assert_eq!(settings.http.listen, base.http.listen);
    assert_eq!(settings.spool.dir, base.spool.dir);
    assert_eq!(settings.spool.max_bytes, base.spool.max_bytes);
    assert_eq!(settings.shutdown.grace, base.shutdown.grace);
    assert_eq!(settings.auth.mode.as_str(), base.auth.mode.as_str());

    // Redis: every sentinel pod through its headless Service, and the name
    // they monitor the master under.
    let (mode, urls, service) = redis_of(&settings);
    assert_eq!(mode, RedisMode::Sentinel);
    let sentinels = ha_object("redis-sentinel.yaml", "StatefulSet", "redis-sentinel");
    let sentinel_container = &sentinels["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(service, env_value(sentinel_container, "MASTER_NAME"));
    let urls: Vec<String> = urls.iter().map(|u| host_port(u)).collect();
    assert_eq!(urls, pod_addresses(&sentinels, "sentinel"));

    // RabbitMQ: every node, a quorum queue.
    let rabbitmq = ha_object("rabbitmq.yaml", "StatefulSet", "rabbitmq");
    let uris: Vec<String> = amqp_uris(&settings).iter().map(|u| host_port(u)).collect();
    assert_eq!(uris, pod_addresses(&rabbitmq, "amqp"));
    assert!(settings.amqp.queues.iter().any(|q| q.quorum));
    let user = amqp_uris(&settings)[0]
        .split_once("://")
        .unwrap()
        .1
        .split(':')
        .next()
        .unwrap()
        .to_string();
    assert_eq!(
        ha_secret("rabbitmq")["username"],
        user.as_str(),
        "the relay's broker user"
    );
}

/// `<pod>.<service>:<port>` of every pod of a StatefulSet, the container
/// port named `port`.
fn pod_addresses(statefulset: &Value, port: &str) -> Vec<String> {
    let name = statefulset["metadata"]["name"].as_str().unwrap();
    let service = statefulset["spec"]["serviceName"].as_str().unwrap();
    let container = &statefulset["spec"]["template"]["spec"]["containers"][0];
    let number = resolve_port(container, &Value::from(port));
    (0..statefulset["spec"]["replicas"].as_u64().unwrap())
        .map(|i| format!("{name}-{i}.{service}:{number}"))
        .collect()
}

#[test]
fn ha_kubernetes_statefulsets_are_addressable_and_replicated() {
    let objects: Vec<Value> = ["redis-sentinel.yaml", "rabbitmq.yaml"]
        .iter()
        .flat_map(|f| ha_objects(f))
        .collect();
    let of_kind =
        |kind: &str| -> Vec<&Value> { objects.iter().filter(|o| o["kind"] == kind).collect() };
    let selects = |selector: &Value, labels: &Value| {
        selector
            .as_object()
            .unwrap()
            .iter()
            .all(|(k, v)| &labels[k] == v)
    };
    let replicas: BTreeMap<String, u64> = of_kind("StatefulSet")
        .iter()
        .map(|s| {
            (
                s["metadata"]["name"].as_str().unwrap().to_string(),
                s["spec"]["replicas"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        replicas,
        BTreeMap::from([
            ("rabbitmq".to_string(), 3),
            ("redis".to_string(), 2),
            ("redis-sentinel".to_string(), 3),
        ])
    );
    for set in of_kind("StatefulSet") {
        let name = set["metadata"]["name"].as_str().unwrap();
        let labels = &set["spec"]["template"]["metadata"]["labels"];
        assert!(
            selects(&set["spec"]["selector"]["matchLabels"], labels),
            "{name}"
        );
        // Stable names: a headless Service publishing not-ready pods too.
        let service = of_kind("Service")
            .into_iter()
            .find(|s| s["metadata"]["name"] == set["spec"]["serviceName"])
            .unwrap_or_else(|| panic!("{name}: no Service {}", set["spec"]["serviceName"]));
        assert_eq!(service["spec"]["clusterIP"], "None", "{name}");
        assert_eq!(service["spec"]["publishNotReadyAddresses"], true, "{name}");
        assert!(selects(&service["spec"]["selector"], labels), "{name}");
        // Each selects only its own StatefulSet's pods.
        for other in of_kind("StatefulSet") {
            if other["metadata"]["name"] != name {
                assert!(!selects(
                    &service["spec"]["selector"],
                    &other["spec"]["template"]["metadata"]["labels"]
                ));
            }
        }
        let pdb = of_kind("PodDisruptionBudget")
            .into_iter()
            .find(|p| selects(&p["spec"]["selector"]["matchLabels"], labels))
            .unwrap_or_else(|| panic!("{name}: no PodDisruptionBudget"));
        assert!(
            pdb["spec"]["maxUnavailable"] == 1
                || pdb["spec"]["minAvailable"].as_u64()
                    == Some(set["spec"]["replicas"].as_u64().unwrap() / 2 + 1)
        );
        let pod = &set["spec"]["template"]["spec"];
        assert_eq!(pod["securityContext"]["runAsNonRoot"], true, "{name}");
        for container in pod["containers"].as_array().unwrap() {
            assert!(container["readinessProbe"].is_object(), "{name}");
        }
    }

    // Every Secret key the back-ends read (secretKeyRef, secret volume
    // items) is in the HA template.
    let mut refs = 0;
    let mut stack: Vec<&Value> = objects.iter().collect();
    while let Some(v) = stack.pop() {
        match v {
            Value::Object(map) => {
                if let Some(r) = map.get("secretKeyRef") {
                    let (name, key) = (r["name"].as_str().unwrap(), r["key"].as_str().unwrap());
                    assert!(
                        ha_secret(name)[key].is_string(),
                        "Secret {name} has no key {key}"
                    );
                    refs += 1;
                }
                if let Some(name) = map.get("secretName").and_then(Value::as_str) {
                    for item in map["items"]
                        .as_array()
                        .expect("secret volumes list their items")
                    {
                        let key = item["key"].as_str().unwrap();
                        assert!(
                            ha_secret(name)[key].is_string(),
                            "Secret {name} has no key {key}"
                        );
                        refs += 1;
                    }
                }
                stack.extend(map.values());
            }
            Value::Array(list) => stack.extend(list),
            _ => {}
        }
    }
    assert!(refs >= 7, "only {refs} Secret references found");

    // Sentinel: the peers and data nodes by name, a majority quorum.
    let sentinels = of_kind("StatefulSet")
        .into_iter()
        .find(|s| s["metadata"]["name"] == "redis-sentinel")
        .unwrap();
    let data = of_kind("StatefulSet")
        .into_iter()
        .find(|s| s["metadata"]["name"] == "redis")
        .unwrap();
    let names = |set: &Value| -> Vec<String> {
        pod_addresses(
            set,
            set["spec"]["template"]["spec"]["containers"][0]["ports"][0]["name"]
                .as_str()
                .unwrap(),
        )
        .iter()
        .map(|a| format!("{}.$(POD_NAMESPACE)", a.split(':').next().unwrap()))
        .collect()
    };
    for set in [sentinels, data] {
        let container = &set["spec"]["template"]["spec"]["containers"][0];
        let service = set["spec"]["serviceName"].as_str().unwrap();
        assert_eq!(
            env_value(container, "ANNOUNCE_HOST"),
            format!("$(POD_NAME).{service}.$(POD_NAMESPACE)")
        );
        let list = |var: &str| -> Vec<String> {
            env_value(container, var)
                .split_whitespace()
                .map(String::from)
                .collect()
        };
        assert_eq!(list("SENTINELS"), names(sentinels));
        assert_eq!(list("DATA_NODES"), names(data));
        assert_eq!(env_value(container, "FIRST_MASTER"), names(data)[0]);
        assert_eq!(
            env_value(container, "MASTER_NAME"),
            env_value(
                &sentinels["spec"]["template"]["spec"]["containers"][0],
                "MASTER_NAME"
            )
        );
    }
    let quorum: u64 = env_value(
        &sentinels["spec"]["template"]["spec"]["containers"][0],
        "QUORUM",
    )
    .parse()
    .unwrap();
    assert_eq!(
        quorum,
        sentinels["spec"]["replicas"].as_u64().unwrap() / 2 + 1
    );

    // RabbitMQ: Kubernetes peer discovery by node name, the cookie copied
    // from the Secret.
    let rabbitmq = of_kind("StatefulSet")
        .into_iter()
        .find(|s| s["metadata"]["name"] == "rabbitmq")
        .unwrap();
    let config = of_kind("ConfigMap")
        .into_iter()
        .find(|c| c["metadata"]["name"] == "rabbitmq")
        .unwrap();
    assert!(config["data"]["enabled_plugins"]
        .as_str()
        .unwrap()
        .contains("rabbitmq_peer_discovery_k8s"));
    assert!(config["data"]["cluster.conf"]
        .as_str()
        .unwrap()
        .contains("cluster_formation.peer_discovery_backend = k8s"));
    let pod = &rabbitmq["spec"]["template"]["spec"];
    let container = &pod["containers"][0];
    assert_eq!(
        env_value(container, "K8S_SERVICE_NAME"),
        rabbitmq["spec"]["serviceName"].as_str().unwrap()
    );
    assert_eq!(
        env_value(container, "RABBITMQ_NODENAME"),
        "rabbit@$(MY_POD_NAME).$(K8S_SERVICE_NAME).$(MY_POD_NAMESPACE)"
    );
    assert_eq!(env_value(container, "RABBITMQ_USE_LONGNAME"), "true");
    let init = pod["initContainers"][0]["command"].to_string();
    assert!(
        init.contains("/var/lib/rabbitmq/.erlang.cookie") && init.contains("chmod 0400"),
        "{init}"
    );
    let cookie = pod["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "erlang-cookie")
        .expect("the erlang-cookie volume");
    assert_eq!(cookie["secret"]["items"][0]["key"], "erlang-cookie");
    assert_eq!(rabbitmq["spec"]["podManagementPolicy"], "Parallel");
}
