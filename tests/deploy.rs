//! The deployment files: the systemd unit (checked by `systemd-analyze` when present) and
//! the notify protocol it relies on, the Kubernetes overlays as `kubectl kustomize` renders
//! them (skipped without a kubectl that can, except in CI), and the compose file, each
//! checked for the fields smsgw relies on.

mod helpers;

use std::{
    collections::HashMap,
    os::unix::net::UnixDatagram,
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

/// The overlays of `deploy/kubernetes`, each an environment smsgw knows.
const OVERLAYS: [&str; 2] = ["staging", "production"];

/// Why `kubectl kustomize` cannot render the overlays here, if it cannot: they need the
/// kustomize v5 that kubectl 1.27 and later embed.
fn renderer_missing() -> Option<String> {
    let Ok(output) = Command::new("kubectl")
        .args(["version", "--client"])
        .output()
    else {
        return Some("kubectl is not installed".into());
    };
    let text = String::from_utf8_lossy(&output.stdout);
    let version = text
        .lines()
        .find_map(|l| l.strip_prefix("Kustomize Version: v"))
        .map(str::to_owned);
    match version
        .as_deref()
        .map(|v| v.split('.').next()?.parse::<u32>().ok())
    {
        Some(Some(major)) if major >= 5 => None,
        _ => Some(format!(
            "kubectl embeds kustomize {}, the overlays need v5 (kubectl 1.27 or later)",
            version.as_deref().unwrap_or("of no stated version")
        )),
    }
}

/// Each overlay as `kubectl kustomize` renders it; `None` where kubectl cannot, and the
/// test says it skipped. CI must render them (`.ci/run` installs kubectl): there a missing
/// renderer fails the test.
fn rendered_overlays(test: &str) -> Option<Vec<(&'static str, Vec<Yaml>)>> {
    if let Some(why) = renderer_missing() {
        assert!(
            std::env::var_os("CI").is_none(),
            "{why}: CI must render the Kubernetes overlays (.ci/run installs kubectl)"
        );
        use std::io::Write;
        let _ = writeln!(
            std::io::stderr(),
            "SKIPPED {test}: {why} (.ci/run installs it)"
        );
        return None;
    }
    Some(
        OVERLAYS
            .iter()
            .map(|o| {
                (
                    *o,
                    render(&repo(&format!("deploy/kubernetes/overlays/{o}"))),
                )
            })
            .collect(),
    )
}

fn render(dir: &str) -> Vec<Yaml> {
    let output = Command::new("kubectl")
        .args(["kustomize", dir])
        .output()
        .expect("kubectl kustomize");
    assert!(
        output.status.success(),
        "kubectl kustomize {dir}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    YamlLoader::load_from_str(&String::from_utf8_lossy(&output.stdout))
        .unwrap_or_else(|e| panic!("{dir} renders no YAML: {e}"))
}

fn named<'a>(docs: &'a [Yaml], kind: &str, name: &str) -> &'a Yaml {
    docs.iter()
        .find(|d| d["kind"].as_str() == Some(kind) && d["metadata"]["name"].as_str() == Some(name))
        .unwrap_or_else(|| panic!("no {kind} {name}"))
}

/// Every label `selector` asks for is among `labels`.
fn selects(selector: &Yaml, labels: &Yaml) -> bool {
    selector
        .as_hash()
        .expect("a selector")
        .iter()
        .all(|(key, value)| &labels[key.as_str().expect("label")] == value)
}

/// The example Secret named `name` (`secret.example.yaml`): the keys the pods get from it.
fn example_secret(name: &str) -> HashMap<String, String> {
    let docs = yaml_docs("deploy/kubernetes/secret.example.yaml");
    named(&docs, "Secret", name)["stringData"]
        .as_hash()
        .expect("stringData")
        .iter()
        .map(|(k, v)| {
            let (key, value) = (k.as_str().expect("key"), v.as_str().expect("value"));
            // The placeholder ids (ACxxx...) filled in.
            (
                key.to_owned(),
                value.replace("xxxx", "0000").replace('x', "0"),
            )
        })
        .collect()
}

/// The daemon's container, its pod spec, and the ConfigMap its environment comes from.
fn daemon(docs: &[Yaml]) -> (&Yaml, &Yaml, &Yaml) {
    let spec = &kind(docs, "Deployment")["spec"]["template"]["spec"];
    let container = &spec["containers"][0];
    let config_name = container["envFrom"]
        .as_vec()
        .expect("envFrom")
        .iter()
        .find_map(|e| e["configMapRef"]["name"].as_str())
        .expect("a ConfigMap");
    (container, spec, named(docs, "ConfigMap", config_name))
}

fn mebibytes(quantity: &str) -> u64 {
    let (number, factor) = match quantity {
        q if q.ends_with("Gi") => (&q[..q.len() - 2], 1024),
        q if q.ends_with("Mi") => (&q[..q.len() - 2], 1),
        q => panic!("{q}: give memory in Mi or Gi"),
    };
    number.parse::<u64>().expect("a number") * factor
}

#[test]
fn each_overlay_gives_the_daemon_settings_its_environment_accepts() {
    let Some(overlays) = rendered_overlays("each_overlay_gives_the_daemon_settings...") else {
        return;
    };
    let secret = example_secret("smsgw");
    for (overlay, docs) in &overlays {
        let (container, _, config) = daemon(docs);
        let secret_ref = container["envFrom"]
            .as_vec()
            .expect("envFrom")
            .iter()
            .find_map(|e| e["secretRef"]["name"].as_str());
        assert_eq!(secret_ref, Some("smsgw"), "{overlay}");
        // The pod's environment: the image's defaults, then the ConfigMap and the Secret.
        let mut pod_env = image_env();
        for (key, value) in config["data"].as_hash().expect("data") {
            let value = value.as_str().expect("a string value").to_owned();
            pod_env.insert(key.as_str().expect("key").to_owned(), value);
        }
        let set: Vec<String> = pod_env.keys().chain(secret.keys()).cloned().collect();
        for key in &set {
            assert!(
                VARIABLES.contains(&key.as_str()),
                "{overlay}: {key} is not a smsgw variable"
            );
        }
        pod_env.extend(secret.clone());
        for needed in [
            "SMSGW_ENV",
            "SMSGW_AMQP_URL",
            "SMSGW_DATABASE_URL",
            "SMSGW_PROVIDER",
        ] {
            assert!(
                pod_env.contains_key(needed),
                "{overlay}: {needed} is not set"
            );
        }
        let settings = smsgw::config::Settings::from_lookup(|name| pod_env.get(name).cloned())
            .unwrap_or_else(|e| panic!("{overlay}: its settings are refused: {e}"));
        assert_eq!(settings.env.as_str(), *overlay);
    }
}

#[test]
fn each_overlay_runs_this_version_with_its_probes_port_and_grace() {
    let Some(overlays) = rendered_overlays("each_overlay_runs_this_version...") else {
        return;
    };
    for (overlay, docs) in &overlays {
        let (container, spec, config) = daemon(docs);
        let image = container["image"].as_str().expect("image");
        assert!(
            image.ends_with(&format!("/smsgw:{}", env!("CARGO_PKG_VERSION"))),
            "{overlay} runs {image}, this checkout builds {}",
            env!("CARGO_PKG_VERSION")
        );
        let job = kind(docs, "Job");
        assert_eq!(
            job["spec"]["template"]["spec"]["containers"][0]["image"].as_str(),
            Some(image)
        );
        assert_eq!(container["args"][0].as_str(), Some("run"));

        let http_addr = config["data"]["SMSGW_HTTP_ADDR"]
            .as_str()
            .expect("http addr");
        let port: i64 = http_addr
            .strip_prefix("0.0.0.0:")
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("{overlay}: {http_addr} must listen beyond localhost"));
        assert_eq!(container["ports"][0]["containerPort"].as_i64(), Some(port));
        assert_eq!(container["ports"][0]["name"].as_str(), Some("http"));
        let service = named(docs, "Service", "smsgw");
        assert_eq!(
            service["spec"]["ports"][0]["targetPort"].as_str(),
            Some("http")
        );
        for (probe, path) in [("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")] {
            assert_eq!(
                container[probe]["httpGet"]["path"].as_str(),
                Some(path),
                "{probe}"
            );
        }
        // Shutdown: Kubernetes waits longer than smsgw's grace.
        let grace = seconds(
            config["data"]["SMSGW_SHUTDOWN_GRACE"]
                .as_str()
                .unwrap_or("20s"),
        );
        let termination = spec["terminationGracePeriodSeconds"]
            .as_i64()
            .expect("grace");
        assert!(
            termination as u64 > grace,
            "{overlay}: {termination}s must exceed {grace}s"
        );
    }
}

#[test]
fn the_pods_run_locked_down_spread_and_within_their_memory() {
    let Some(overlays) = rendered_overlays("the_pods_run_locked_down...") else {
        return;
    };
    for (overlay, docs) in &overlays {
        let deployment = kind(docs, "Deployment");
        let job_spec = &kind(docs, "Job")["spec"]["template"]["spec"];
        let (container, spec, config) = daemon(docs);
        for (pod, c) in [(spec, container), (job_spec, &job_spec["containers"][0])] {
            let seccomp = &pod["securityContext"]["seccompProfile"]["type"];
            assert_eq!(seccomp.as_str(), Some("RuntimeDefault"), "{overlay}");
            assert_eq!(pod["securityContext"]["runAsNonRoot"].as_bool(), Some(true));
            assert_eq!(pod["automountServiceAccountToken"].as_bool(), Some(false));
            let context = &c["securityContext"];
            assert_eq!(context["readOnlyRootFilesystem"].as_bool(), Some(true));
            assert_eq!(context["allowPrivilegeEscalation"].as_bool(), Some(false));
            let dropped = context["capabilities"]["drop"].as_vec().expect("drop");
            assert_eq!(dropped, &vec![Yaml::String("ALL".into())], "{overlay}");
            assert!(c["resources"]["limits"]["memory"].as_str().is_some());
        }
        // KEDA owns the count: a `replicas` here would undo its scaling at every apply.
        let scaled = kind(docs, "ScaledObject");
        assert_eq!(
            scaled["spec"]["scaleTargetRef"]["name"],
            deployment["metadata"]["name"]
        );
        assert!(
            deployment["spec"]["replicas"].is_badvalue(),
            "{overlay}: replicas set"
        );

        let labels = &deployment["spec"]["template"]["metadata"]["labels"];
        let spread = spec["topologySpreadConstraints"].as_vec().expect("spread");
        for key in ["kubernetes.io/hostname", "topology.kubernetes.io/zone"] {
            let constraint = spread
                .iter()
                .find(|c| c["topologyKey"].as_str() == Some(key))
                .unwrap_or_else(|| panic!("{overlay}: not spread over {key}"));
            assert!(selects(&constraint["labelSelector"]["matchLabels"], labels));
        }

        // The worst case of the shipped settings (docs/operations.md, "Memory"): the daemon
        // at its peak, the bulk lane's budget of largest jobs waiting, the fan-outs at
        // three times their size.
        let setting = |name: &str| -> u64 {
            config["data"][name]
                .as_str()
                .and_then(|v| v.parse().ok())
                .expect(name)
        };
        let job_mib = setting("SMSGW_MAX_JOB_BYTES").div_ceil(1 << 20);
        let (bulk, fanouts) = (
            setting("SMSGW_BULK_CONCURRENCY"),
            setting("SMSGW_FANOUT_CONCURRENCY"),
        );
        let worst = 66 + (bulk - fanouts) * job_mib + fanouts * 3 * job_mib;
        let resources = &container["resources"];
        let limit = mebibytes(resources["limits"]["memory"].as_str().expect("limit"));
        assert!(
            limit >= worst,
            "{overlay}: a limit of {limit} MiB, a worst case of {worst} MiB"
        );
        let request = mebibytes(resources["requests"]["memory"].as_str().expect("request"));
        assert!(
            (66..=limit).contains(&request),
            "{overlay}: requests {request} MiB"
        );
    }
}

/// `overlay` rendered with its `image` at another `tag`, as `kustomize edit set image`
/// would set it: through a kustomization of its own that takes the overlay as its base.
fn with_tag(overlay: &str, image: &str, tag: &str) -> Vec<Yaml> {
    let dir = std::env::temp_dir().join(format!("smsgw-kustomize-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).expect("dir");
    let overlay_dir = repo(&format!("deploy/kubernetes/overlays/{overlay}"));
    // kustomize takes no absolute path to a base: climb from `dir` to the root.
    let climb = "../".repeat(dir.components().count() - 1);
    let relative = format!("{climb}{}", overlay_dir.trim_start_matches('/'));
    let name = image.rsplit_once(':').expect("a tag").0;
    std::fs::write(
        dir.join("kustomization.yaml"),
        format!("resources: [{relative}]\nimages:\n  - name: {name}\n    newTag: {tag}\n"),
    )
    .expect("kustomization");
    let rendered = render(&dir.to_string_lossy());
    let _ = std::fs::remove_dir_all(&dir);
    rendered
}

/// Only the webhooks are exposed, at the host of the public URL.
fn only_webhooks_are_exposed(docs: &[Yaml], public_url: &str) {
    let host = public_url
        .strip_prefix("https://")
        .expect("https")
        .trim_end_matches('/');
    let ingress = kind(docs, "Ingress");
    let rule = &ingress["spec"]["rules"][0];
    assert_eq!(rule["host"].as_str(), Some(host));
    assert_eq!(ingress["spec"]["tls"][0]["hosts"][0].as_str(), Some(host));
    for path in rule["http"]["paths"].as_vec().expect("paths") {
        assert_eq!(path["path"].as_str(), Some("/webhooks/"));
        assert_eq!(path["pathType"].as_str(), Some("Prefix"));
        assert_eq!(path["backend"]["service"]["name"].as_str(), Some("smsgw"));
    }
}

#[test]
fn the_migrate_job_is_named_after_its_image_and_given_time() {
    let Some(overlays) = rendered_overlays("the_migrate_job_is_named_after_its_image...") else {
        return;
    };
    for (overlay, docs) in &overlays {
        let job = kind(docs, "Job");
        let name = job["metadata"]["name"].as_str().expect("name");
        assert!(
            name.starts_with("smsgw-migrate-") && name.len() <= 63,
            "{overlay}: {name}"
        );
        let spec = &job["spec"];
        assert_eq!(
            spec["template"]["spec"]["containers"][0]["args"][0].as_str(),
            Some("migrate")
        );
        let deadline = spec["activeDeadlineSeconds"]
            .as_i64()
            .expect("activeDeadlineSeconds");
        assert!(
            deadline >= 30 * 60,
            "{overlay}: an index build takes minutes: {deadline}s"
        );
        assert!(
            spec["backoffLimit"]
                .as_i64()
                .is_some_and(|n| (1..=5).contains(&n))
        );
        // Its pods are not the daemon's: no Service, PDB or Deployment counts them.
        let pod_labels = &spec["template"]["metadata"]["labels"];
        for (kind_name, selector) in [
            (
                "Service",
                &named(docs, "Service", "smsgw")["spec"]["selector"],
            ),
            (
                "PodDisruptionBudget",
                &kind(docs, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"],
            ),
            (
                "Deployment",
                &kind(docs, "Deployment")["spec"]["selector"]["matchLabels"],
            ),
        ] {
            assert!(
                !selects(selector, pod_labels),
                "{overlay}: the {kind_name} selects them"
            );
        }

        // Another image, another Job (a Job's template cannot change in place); the same
        // image, the same Job.
        let image = spec["template"]["spec"]["containers"][0]["image"].as_str();
        let next = with_tag(overlay, image.expect("image"), "9.9.9");
        let next_job = kind(&next, "Job");
        assert_ne!(
            next_job["metadata"]["name"].as_str(),
            Some(name),
            "{overlay}"
        );
        let next_image = next_job["spec"]["template"]["spec"]["containers"][0]["image"].as_str();
        assert!(
            next_image.is_some_and(|i| i.ends_with(":9.9.9")),
            "{next_image:?}"
        );
        let again = render(&repo(&format!("deploy/kubernetes/overlays/{overlay}")));
        assert_eq!(kind(&again, "Job")["metadata"]["name"].as_str(), Some(name));
    }
}

#[test]
fn scaling_scraping_and_exposure_reach_only_what_they_should() {
    let Some(overlays) = rendered_overlays("scaling_scraping_and_exposure...") else {
        return;
    };
    for (overlay, docs) in &overlays {
        let (_, _, config) = daemon(docs);
        let labels = &kind(docs, "Deployment")["spec"]["template"]["metadata"]["labels"];
        let service = named(docs, "Service", "smsgw");
        assert!(selects(&service["spec"]["selector"], labels));
        assert!(selects(
            &kind(docs, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"],
            labels
        ));

        // KEDA: all three lanes, through a URL of its own (SMSGW_AMQP_URL may be a list).
        let scaled = kind(docs, "ScaledObject");
        let triggers = scaled["spec"]["triggers"].as_vec().expect("triggers");
        for lane in smsgw::job::Lane::ALL {
            let queue = smsgw::broker::lane_queue(lane);
            assert!(
                triggers
                    .iter()
                    .any(|t| t["metadata"]["queueName"].as_str() == Some(queue))
            );
        }
        let auth = &kind(docs, "TriggerAuthentication")["spec"]["secretTargetRef"][0];
        let (secret, key) = (
            auth["name"].as_str().expect("secret"),
            auth["key"].as_str().expect("key"),
        );
        assert_ne!(
            key, "SMSGW_AMQP_URL",
            "{overlay}: KEDA cannot read a node list"
        );
        let keda_url = &example_secret(secret)[key];
        assert!(
            keda_url.starts_with("amqp") && !keda_url.contains(','),
            "{keda_url}"
        );

        // The Prometheus Operator scrapes the Service's pods on their http port.
        let monitor = kind(docs, "ServiceMonitor");
        assert!(selects(
            &monitor["spec"]["selector"]["matchLabels"],
            &service["metadata"]["labels"]
        ));
        let endpoint = &monitor["spec"]["endpoints"][0];
        assert_eq!(endpoint["port"], service["spec"]["ports"][0]["name"]);
        assert_eq!(endpoint["path"].as_str(), Some("/metrics"));

        // Reached on http only, and reaching out both ways only through the policy.
        let policy = named(docs, "NetworkPolicy", "smsgw");
        assert!(selects(
            &policy["spec"]["podSelector"]["matchLabels"],
            labels
        ));
        let types = policy["spec"]["policyTypes"].as_vec().expect("policyTypes");
        assert_eq!(types.len(), 2, "{overlay}: Ingress and Egress");
        for rule in policy["spec"]["ingress"].as_vec().expect("ingress") {
            assert_eq!(rule["ports"][0]["port"].as_str(), Some("http"));
        }

        // Only the webhooks are exposed, at SMSGW_PUBLIC_URL's host.
        only_webhooks_are_exposed(
            docs,
            config["data"]["SMSGW_PUBLIC_URL"].as_str().expect("url"),
        );
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

/// `make release` leaves the binary and its checksum, as `sha256sum` writes one, under a
/// name that says the version and the target. Checked on the test build, packaged as
/// `make release` packages its own (`scripts/release.sh --from`): no release build here.
#[test]
fn make_release_packages_the_binary_with_its_checksum() {
    use sha2::Digest;
    let makefile = read("Makefile");
    let recipe = makefile
        .split("\nrelease:\n")
        .nth(1)
        .expect("a release target in the Makefile");
    assert!(
        recipe
            .lines()
            .next()
            .is_some_and(|l| l.contains("scripts/release.sh"))
    );

    let out = std::env::temp_dir().join(format!("smsgw-release-{}", uuid::Uuid::new_v4()));
    let output = Command::new(repo("scripts/release.sh"))
        .args(["--from", env!("CARGO_BIN_EXE_smsgw")])
        .env("RELEASE_DIR", &out)
        .output()
        .expect("scripts/release.sh");
    assert!(output.status.success(), "{output:?}");
    let rustc = Command::new("rustc")
        .arg("-vV")
        .output()
        .expect("rustc -vV");
    let host = String::from_utf8_lossy(&rustc.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("host: ").map(str::to_owned))
        .expect("the host's target triple");
    let name = format!("smsgw-{}-{host}", env!("CARGO_PKG_VERSION"));
    let binary = std::fs::read(out.join(&name)).expect("the binary");
    let checksum = std::fs::read_to_string(out.join(format!("{name}.sha256"))).expect("sum");
    let digest = hex::encode(sha2::Sha256::digest(&binary));
    assert_eq!(checksum, format!("{digest}  {name}\n"));
    let verified = Command::new("sha256sum")
        .args(["-c", &format!("{name}.sha256")])
        .current_dir(&out)
        .output()
        .expect("sha256sum -c");
    assert!(verified.status.success(), "{verified:?}");
    let _ = std::fs::remove_dir_all(&out);
}

/// `make run` and `make test` check what they need before anything else, quickly: here,
/// where everything is in place, the check passes in well under a second.
#[test]
fn make_checks_its_prerequisites_first_and_quickly() {
    let makefile = read("Makefile");
    for (target, mode) in [("run", "run"), ("test", "test")] {
        let recipe = makefile
            .split(&format!("\n{target}:"))
            .nth(1)
            .unwrap_or_else(|| panic!("no {target} target"));
        let first = recipe.lines().nth(1).unwrap_or_default();
        assert_eq!(
            first.trim(),
            format!("@scripts/prerequisites.sh {mode}"),
            "{target}"
        );
    }
    let started = Instant::now();
    let output = Command::new(repo("scripts/prerequisites.sh"))
        .arg("test")
        .output()
        .expect("scripts/prerequisites.sh");
    assert!(output.status.success(), "{output:?}");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
}
