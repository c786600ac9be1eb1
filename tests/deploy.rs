//! The deployment files: the systemd unit (checked by `systemd-analyze` when present) and
//! the notify protocol it relies on, the Kubernetes manifests and the compose file, each
//! checked for the fields smsgw relies on.

mod helpers;

use std::{
    collections::HashMap,
    os::unix::net::UnixDatagram,
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use yaml_rust2::{Yaml, YamlLoader};

use helpers::{TestEnv, TwilioStub, base_settings, free_port, smsgw_command};
use smsgw::config::VARIABLES;

fn repo(path: &str) -> String {
    format!("{}/{path}", env!("CARGO_MANIFEST_DIR"))
}

fn read(path: &str) -> String {
    std::fs::read_to_string(repo(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn yaml_docs(path: &str) -> Vec<Yaml> {
    YamlLoader::load_from_str(&read(path)).unwrap_or_else(|e| panic!("{path} is not YAML: {e}"))
}

fn kind<'a>(docs: &'a [Yaml], kind: &str) -> &'a Yaml {
    docs.iter()
        .find(|d| d["kind"].as_str() == Some(kind))
        .unwrap_or_else(|| panic!("no {kind}"))
}

fn manifests() -> Vec<Yaml> {
    let mut docs = Vec::new();
    for entry in std::fs::read_dir(repo("deploy/kubernetes")).expect("deploy/kubernetes") {
        let path = entry.expect("entry").path();
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default();
        if path.extension().is_some_and(|e| e == "yaml") && name != "kustomization.yaml" {
            docs.extend(yaml_docs(&format!("deploy/kubernetes/{name}")));
        }
    }
    docs
}

/// The variables the image's final stage sets (`ENV KEY=VALUE ...` lines).
fn image_env() -> HashMap<String, String> {
    let dockerfile = read("Dockerfile");
    let image = dockerfile
        .rsplit("\nFROM ")
        .next()
        .expect("the final stage");
    image
        .lines()
        .filter_map(|line| line.trim().strip_prefix("ENV "))
        .flat_map(str::split_whitespace)
        .map(|pair| {
            let (key, value) = pair.split_once('=').expect("ENV KEY=VALUE");
            (key.to_owned(), value.to_owned())
        })
        .collect()
}

fn unit_value<'a>(unit: &'a str, key: &str) -> Option<&'a str> {
    unit.lines()
        .find_map(|l| l.strip_prefix(&format!("{key}=")))
        .map(str::trim)
}

fn seconds(text: &str) -> u64 {
    humantime::parse_duration(text)
        .unwrap_or_else(|e| panic!("{text}: {e}"))
        .as_secs()
}

#[test]
fn the_systemd_unit_is_notify_hardened_and_stops_within_its_timeout() {
    let unit = read("deploy/systemd/smsgw.service");
    assert_eq!(unit_value(&unit, "Type"), Some("notify"));
    assert!(unit_value(&unit, "WatchdogSec").is_some());
    assert_eq!(
        unit_value(&unit, "EnvironmentFile"),
        Some("/etc/smsgw/smsgw.env")
    );
    assert_eq!(
        unit_value(&unit, "ExecStart"),
        Some("/usr/local/bin/smsgw run")
    );
    let stop = seconds(unit_value(&unit, "TimeoutStopSec").expect("TimeoutStopSec"));
    assert!(
        stop > 20,
        "TimeoutStopSec must exceed the 20s shutdown grace"
    );
    for hardening in [
        "DynamicUser=yes",
        "ProtectSystem=strict",
        "NoNewPrivileges=yes",
        "PrivateTmp=yes",
    ] {
        assert!(unit.contains(hardening), "{hardening}");
    }
    assert!(unit.contains("CapabilityBoundingSet=\n"), "no capabilities");
    assert!(unit.contains("SystemCallFilter=@system-service"));

    if Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("systemd-analyze is not installed: skipping its verification");
        return;
    }
    // Verify a copy that points at the built binary and the example environment file.
    let dir = std::env::temp_dir().join(format!("smsgw-unit-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let copy = dir.join("smsgw.service");
    std::fs::write(
        &copy,
        unit.replace("/usr/local/bin/smsgw", env!("CARGO_BIN_EXE_smsgw"))
            .replace(
                "/etc/smsgw/smsgw.env",
                &repo("deploy/systemd/smsgw.env.example"),
            ),
    )
    .expect("write unit");
    let verify = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&copy)
        .output()
        .expect("systemd-analyze verify");
    let complaints = String::from_utf8_lossy(&verify.stderr);
    assert!(verify.status.success(), "{complaints}");
    assert!(
        !complaints.contains(copy.to_string_lossy().as_ref()),
        "systemd-analyze complains about the unit: {complaints}"
    );
    let security = Command::new("systemd-analyze")
        .args(["security", "--offline=yes"])
        .arg(&copy)
        .output()
        .expect("systemd-analyze security");
    let text = String::from_utf8_lossy(&security.stdout).into_owned()
        + &String::from_utf8_lossy(&security.stderr);
    let exposure: f64 = text
        .split("Overall exposure level for smsgw.service:")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no exposure level in: {text}"));
    assert!(exposure <= 2.0, "exposure {exposure} (lower is safer)");
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_daemon_speaks_systemds_notify_protocol() {
    helpers::init_logs();
    let env = TestEnv::new().await;
    let stub = TwilioStub::start().await;
    let port = free_port();
    helpers::migrate(&env.database_url).await;
    let dir = std::env::temp_dir().join(format!("smsgw-notify-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).expect("dir");
    let socket_path = dir.join("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).expect("bind the notify socket");
    socket
        .set_read_timeout(Some(Duration::from_millis(200)))
        .expect("timeout");

    let mut vars: Vec<(String, String)> = base_settings(&env, &stub, port).into_iter().collect();
    vars.push((
        "NOTIFY_SOCKET".into(),
        socket_path.to_string_lossy().into_owned(),
    ));
    vars.push(("WATCHDOG_USEC".into(), "400000".into()));
    let mut child = smsgw_command(&vars, &["run"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("smsgw run");

    let mut messages = Vec::new();
    let receive_until = |want: &str, messages: &mut Vec<String>| {
        let deadline = Instant::now() + helpers::PATIENCE;
        let mut buffer = [0u8; 4096];
        while Instant::now() < deadline {
            if let Ok(n) = socket.recv(&mut buffer) {
                let text = String::from_utf8_lossy(&buffer[..n]).into_owned();
                let found = text.lines().any(|l| l == want);
                messages.push(text);
                if found {
                    return;
                }
            }
        }
        panic!("never received {want}: {messages:?}");
    };
    receive_until("READY=1", &mut messages);
    let ready = reqwest::get(format!("http://127.0.0.1:{port}/readyz"))
        .await
        .expect("readyz");
    assert!(
        ready.status().is_success(),
        "READY=1 only once the consumers are active"
    );
    receive_until("WATCHDOG=1", &mut messages);
    receive_until("WATCHDOG=1", &mut messages);

    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill");
    receive_until("STOPPING=1", &mut messages);
    let status = child.wait().expect("wait");
    assert_eq!(status.code(), Some(0));
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn the_kubernetes_manifests_fit_the_daemon() {
    let docs = manifests();
    for doc in &docs {
        assert!(doc["apiVersion"].as_str().is_some(), "apiVersion: {doc:?}");
        assert!(doc["metadata"]["name"].as_str().is_some(), "name: {doc:?}");
    }
    let config = kind(&docs, "ConfigMap");
    let secret = kind(&docs, "Secret");
    let deployment = kind(&docs, "Deployment");
    let spec = &deployment["spec"]["template"]["spec"];
    let container = &spec["containers"][0];

    // Settings: only variables smsgw reads, and the ones it needs in production.
    let mut keys = Vec::new();
    // The pod's environment: the image's defaults, then the ConfigMap and the Secret (the
    // example Secret's placeholder ids, ACxxx..., filled in).
    let mut pod_env = image_env();
    for source in [config, secret] {
        let data = if source["data"].is_badvalue() {
            &source["stringData"]
        } else {
            &source["data"]
        };
        for (key, value) in data.as_hash().expect("data") {
            let key = key.as_str().expect("key").to_owned();
            let value = value.as_str().expect("a string value");
            let value = if value.contains("xxxx") {
                value.replace('x', "0")
            } else {
                value.to_owned()
            };
            keys.push(key.clone());
            pod_env.insert(key, value);
        }
    }
    for key in &keys {
        assert!(
            VARIABLES.contains(&key.as_str()),
            "{key} is not a smsgw variable"
        );
    }
    for needed in [
        "SMSGW_ENV",
        "SMSGW_AMQP_URL",
        "SMSGW_DATABASE_URL",
        "SMSGW_HTTP_ADDR",
        "SMSGW_PROVIDER",
    ] {
        assert!(keys.iter().any(|k| k == needed), "{needed} is not set");
    }
    // Production accepts it: a real provider, its credentials, an https public URL.
    let settings = smsgw::config::Settings::from_lookup(|name| pod_env.get(name).cloned())
        .unwrap_or_else(|e| panic!("the manifests' settings are refused: {e}"));
    assert_eq!(settings.env, smsgw::config::Environment::Production);

    let env_from: Vec<&str> = container["envFrom"]
        .as_vec()
        .expect("envFrom")
        .iter()
        .filter_map(|e| {
            e["configMapRef"]["name"]
                .as_str()
                .or_else(|| e["secretRef"]["name"].as_str())
        })
        .collect();
    assert!(env_from.contains(&config["metadata"]["name"].as_str().expect("name")));
    assert!(env_from.contains(&secret["metadata"]["name"].as_str().expect("name")));

    // The HTTP port and the probes.
    let http_addr = config["data"]["SMSGW_HTTP_ADDR"]
        .as_str()
        .expect("http addr");
    assert!(
        http_addr.starts_with("0.0.0.0:"),
        "must listen beyond localhost in a pod"
    );
    let port: i64 = http_addr
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .expect("port");
    assert_eq!(container["ports"][0]["containerPort"].as_i64(), Some(port));
    assert_eq!(
        container["livenessProbe"]["httpGet"]["path"].as_str(),
        Some("/healthz")
    );
    assert_eq!(
        container["readinessProbe"]["httpGet"]["path"].as_str(),
        Some("/readyz")
    );
    assert_eq!(container["args"][0].as_str(), Some("run"));

    // Shutdown: Kubernetes waits longer than smsgw's grace.
    let grace = seconds(
        config["data"]["SMSGW_SHUTDOWN_GRACE"]
            .as_str()
            .unwrap_or("20s"),
    );
    let termination = spec["terminationGracePeriodSeconds"]
        .as_i64()
        .expect("termination grace");
    assert!(
        termination as u64 > grace,
        "{termination}s must exceed {grace}s"
    );

    // Non-root, read-only, resources.
    assert_eq!(
        spec["securityContext"]["runAsNonRoot"].as_bool(),
        Some(true)
    );
    assert_eq!(
        container["securityContext"]["readOnlyRootFilesystem"].as_bool(),
        Some(true)
    );
    assert_eq!(
        container["securityContext"]["allowPrivilegeEscalation"].as_bool(),
        Some(false)
    );
    assert!(
        container["resources"]["requests"]["memory"]
            .as_str()
            .is_some()
    );
    assert!(
        container["resources"]["limits"]["memory"]
            .as_str()
            .is_some()
    );

    // Selectors agree.
    let labels = &deployment["spec"]["template"]["metadata"]["labels"];
    let service = kind(&docs, "Service");
    let pdb = kind(&docs, "PodDisruptionBudget");
    for (key, value) in service["spec"]["selector"]
        .as_hash()
        .expect("service selector")
        .iter()
        .chain(
            pdb["spec"]["selector"]["matchLabels"]
                .as_hash()
                .expect("pdb selector"),
        )
    {
        assert_eq!(
            &labels[key.as_str().expect("label")],
            value,
            "selector {key:?}"
        );
    }
    assert_eq!(service["spec"]["ports"][0]["port"].as_i64(), Some(port));

    // KEDA scales this deployment on all three lanes.
    let scaled = kind(&docs, "ScaledObject");
    assert_eq!(
        scaled["spec"]["scaleTargetRef"]["name"].as_str(),
        deployment["metadata"]["name"].as_str()
    );
    let queues: Vec<&str> = scaled["spec"]["triggers"]
        .as_vec()
        .expect("triggers")
        .iter()
        .filter_map(|t| t["metadata"]["queueName"].as_str())
        .collect();
    for lane in smsgw::job::Lane::ALL {
        assert!(
            queues.contains(&smsgw::broker::lane_queue(lane)),
            "{lane:?}"
        );
    }

    // The migration job runs `smsgw migrate`.
    let job = kind(&docs, "Job");
    assert_eq!(
        job["spec"]["template"]["spec"]["containers"][0]["args"][0].as_str(),
        Some("migrate")
    );

    // kustomization lists files that exist (and not the example Secret).
    let kustomization = &yaml_docs("deploy/kubernetes/kustomization.yaml")[0];
    for resource in kustomization["resources"].as_vec().expect("resources") {
        let file = resource.as_str().expect("file");
        assert!(
            Path::new(&repo(&format!("deploy/kubernetes/{file}"))).exists(),
            "{file}"
        );
        assert_ne!(file, "secret.example.yaml");
    }
}

#[test]
fn the_compose_file_and_env_examples_use_real_settings() {
    let compose = &yaml_docs("docker-compose.yml")[0];
    let services = compose["services"].as_hash().expect("services");
    for name in ["rabbitmq", "postgres", "smsgw"] {
        assert!(services.contains_key(&Yaml::String(name.into())), "{name}");
    }
    let smsgw = &compose["services"]["smsgw"];
    for (key, _) in smsgw["environment"].as_hash().expect("environment") {
        let key = key.as_str().expect("key");
        assert!(VARIABLES.contains(&key), "{key} is not a smsgw variable");
    }
    assert_eq!(
        smsgw["environment"]["SMSGW_ENV"].as_str(),
        Some("development")
    );

    for line in read("deploy/systemd/smsgw.env.example").lines() {
        if let Some((key, _)) = line.split_once('=')
            && !line.starts_with('#')
        {
            assert!(VARIABLES.contains(&key), "{key} is not a smsgw variable");
        }
    }
    let dockerfile = read("Dockerfile");
    assert!(dockerfile.contains("USER 65532"), "runs as non-root");
    assert!(dockerfile.matches("FROM ").count() >= 2, "multi-stage");
    for read_by_the_build in ["src", "schema", "templates"] {
        assert!(
            dockerfile.contains(&format!("COPY {read_by_the_build} {read_by_the_build}")),
            "the image build needs {read_by_the_build}/"
        );
    }
    // A deployment that forgets SMSGW_ENV must not get a development daemon listening on
    // 0.0.0.0 (it would consume real jobs, send nothing and show login codes).
    let defaults = image_env();
    assert_eq!(
        defaults.get("SMSGW_ENV").map(String::as_str),
        Some("production"),
        "the image runs as production by default: {defaults:?}"
    );
    // The image's build has no .git: `smsgw --version` gets the commit from this argument.
    assert!(
        dockerfile.contains("ARG SMSGW_COMMIT"),
        "the image's build takes the commit as a build argument"
    );
    // Built like `cargo build` here: with the allocator settings of .cargo/config.toml.
    assert!(
        dockerfile.contains("COPY .cargo .cargo"),
        "the image is built with the repo's cargo settings"
    );
    assert!(
        read(".cargo/config.toml").contains("JEMALLOC_SYS_WITH_MALLOC_CONF"),
        "the allocator settings are in the build"
    );
}
