//! The node's metrics as a Prometheus user reads them: a real Prometheus (Debian's, installed by
//! scripts/setup.sh) scrapes l7proxy and policy-api inside the node's netns while real clients
//! (curl, librdkafka) are allowed and denied; `promtool check metrics` lints both outputs, and
//! every query of the Grafana dashboard in examples/ must return data. And the context labels:
//! they name the real workloads, and hostile values (random methods) cannot grow the series
//! past the bound.

use std::time::{Duration, Instant};

use integration::*;

const PY: &str = "/usr/bin/python3";
/// Prometheus' port inside the node's netns (a netns of its own: nothing else listens there).
const PROMETHEUS: &str = "127.0.0.1:19090";

fn star_wars_policy() -> String {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/policies/star-wars.yaml");
    std::fs::read_to_string(path).unwrap()
}

fn wait_log(node: &TestNode, log: &str, text: &str) {
    for _ in 0..200 {
        if node.log(log).contains(text) {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("{log} never said `{text}`: {}", node.log(log));
}

fn curl_as(node: &TestNode, name: &str, labels: &str, method: &str, path: &str) -> String {
    let url = format!("http://127.0.0.1:8080{path}");
    stdout(
        &node
            .l7ctl_run(name, labels, &["curl", "-sS", "--max-time", "10", "-w", " %{http_code}", "-X", method, &url])
            .unwrap(),
    )
}

/// `promtool check metrics` on what `url` serves (the classic text format, as curl asks).
fn promtool_check(node: &TestNode, url: &str) {
    let script = format!("curl -sf --max-time 5 {url} > /tmp/metrics.txt && promtool check metrics < /tmp/metrics.txt");
    let o = node.run(None, &["sh", "-c", &script]).unwrap();
    let text = node.run_ok(None, &["curl", "-sf", "--max-time", "5", url]).unwrap();
    assert!(
        o.status.success() && stdout(&o).trim().is_empty() && stderr(&o).trim().is_empty(),
        "promtool check metrics on {url}: {}{}\n{text}",
        stdout(&o),
        stderr(&o)
    );
    assert!(text.contains("l7mesh_build_info{"), "{url}: {text}");
}

/// One instant query through Prometheus' HTTP API; its `data.result`.
fn query(node: &TestNode, expr: &str) -> Vec<serde_json::Value> {
    let url = format!("http://{PROMETHEUS}/api/v1/query");
    // (Not -f: an error's body says why.)
    let body = node
        .run_ok(None, &["curl", "-sS", "--max-time", "10", "--data-urlencode", &format!("query={expr}"), &url])
        .unwrap_or_else(|e| panic!("{expr}: {e}"));
    let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{expr}: {e}: {body}"));
    assert_eq!(v["status"], "success", "{expr}: {body}");
    v["data"]["result"].as_array().cloned().unwrap_or_default()
}

/// Every `expr` of the dashboard's panels.
fn dashboard_queries() -> Vec<String> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/grafana/l7mesh-dashboard.json");
    let d: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    d["panels"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|p| p["targets"].as_array().cloned().unwrap_or_default())
        .map(|t| t["expr"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn prometheus_scrapes_the_node_and_every_dashboard_query_has_data() {
    let kafka = kafka_policy(
        "kafka",
        "kafka",
        &[kafka_from("empire-hq", 9092, &["role: produce, topic: empire-announce"]), kafka_from("admin", 9092, &[])],
    );
    let policy = format!("{}\n---\n{kafka}", star_wars_policy());
    let context = [("L7PROXY_METRICS_CONTEXT", "workload,namespace,label:class,method,status_class")];
    let mut node = kafka_node("promq", 77, &context, &policy, Broker::Tansu).unwrap();
    node.tansu_topics(&["empire-announce", "secret-plans"]).unwrap();
    let deathstar = node.copy_script("deathstar.py").unwrap();
    node.spawn_l7ctl_run("deathstar", "org=empire,class=deathstar", &[PY, "-u", &deathstar, "8080"], "deathstar.log")
        .unwrap();
    wait_log(&node, "deathstar.log", "serving");

    // Prometheus in the node's netns, scraping both processes every second.
    let tsdb = node.log_dir.join("tsdb");
    let config = node.log_dir.join("prometheus.yml");
    std::fs::write(
        &config,
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n\
         - job_name: l7mesh-proxy\n  static_configs:\n  - targets: ['127.0.0.1:15000']\n\
         - job_name: l7mesh-policy-api\n  static_configs:\n  - targets: ['127.0.0.1:9090']\n",
    )
    .unwrap();
    node.spawn(
        None,
        &[
            "prometheus",
            &format!("--config.file={}", config.display()),
            &format!("--storage.tsdb.path={}", tsdb.display()),
            &format!("--web.listen-address={PROMETHEUS}"),
        ],
        "prometheus.log",
    )
    .unwrap();

    let tie = "org=empire,class=tiefighter";
    let started = Instant::now();
    // Traffic over several scrapes, so that every rate() has two samples with a change between.
    for _ in 0..3 {
        assert_eq!(curl_as(&node, "tiefighter", tie, "POST", "/v1/request-landing"), "Ship landed\n 200");
        assert_eq!(curl_as(&node, "tiefighter", tie, "PUT", "/v1/exhaust-port"), "Access denied\r\n 403");
        let xwing = node
            .l7ctl_run(
                "xwing",
                "org=alliance,class=xwing",
                &["curl", "-sS", "--max-time", "5", "http://127.0.0.1:8080/"],
            )
            .unwrap();
        assert_eq!(xwing.status.code(), Some(7), "xwing cannot connect at all");
        let client = node.copy_script("kclient.py").unwrap();
        let k = |topic: &str| {
            out(&node
                .l7ctl_run("empire-hq", "app=empire-hq", &[PEERS_PY, &client, "produce", "127.0.0.1:9092", topic, "m"])
                .unwrap())
        };
        assert_eq!(k("empire-announce"), "OK");
        assert_eq!(k("secret-plans"), "ERROR TOPIC_AUTHORIZATION_FAILED");
        // A policy that does not validate: refused, counted.
        let bad = node
            .policy_file("bad.yaml", "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {}\n")
            .unwrap();
        let o = node.l7ctl(&["apply", "-f", bad.to_str().unwrap()]).unwrap();
        assert!(!o.status.success(), "{}", stdout(&o));
        std::thread::sleep(Duration::from_millis(1500));
    }

    // Paths a client makes up are counted under the route that served them (or `unmatched`),
    // never as themselves.
    let hostile = "for i in $(seq 1 40); do curl -s -o /dev/null http://127.0.0.1:9090/hostile-$i-$RANDOM; \
                   curl -s -o /dev/null -X BREW$i http://127.0.0.1:9090/v1/policies/k$i-$RANDOM; done";
    node.run_ok(None, &["sh", "-c", hostile]).unwrap();
    let api = node.run_ok(None, &["curl", "-sf", "--max-time", "5", "http://127.0.0.1:9090/metrics"]).unwrap();
    let routes: Vec<&str> = api.lines().filter(|l| l.starts_with("l7mesh_api_requests_total{")).collect();
    assert!(routes.len() <= 12, "{routes:#?}");
    assert!(!api.contains("hostile-") && !api.contains("BREW") && !api.contains("/v1/policies/k"), "{api}");
    assert!(routes.iter().any(|l| l.contains("route=\"unmatched\"")), "{routes:#?}");
    assert!(routes.iter().any(|l| l.contains("route=\"/v1/policies/{*key}\",method=\"other\"")), "{routes:#?}");
    promtool_check(&node, "http://127.0.0.1:15000/metrics");
    promtool_check(&node, "http://127.0.0.1:9090/metrics");

    // Both targets up, and scraped at least a few times since the traffic began.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let up = query(&node, "up == 1");
        let scrapes = query(&node, "count_over_time(up[1m])");
        let enough = scrapes.iter().all(|r| r["value"][1].as_str().unwrap_or("0").parse::<f64>().unwrap_or(0.0) >= 5.0);
        if up.len() == 2 && scrapes.len() == 2 && enough && started.elapsed() > Duration::from_secs(6) {
            break;
        }
        assert!(Instant::now() < deadline, "targets not up: {up:?}\n{}", node.log("prometheus.log"));
        std::thread::sleep(Duration::from_millis(500));
    }

    let mut empty = Vec::new();
    let queries = dashboard_queries();
    assert!(queries.len() >= 15, "{queries:?}");
    for expr in &queries {
        if query(&node, expr).is_empty() {
            empty.push(expr.clone());
        }
    }
    assert!(empty.is_empty(), "dashboard queries without data: {empty:#?}");

    // The context labels name the real workloads (never an address), as registered.
    let landed =
        query(&node, r#"l7mesh_requests_total{job="l7mesh-proxy",verdict="allowed",method="post",status_class="2xx"}"#);
    assert_eq!(landed.len(), 1, "{landed:#?}");
    let m = &landed[0]["metric"];
    assert_eq!(
        (m["source_workload"].as_str(), m["destination_workload"].as_str(), m["source_label_class"].as_str()),
        (Some("tiefighter"), Some("deathstar"), Some("tiefighter")),
        "{m}"
    );
    assert_eq!(landed[0]["value"][1], "3");
    let denied = query(&node, r#"l7mesh_requests_total{verdict="denied",method="put",status_class="4xx"}"#);
    assert_eq!(denied.len(), 1, "{denied:#?}");
    // The version in force as every part reports it, and the refused applies.
    let versions = query(&node, "l7mesh_policy_version_in_force");
    assert_eq!(versions.len(), 3, "{versions:#?}");
    let v: Vec<&str> = versions.iter().map(|r| r["value"][1].as_str().unwrap()).collect();
    assert!(v.iter().all(|x| *x == v[0]), "the parts agree: {versions:#?}");
    let refused = query(&node, r#"l7mesh_policy_rejected_applies_total{origin="api",reason="invalid"}"#);
    assert_eq!(refused.first().map(|r| r["value"][1].as_str().unwrap()), Some("3"), "{refused:#?}");
    let kafka =
        query(&node, r#"l7mesh_kafka_topic_verdicts_total{api_key="Produce",topic="(other)",verdict="denied"}"#);
    assert!(!kafka.is_empty(), "secret-plans is no topic the policy names: (other)");
    assert_eq!(kafka[0]["metric"]["source_workload"], "empire-hq");
}

/// 5,000 requests with random methods (each a valid token the client made up) from one workload:
/// they count as `other`, and the family never holds more label sets than the bound (here 3),
/// past which new label sets go to the `other` series and are counted as a tripped limit.
#[test]
fn hostile_values_do_not_grow_the_series_past_the_bound() {
    let mut node = TestNode::new("promflood").unwrap();
    let policy = node.policy_file("star-wars.yaml", &star_wars_policy()).unwrap();
    node.node_env.push(("L7PROXY_METRICS_MAX_SERIES".into(), "3".into()));
    node.start_node(&policy, &["--metrics-context", "workload,method,status_class"]).unwrap();
    let deathstar = node.copy_script("deathstar.py").unwrap();
    node.spawn_l7ctl_run("deathstar", "org=empire,class=deathstar", &[PY, "-u", &deathstar, "8080"], "deathstar.log")
        .unwrap();
    wait_log(&node, "deathstar.log", "serving");
    let tie = "org=empire,class=tiefighter";
    assert_eq!(curl_as(&node, "tiefighter", tie, "POST", "/v1/request-landing"), "Ship landed\n 200");
    assert_eq!(curl_as(&node, "tiefighter", tie, "PUT", "/v1/exhaust-port"), "Access denied\r\n 403");
    let series = |text: &str| -> Vec<String> {
        text.lines().filter(|l| l.starts_with("l7mesh_requests_total{")).map(str::to_string).collect()
    };
    let before = series(&node.admin("/metrics").unwrap());
    assert_eq!(before.len(), 2, "{before:#?}");
    assert!(before.iter().any(|l| l.contains("source_workload=\"tiefighter\"") && l.contains("method=\"post\"")));

    let flood = r#"
import http.client, random, string, sys
n, answered = int(sys.argv[1]), 0
conn = http.client.HTTPConnection("127.0.0.1", 8080, timeout=10)
for i in range(n):
    method = "".join(random.choice(string.ascii_uppercase) for _ in range(12))
    for attempt in range(2):
        try:
            conn.request(method, "/v1/request-landing")
            conn.getresponse().read()
            answered += 1
            break
        except (http.client.HTTPException, OSError):
            conn.close()
            conn = http.client.HTTPConnection("127.0.0.1", 8080, timeout=10)
print(answered)
"#;
    let o = node.l7ctl_run("tiefighter", tie, &[PY, "-c", flood, "5000"]).unwrap();
    assert_eq!(stdout(&o).trim(), "5000", "{}", stderr(&o));
    // Two more legitimate label sets: the third fits the bound, the fourth does not.
    assert_eq!(curl_as(&node, "tiefighter", tie, "GET", "/v1/request-landing").split(' ').next_back(), Some("403"));
    curl_as(&node, "tiefighter", tie, "DELETE", "/v1/request-landing");

    let text = node.admin("/metrics").unwrap();
    let after = series(&text);
    // The bound's 3 label sets, and one `other` set per fixed label set past it (at most one
    // per verdict here).
    assert!(after.len() <= 5, "{after:#?}");
    let other: f64 = after
        .iter()
        .filter(|l| l.contains("method=\"other\""))
        .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
        .sum();
    assert!(other >= 5000.0, "every random method counts as other: {after:#?}");
    assert!(!text.contains("method=\"X") && !text.contains("127.0.0.1"), "no client value nor address in a label");
    let tripped = node.metric(r#"l7mesh_limits_tripped_total{limit="metrics_series"}"#);
    assert!(tripped >= 1.0, "{text}");
}
