//! The deployment artefacts under `deploy/` agree with the relay they deploy:
//! probes hit the admin listener's real port and paths, grace periods outlast
//! `shutdown.grace_secs`, every `SENDTALK_RELAY__*` variable names a real
//! configuration key, the Kubernetes configuration file loads, and every
//! metric a dashboard or an alert queries is one the relay exports.
//!
//! No network and no running services: files are parsed and compared with
//! `sendtalk_relay::config` and `sendtalk_relay::metrics`. The external
//! checkers (promtool, yamllint, hadolint, systemd-analyze...) run from
//! `scripts/check-deploy`.

#![allow(clippy::unwrap_used)] // helpers outside #[test] fns panic on purpose

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use sendtalk_relay::config::{default_keys, DedupBackend, Settings, SinkKind, CONFIG_FILE_ENV};
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
fn container_healthchecks_probe_healthz_on_the_admin_port() {
    let target = format!("/dev/tcp/127.0.0.1/{}", default_admin_listen().port());
    let dockerfile = read("Dockerfile");
    let healthcheck = dockerfile
        .split("HEALTHCHECK")
        .nth(1)
        .expect("the Dockerfile has a HEALTHCHECK")
        .split("\nENTRYPOINT")
        .next()
        .unwrap();
    assert!(healthcheck.contains(&target) && healthcheck.contains("GET /healthz "));
    assert!(dockerfile.contains("EXPOSE 8080 9090"));
    assert!(dockerfile.contains("VOLUME [\"/var/lib/sendtalk-relay\"]"));

    let compose = compose();
    let relay = &compose["services"]["relay"];
    let test = relay["healthcheck"]["test"].to_string();
    assert!(
        test.contains(&target) && test.contains("GET /healthz "),
        "{test}"
    );
    // The check runs inside the container against 127.0.0.1: loopback or
    // 0.0.0.0 both work, another port does not.
    let env = compose_env(relay);
    let admin: SocketAddr = env["SENDTALK_RELAY__ADMIN__LISTEN"].parse().unwrap();
    assert_eq!(admin.port(), default_admin_listen().port());
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
