//! Kafka topic policy through the proxy, against a real broker (Tansu) and a real client
//! (confluent-kafka / librdkafka), through the real redirector.

use integration::*;

/// The getting-started policy: who may produce and consume which topic, a janitor with
/// per-API rules, and an admin allowed at L4.
fn policy() -> String {
    kafka_policy(
        "kafka",
        "kafka",
        &[
            kafka_from(
                "empire-hq",
                9092,
                &["role: produce, topic: deathstar-plans", "role: produce, topic: empire-announce"],
            ),
            kafka_from("empire-outpost", 9092, &["role: consume, topic: empire-announce"]),
            kafka_from("empire-backup", 9092, &["role: consume, topic: deathstar-plans"]),
            kafka_from(
                "janitor",
                9092,
                &[
                    "apiKey: apiversions",
                    "apiKey: metadata",
                    "apiKey: deletetopics, topic: scratch",
                    "apiKey: createtopics, topic: fresh",
                ],
            ),
            kafka_from("admin", 9092, &[]),
        ],
    )
}

#[test]
fn getting_started_kafka_policy_with_a_real_broker_and_client() {
    let node = kafka_node("kafka", 55, &[], &policy(), Broker::Tansu).unwrap();
    node.tansu_topics(&["deathstar-plans", "empire-announce", "secret-plans", "scratch"]).unwrap();
    let client = std::path::PathBuf::from(node.copy_script("kclient.py").unwrap());
    let k = |who: &str, args: &[&str]| {
        let labels = format!("app={who}");
        let mut cmd = vec![PEERS_PY, client.to_str().unwrap()];
        cmd.extend_from_slice(args);
        out(&node.l7ctl_run(who, &labels, &cmd).unwrap())
    };
    let b = "127.0.0.1:9092";
    let first = k("empire-hq", &["produce", b, "deathstar-plans", "plans for the death star"]);
    assert_eq!(first, "OK", "{}", node.node_log());
    assert_eq!(k("empire-hq", &["produce", b, "empire-announce", "the emperor arrives"]), "OK");
    assert_eq!(k("empire-hq", &["produce", b, "secret-plans", "nope"]), "ERROR TOPIC_AUTHORIZATION_FAILED");
    assert_eq!(k("empire-outpost", &["consume", b, "empire-announce"]), "the emperor arrives");
    assert_eq!(k("empire-outpost", &["consume", b, "deathstar-plans"]), "ERROR TOPIC_AUTHORIZATION_FAILED");
    assert_eq!(k("empire-outpost", &["produce", b, "empire-announce", "forged"]), "ERROR TOPIC_AUTHORIZATION_FAILED");
    assert_eq!(k("empire-backup", &["consume", b, "deathstar-plans"]), "plans for the death star");

    // Malformed input: random bytes, a truncated frame, a frame over the bound: clean close,
    // and the proxy keeps serving.
    assert_eq!(k("empire-hq", &["raw", b, "00000005ffff"]), "CLOSED", "truncated frame");
    assert_eq!(k("empire-hq", &["raw", b, "7fffffff00"]), "CLOSED", "frame over the bound");
    assert_eq!(k("empire-hq", &["raw", b, "00000004deadbeef"]), "CLOSED", "unknown api key");
    // Small frames that claim huge arrays or byte strings (found by the kafka_request fuzz
    // target): the codec once allocated what they claimed, and the failed allocation aborted the
    // whole proxy. Now each is a malformed frame that closes its own connection only.
    let proxy_pid = node.pid_of("l7proxy");
    // CreateTopics v2, client "x": a topics array of i32::MAX entries.
    assert_eq!(k("empire-hq", &["raw", b, "0000001100130002000000070001787fffffff0000"]), "CLOSED");
    // Metadata v12 (flexible): a compact topics array of u32::MAX - 1 entries.
    assert_eq!(k("empire-hq", &["raw", b, concat!("000000130003000c00000007000178", "00ffffffff0f0000")]), "CLOSED");
    // SaslAuthenticate v0: auth bytes claiming 2 GiB.
    assert_eq!(k("empire-hq", &["raw", b, concat!("000000100024000000000007000178", "7fffffff01")]), "CLOSED");
    assert_eq!(node.pid_of("l7proxy"), proxy_pid, "l7proxy was not restarted: {}", node.node_log());
    assert_eq!(k("empire-hq", &["produce", b, "deathstar-plans", "still here"]), "OK");
    // An API with no topic that the role does not include: its own response type with
    // GROUP_AUTHORIZATION_FAILED (30), and the connection stays open.
    assert_eq!(k("empire-hq", &["heartbeat", b]), "heartbeat=30 apiversions=0");

    let flows: Vec<serde_json::Value> =
        node.flows().unwrap().into_iter().filter(|f| f["l7"]["type"] == "kafka").collect();
    let denied_produce = flows
        .iter()
        .find(|f| f["l7"]["kafka"]["topic"] == "secret-plans" && f["l7"]["kafka"]["error_code"] == 29)
        .unwrap_or_else(|| panic!("{flows:#?}"));
    assert_eq!(denied_produce["source"]["workload"], "empire-hq");
    assert_eq!(denied_produce["destination"]["workload"], "kafka");
    assert_eq!(denied_produce["policy_name"], "default/kafka", "Kafka flows name the deciding policy");
    assert!(flows.iter().any(|f| f["l7"]["kafka"]["api_key"] == "Fetch"
        && f["l7"]["kafka"]["topic"] == "empire-announce"
        && f["verdict"] == "ALLOWED"));
    // aiokafka puts both topics of one batch window in one Produce request: the allowed one is
    // written, the denied one gets the authorization error.
    let aio = node.log_dir.join("aioclient.py");
    std::fs::copy(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/aioclient.py"), &aio).unwrap();
    let o = node
        .l7ctl_run(
            "empire-hq",
            "app=empire-hq",
            &[PEERS_PY, aio.to_str().unwrap(), "produce2", b, "empire-announce", "secret-plans"],
        )
        .unwrap();
    assert_eq!(out(&o), "OK TopicAuthorizationFailedError", "{}", String::from_utf8_lossy(&o.stderr));
    let kafka_flows: Vec<serde_json::Value> =
        node.flows().unwrap().into_iter().filter(|f| f["l7"]["type"] == "kafka").collect();
    let mixed = kafka_flows.iter().any(|denied| {
        let k = &denied["l7"]["kafka"];
        k["api_key"] == "Produce"
            && k["topic"] == "secret-plans"
            && k["client_id"].as_str().is_some_and(|c| c.starts_with("aiokafka"))
            && kafka_flows.iter().any(|allowed| {
                let a = &allowed["l7"]["kafka"];
                a["topic"] == "empire-announce"
                    && a["error_code"] == 0
                    && a["correlation_id"] == k["correlation_id"]
                    && a["client_id"] == k["client_id"]
            })
    });
    assert!(mixed, "one Produce request carried both topics");
    // A consumer group through the proxy: find coordinator, join, sync, heartbeat, fetch, commit.
    let o = node
        .l7ctl_run(
            "empire-outpost",
            "app=empire-outpost",
            &[PEERS_PY, aio.to_str().unwrap(), "group", b, "empire-announce", "outposts"],
        )
        .unwrap();
    assert_eq!(out(&o), "the emperor arrives committed=1", "{}", String::from_utf8_lossy(&o.stderr));
    // librdkafka's admin API may delete only `scratch` and create only `fresh`: one client, one
    // denial after another, each TOPIC_AUTHORIZATION_FAILED on a connection that keeps working.
    let admin = k(
        "janitor",
        &["admin", b, "delete:deathstar-plans", "delete:scratch,secret-plans", "create:evil", "create:fresh", "list"],
    );
    assert_eq!(
        admin.lines().collect::<Vec<_>>(),
        [
            "delete deathstar-plans=TOPIC_AUTHORIZATION_FAILED",
            "delete scratch=OK secret-plans=TOPIC_AUTHORIZATION_FAILED",
            "create evil=TOPIC_AUTHORIZATION_FAILED",
            "create fresh=OK",
            "list deathstar-plans,empire-announce,fresh,secret-plans",
        ],
        "{}",
        node.node_log()
    );
    // librdkafka asks Tansu for telemetry subscriptions, which no janitor rule allows: the answer
    // is GetTelemetrySubscriptions' own response with 31, and the admin client went on above.
    let telemetry: Vec<_> = node
        .flows()
        .unwrap()
        .into_iter()
        .filter(|f| f["l7"]["kafka"]["api_key"] == "GetTelemetrySubscriptions" && f["source"]["workload"] == "janitor")
        .map(|f| (f["verdict"].as_str().unwrap_or("").to_string(), f["l7"]["kafka"]["error_code"].as_i64()))
        .collect();
    assert!(!telemetry.is_empty(), "librdkafka asked for telemetry");
    assert!(telemetry.iter().all(|t| t.0 == "DENIED" && t.1 == Some(31)), "{telemetry:?}");
    // The broker never saw the denied produce.
    let o = node
        .l7ctl_run(
            "empire-backup",
            "app=empire-backup",
            &[PEERS_PY, client.to_str().unwrap(), "consume", b, "deathstar-plans"],
        )
        .unwrap();
    assert_eq!(out(&o), "plans for the death star");
}
