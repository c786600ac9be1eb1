//! The Grafana dashboard and the Prometheus alert rules in `deploy/`: every expression
//! parses, and names only metrics, labels and label values that a running daemon exports;
//! the plain rules file and the Kubernetes `PrometheusRule` hold the same rules; each alert
//! has its runbook; and, when promtool is installed, the rules pass `promtool check rules`
//! and their unit tests (`promtool test rules`).

mod helpers;

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    process::Command,
    time::{Duration, Instant},
};

use promql_parser::{
    label::{MatchOp, Matcher},
    parser::{self, Expr, LabelModifier},
};
use regex::Regex;
use serde_json::Value;
use yaml_rust2::{Yaml, YamlLoader};

use helpers::{App, PATIENCE, Reply, id_of, job, spawn_app_with, twilio_stub};

const SCHOOL: i64 = 42;
const PUBLIC: &str = "https://smsgw.example.com";
const RULES: &str = "deploy/prometheus/smsgw.rules.yml";
const RULE_TESTS: &str = "deploy/prometheus/smsgw.rules.test.yml";
const PROMETHEUS_RULE: &str =
    "deploy/kubernetes/components/prometheus-operator/prometheusrule.yaml";
const DASHBOARD: &str = "deploy/grafana/smsgw.json";

fn repo(path: &str) -> String {
    format!("{}/{path}", env!("CARGO_MANIFEST_DIR"))
}

fn read(path: &str) -> String {
    std::fs::read_to_string(repo(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn yaml(path: &str) -> Yaml {
    let mut docs = YamlLoader::load_from_str(&read(path)).unwrap_or_else(|e| panic!("{path}: {e}"));
    assert_eq!(docs.len(), 1, "{path}: one document");
    docs.remove(0)
}

fn dashboard() -> Value {
    serde_json::from_str(&read(DASHBOARD)).expect("the dashboard is JSON")
}

/// Every alert rule of the plain rules file.
fn rules() -> Vec<Yaml> {
    let rules = yaml(RULES);
    let groups = rules["groups"].as_vec().expect("groups");
    groups
        .iter()
        .flat_map(|g| g["rules"].as_vec().expect("rules").clone())
        .collect()
}

/// What one scrape of `/metrics` shows: each exported sample name, and each label set
/// seen on a series of it.
#[derive(Debug, Default)]
struct Exposition {
    names: BTreeSet<String>,
    series: HashMap<String, Vec<BTreeMap<String, String>>>,
}

impl Exposition {
    fn parse(text: &str) -> Exposition {
        let mut exposition = Exposition::default();
        for line in text.lines() {
            if let Some(declared) = line.strip_prefix("# TYPE ") {
                exposition.declare(declared);
            } else if !line.starts_with('#') && !line.trim().is_empty() {
                let (name, labels) = series_of(line);
                exposition.names.insert(name.clone());
                exposition.series.entry(name).or_default().push(labels);
            }
        }
        exposition
    }

    /// A family with no series yet still names its samples: a counter's `_total`, a
    /// histogram's `_bucket`, `_sum` and `_count`.
    fn declare(&mut self, declared: &str) {
        let mut words = declared.split_whitespace();
        let (Some(name), Some(kind)) = (words.next(), words.next()) else {
            return;
        };
        let suffixes: &[&str] = match kind {
            "counter" => &["_total"],
            "histogram" => &["_bucket", "_sum", "_count"],
            "summary" => &["", "_sum", "_count"],
            _ => &[""],
        };
        for suffix in suffixes {
            self.names.insert(format!("{name}{suffix}"));
        }
    }

    fn labels(&self, metric: &str) -> BTreeSet<&str> {
        self.series
            .get(metric)
            .into_iter()
            .flatten()
            .flat_map(|labels| labels.keys().map(String::as_str))
            .collect()
    }

    fn values(&self, metric: &str, label: &str) -> BTreeSet<&str> {
        self.series
            .get(metric)
            .into_iter()
            .flatten()
            .filter_map(|labels| labels.get(label).map(String::as_str))
            .collect()
    }
}

/// `name{a="x",b="y"} 1` as its name and labels (smsgw's values hold no `"` or `,`).
fn series_of(line: &str) -> (String, BTreeMap<String, String>) {
    let end = line.find([' ', '{']).unwrap_or(line.len());
    let name = line[..end].to_owned();
    let mut labels = BTreeMap::new();
    if line[end..].starts_with('{') {
        let inside = &line[end + 1..line.rfind('}').unwrap_or(line.len())];
        for pair in inside.split("\",").filter(|p| !p.is_empty()) {
            if let Some((key, value)) = pair.split_once('=') {
                labels.insert(key.to_owned(), value.trim_matches('"').to_owned());
            }
        }
    }
    (name, labels)
}

/// Checks one PromQL expression against what the daemon exports; the problems found.
struct Checker<'a> {
    exported: &'a Exposition,
    source: String,
    problems: Vec<String>,
}

impl Checker<'_> {
    fn problem(&mut self, text: String) {
        self.problems.push(format!("{}: {text}", self.source));
    }

    /// The metrics an expression reads, each checked with its matchers; grouping labels
    /// checked against them.
    fn walk(&mut self, expr: &Expr) -> Vec<String> {
        match expr {
            Expr::VectorSelector(vs) => self.selector(vs),
            Expr::MatrixSelector(ms) => self.selector(&ms.vs),
            Expr::Aggregate(agg) => {
                let metrics = self.walk(&agg.expr);
                if let Some(param) = &agg.param {
                    self.walk(param);
                }
                self.grouping(agg.modifier.as_ref(), &metrics);
                metrics
            }
            Expr::Binary(bin) => {
                let mut metrics = self.walk(&bin.lhs);
                metrics.extend(self.walk(&bin.rhs));
                let matching = bin.modifier.as_ref().and_then(|m| m.matching.as_ref());
                self.grouping(matching, &metrics);
                metrics
            }
            Expr::Paren(p) => self.walk(&p.expr),
            Expr::Unary(u) => self.walk(&u.expr),
            Expr::Subquery(s) => self.walk(&s.expr),
            Expr::Call(call) => call.args.args.iter().flat_map(|a| self.walk(a)).collect(),
            Expr::NumberLiteral(_) | Expr::StringLiteral(_) | Expr::Extension(_) => Vec::new(),
        }
    }

    fn selector(&mut self, vs: &parser::VectorSelector) -> Vec<String> {
        let name = vs.name.clone().or_else(|| {
            vs.matchers
                .matchers
                .iter()
                .find(|m| m.name == "__name__")
                .map(|m| m.value.clone())
        });
        let Some(name) = name else {
            self.problem("a selector without a metric name".into());
            return Vec::new();
        };
        if !self.exported.names.contains(&name) {
            self.problem(format!("{name} is not a metric smsgw exports"));
            return Vec::new();
        }
        for matcher in vs.matchers.matchers.iter().filter(|m| m.name != "__name__") {
            self.matcher(&name, matcher);
        }
        vec![name]
    }

    fn matcher(&mut self, metric: &str, matcher: &Matcher) {
        if !self.exported.series.contains_key(metric) {
            self.problem(format!(
                "{metric} has no series in the scrape: the test must make one appear"
            ));
            return;
        }
        let label = matcher.name.as_str();
        if !self.exported.labels(metric).contains(label) {
            self.problem(format!("{metric} has no label '{label}'"));
            return;
        }
        let seen = self.exported.values(metric, label);
        let wanted: Vec<&str> = match &matcher.op {
            MatchOp::Equal => vec![matcher.value.as_str()],
            // Each alternative of a regex must match a value smsgw really gives the label.
            MatchOp::Re(_) => matcher.value.split('|').collect(),
            MatchOp::NotEqual | MatchOp::NotRe(_) => Vec::new(),
        };
        for value in wanted {
            let pattern = Regex::new(&format!("^(?:{value})$")).expect("a regex");
            let matched = match matcher.op {
                MatchOp::Equal => seen.contains(value),
                _ => seen.iter().any(|v| pattern.is_match(v)),
            };
            if !matched {
                self.problem(format!(
                    "{metric}{{{label}}} is never '{value}' (seen: {seen:?})"
                ));
            }
        }
    }

    fn grouping(&mut self, modifier: Option<&LabelModifier>, metrics: &[String]) {
        let Some(modifier) = modifier else { return };
        // Prometheus adds these to every series it scrapes.
        let target = ["instance", "job"];
        for label in modifier
            .labels()
            .labels
            .iter()
            .filter(|l| !target.contains(&l.as_str()))
        {
            let known = metrics
                .iter()
                .any(|m| self.exported.labels(m).contains(label.as_str()));
            if !known {
                self.problem(format!("no metric of {metrics:?} has the label '{label}'"));
            }
        }
    }
}

/// The Grafana variables of an expression, as Prometheus would see them.
fn without_variables(expr: &str) -> String {
    expr.replace("$__rate_interval", "5m")
        .replace("$__interval", "1m")
        .replace("$provider", ".+")
}

/// Every PromQL expression of the dashboard and the rules, with where it comes from.
fn expressions() -> Vec<(String, String)> {
    let mut all = Vec::new();
    let dashboard = dashboard();
    for panel in dashboard["panels"].as_array().expect("panels") {
        for target in panel["targets"].as_array().into_iter().flatten() {
            let title = panel["title"].as_str().unwrap_or("?");
            let expr = target["expr"].as_str().expect("a target's expr");
            all.push((format!("{DASHBOARD} '{title}'"), without_variables(expr)));
        }
    }
    for rule in rules() {
        let name = rule["alert"].as_str().or(rule["record"].as_str());
        let expr = rule["expr"].as_str().expect("a rule's expr");
        all.push((format!("{RULES} {}", name.unwrap_or("?")), expr.to_owned()));
    }
    all
}

/// `label_values(metric, label)` of the dashboard's variables.
fn variable_queries() -> Vec<(String, String)> {
    let pattern = Regex::new(r"^label_values\(\s*(\w+)\s*,\s*(\w+)\s*\)$").expect("regex");
    let dashboard = dashboard();
    let mut queries = Vec::new();
    for variable in dashboard["templating"]["list"]
        .as_array()
        .expect("variables")
    {
        if variable["type"] != "query" {
            continue;
        }
        let query = variable["query"]["query"]
            .as_str()
            .or(variable["query"].as_str())
            .unwrap_or_default();
        let found = pattern.captures(query).unwrap_or_else(|| {
            panic!("variable query '{query}' is not label_values(metric, label)")
        });
        queries.push((found[1].to_owned(), found[2].to_owned()));
    }
    queries
}

fn problems_with(exported: &Exposition) -> Vec<String> {
    let mut problems = Vec::new();
    for (source, expr) in expressions() {
        let parsed = match parser::parse(&expr) {
            Ok(parsed) => parsed,
            Err(e) => {
                problems.push(format!("{source}: not PromQL ({e}): {expr}"));
                continue;
            }
        };
        let mut checker = Checker {
            exported,
            source,
            problems: Vec::new(),
        };
        checker.walk(&parsed);
        problems.extend(checker.problems);
    }
    for (metric, label) in variable_queries() {
        if !exported.labels(&metric).contains(label.as_str()) {
            problems.push(format!(
                "{DASHBOARD} variable: {metric} has no label '{label}'"
            ));
        }
    }
    problems
}

/// Drives the daemon through what makes each labelled series appear: a job of every
/// type, an announcement, an invalid job, a provider error and a delivery receipt.
async fn drive(app: &App) {
    app.add_school(SCHOOL, "GB").await;
    let mut sent = Vec::new();
    for (i, kind) in smsgw::job::JobType::ALL.iter().enumerate() {
        let mut job = job(
            kind.as_str(),
            SCHOOL,
            &format!("+4477009001{i:02}"),
            "Hello",
        );
        if *kind == smsgw::job::JobType::Announcement {
            job.as_object_mut().map(|o| o.remove("to"));
            job["recipients"] = serde_json::json!([{"to": "+447700900150", "ref": "user-1"}]);
        } else {
            sent.push(id_of(&job));
        }
        app.publish(&job).await;
    }
    app.stub.reply_for(
        "+447700900199",
        Reply::error(400, 21211, "Invalid 'To' number"),
    );
    let refused = job("booking_change", SCHOOL, "+447700900199", "Changed");
    app.publish(&refused).await;
    app.publish_raw("login_code", "not-a-job", b"{\"id\": 1}")
        .await;
    for id in &sent {
        app.wait_for_status(*id, "sent").await;
    }
    app.wait_for_status(id_of(&refused), "failed").await;
    let sid = app
        .message(sent[0])
        .await
        .and_then(|row| row.provider_message_id)
        .expect("a provider id");
    let answer = app
        .post_twilio(
            PUBLIC,
            "/webhooks/twilio/status",
            &[
                ("AccountSid", twilio_stub::ACCOUNT_SID),
                ("MessageSid", &sid),
                ("MessageStatus", "delivered"),
            ],
            None,
        )
        .await;
    assert!(answer.status().is_success(), "receipt: {}", answer.status());
}

/// `/metrics` once the queue depths have been read (every few seconds).
async fn scrape_with_depths(app: &App) -> Exposition {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let exposition = Exposition::parse(&app.metrics().await);
        let ready = exposition.series.contains_key("smsgw_queue_depth")
            && exposition
                .series
                .contains_key("smsgw_receipt_delay_seconds_count");
        if ready {
            return exposition;
        }
        assert!(Instant::now() < deadline, "no queue depths in /metrics");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_dashboard_and_the_alerts_read_only_what_the_daemon_exports() {
    let app = spawn_app_with(&[("SMSGW_PUBLIC_URL", PUBLIC)]).await;
    drive(&app).await;
    let exported = scrape_with_depths(&app).await;

    let problems = problems_with(&exported);
    assert!(problems.is_empty(), "{}", problems.join("\n"));

    // The checks can fail: a misspelled metric, label or value is caught.
    let mut broken = Exposition {
        names: exported.names.clone(),
        series: exported.series.clone(),
    };
    broken.names.remove("smsgw_dead_letters_total");
    broken.series.remove("smsgw_dead_letters_total");
    let found = problems_with(&broken);
    assert!(
        found
            .iter()
            .any(|p| p.contains("smsgw_dead_letters_total is not a metric smsgw exports")),
        "{found:?}"
    );
    let mut checker = Checker {
        exported: &exported,
        source: "test".into(),
        problems: Vec::new(),
    };
    for typo in [
        r#"sum(rate(smsgw_mesages_total[5m]))"#,
        r#"smsgw_queue_depth{queue="sms.urgnet"}"#,
        r#"smsgw_messages_total{type=~"login_code|booking_chnage"}"#,
        r#"sum by (lanes) (smsgw_in_flight)"#,
        r#"smsgw_circuit_state{providr="twilio"}"#,
    ] {
        let before = checker.problems.len();
        checker.walk(&parser::parse(typo).expect("PromQL"));
        assert!(checker.problems.len() > before, "not caught: {typo}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn series_that_wait_for_an_event_start_at_zero() {
    let app = spawn_app_with(&[]).await;
    let text = app.metrics().await;
    for expected in [
        r#"smsgw_circuit_state{provider="twilio"} 0"#,
        r#"smsgw_paused_total{provider="twilio"} 0"#,
        r#"smsgw_provider_call_duration_seconds_count{provider="twilio"} 0"#,
        r#"smsgw_dead_letters_total{reason="invalid_job"} 0"#,
        r#"smsgw_dead_letters_total{reason="outcome_unknown"} 0"#,
        r#"smsgw_suppressed_total{reason="recipient_limit"} 0"#,
        r#"smsgw_suppressed_total{reason="international_limit"} 0"#,
        r#"smsgw_suppressed_total{reason="budget_exhausted"} 0"#,
        r#"smsgw_retries_total{lane="bulk"} 0"#,
        r#"smsgw_in_flight{lane="urgent"} 0"#,
        r#"smsgw_send_latency_seconds_count{lane="default"} 0"#,
        "smsgw_ready 1",
    ] {
        assert!(text.contains(expected), "missing {expected}:\n{text}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_daemon_that_loses_its_database_reports_not_ready_in_its_metrics() {
    let app = helpers::spawn_app_behind_proxies(&[], false, true).await;
    assert!(app.metrics().await.contains("smsgw_ready 1"));
    let proxy = app.db_proxy.as_ref().expect("a database proxy");
    proxy.refuse(true);
    proxy.cut();
    let deadline = Instant::now() + PATIENCE;
    while !app.metrics().await.contains("smsgw_ready 0") {
        assert!(Instant::now() < deadline, "still reported ready");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[test]
fn the_prometheus_rule_holds_the_same_rules_as_the_rules_file() {
    let plain = yaml(RULES);
    let resource = yaml(PROMETHEUS_RULE);
    assert_eq!(
        resource["apiVersion"].as_str(),
        Some("monitoring.coreos.com/v1")
    );
    assert_eq!(resource["kind"].as_str(), Some("PrometheusRule"));
    assert_eq!(resource["spec"]["groups"], plain["groups"]);
}

#[test]
fn every_alert_says_how_bad_and_has_a_runbook() {
    let operations = read("docs/operations.md");
    for rule in rules() {
        let name = rule["alert"].as_str().expect("an alert");
        assert!(rule["for"].as_str().is_some(), "{name}: no 'for'");
        let severity = rule["labels"]["severity"].as_str();
        assert!(
            matches!(severity, Some("critical" | "warning")),
            "{name}: severity {severity:?}"
        );
        for annotation in ["summary", "description"] {
            assert!(
                rule["annotations"][annotation].as_str().is_some(),
                "{name}: no {annotation}"
            );
        }
        assert!(
            operations.contains(&format!("#### {name}")),
            "docs/operations.md has no runbook entry '#### {name}'"
        );
    }
}

#[test]
fn the_dashboard_imports_anywhere() {
    let dashboard = dashboard();
    assert_eq!(dashboard["uid"], "smsgw");
    let variables = dashboard["templating"]["list"]
        .as_array()
        .expect("variables");
    assert!(
        variables
            .iter()
            .any(|v| v["name"] == "datasource" && v["type"] == "datasource"),
        "a data source variable, so that an import picks the local Prometheus"
    );
    let mut ids = BTreeSet::new();
    for panel in dashboard["panels"].as_array().expect("panels") {
        assert!(ids.insert(panel["id"].to_string()), "panel ids are unique");
        if panel["type"] == "row" {
            continue;
        }
        let title = panel["title"].as_str().unwrap_or("?");
        // A data source fixed by uid exists only in the Grafana it was exported from.
        assert_eq!(panel["datasource"]["uid"], "${datasource}", "{title}");
        for target in panel["targets"].as_array().expect("targets") {
            assert_eq!(target["datasource"]["uid"], "${datasource}", "{title}");
        }
    }
}

#[test]
fn promtool_accepts_the_rules_and_their_tests_pass() {
    if Command::new("promtool").arg("--version").output().is_err() {
        eprintln!("promtool is not installed: skipping its checks");
        return;
    }
    for args in [["check", "rules", RULES], ["test", "rules", RULE_TESTS]] {
        let output = Command::new("promtool")
            .args(&args[..2])
            .arg(repo(args[2]))
            .output()
            .expect("promtool runs");
        assert!(
            output.status.success(),
            "promtool {args:?}:\n{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
}
