//! Kafka's topic-administration and offset APIs judged per topic, against the reference peer:
//! an Apache Kafka 4 broker in KRaft mode with the Java AdminClient, and librdkafka's admin API
//! (confluent-kafka), through the real redirector and proxy. One broker (one JVM) serves every
//! case. Each denial must come back as the API's authorization error on a connection that
//! keeps working (the operations after it succeed on the same client), and the topic survives.

use integration::*;

/// `ops` may delete only `scratch`, create only `fresh`, and touch partitions, records,
/// configs and group offsets only of `open`; `admin` has no L7 rule (sets up and checks). The
/// broker's own connection to its controller listener (9093) is allowed at L4.
fn policy() -> String {
    let open = ["createpartitions", "deleterecords", "describeconfigs", "incrementalalterconfigs", "offsetcommit"]
        .into_iter()
        .chain(["offsetfetch", "offsetdelete"])
        .map(|api| format!("apiKey: {api}, topic: open"));
    let mut ops: Vec<String> =
        ["apiversions", "metadata", "findcoordinator", "listoffsets", "describetopicpartitions", "describecluster"]
            .iter()
            .map(|api| format!("apiKey: {api}"))
            .collect();
    ops.extend(["apiKey: deletetopics, topic: scratch".into(), "apiKey: createtopics, topic: fresh".into()]);
    ops.extend(open);
    let ops: Vec<&str> = ops.iter().map(String::as_str).collect();
    kafka_policy(
        "kafka-admin",
        "kafka",
        &[
            kafka_from("ops", 9092, &ops),
            kafka_from("writer", 9092, &["role: produce, topic: open"]),
            kafka_from("admin", 9092, &[]),
            KAFKA_CONTROLLER_INGRESS.to_string(),
        ],
    )
}

#[test]
fn topic_admin_apis_are_judged_per_topic_on_apache_kafka() {
    let node = kafka_node("kafka-admin", 56, &[], &policy(), Broker::Apache).unwrap();
    let admin =
        |ops: &[&str]| node.kadmin("admin", "app=admin", ops).unwrap_or_else(|e| panic!("{e:#}\n{}", node.node_log()));
    let setup = admin(&[
        "create:open,precious,precious2,scratch,scratch2,scratch3",
        "produce:precious",
        "produce:open",
        "commit:precious",
    ]);
    assert_eq!(
        setup,
        [
            "create open=OK precious=OK precious2=OK scratch=OK scratch2=OK scratch3=OK",
            "produce precious=OK",
            "produce open=OK",
            "commit precious=OK",
        ],
        "{}",
        node.log("apache-kafka.log")
    );

    // The Java AdminClient, one client for every operation: each denial is the API's own
    // authorization error, and the next operation still works.
    let java = node
        .kadmin(
            "ops",
            "app=ops",
            &[
                "delete:precious",
                "delete:precious2,scratch",
                "delete-id:precious",
                "create:evil",
                "create:fresh,evil2",
                "partitions:precious",
                "delete-records:precious",
                "describe-configs:precious",
                "alter-configs:precious",
                "commit:precious",
                "fetch-offsets:precious",
                "delete-offsets:precious",
                "partitions:open",
                "delete-records:open",
                "describe-configs:open",
                "alter-configs:open",
                "commit:open",
                "fetch-offsets:open",
                "delete-offsets:open",
                "list",
            ],
        )
        .unwrap_or_else(|e| panic!("{e:#}\n{}", node.node_log()));
    let denied = "TopicAuthorizationException";
    assert_eq!(
        java,
        [
            format!("delete precious={denied}"),
            format!("delete precious2={denied} scratch=OK"),
            format!("delete-id precious={denied}"),
            format!("create evil={denied}"),
            format!("create evil2={denied} fresh=OK"),
            format!("partitions precious={denied}"),
            format!("delete-records precious={denied}"),
            format!("describe-configs precious={denied}"),
            format!("alter-configs precious={denied}"),
            format!("commit precious={denied}"),
            // The AdminClient skips a partition whose offset fetch failed: the committed offset
            // (1, by admin) does not leak.
            "fetch-offsets precious=absent".into(),
            format!("delete-offsets precious={denied}"),
            "partitions open=OK".into(),
            "delete-records open=OK".into(),
            "describe-configs open=OK".into(),
            "alter-configs open=OK".into(),
            "commit open=OK".into(),
            "fetch-offsets open=offset1".into(),
            "delete-offsets open=OK".into(),
            "list fresh,open,precious,precious2,scratch2,scratch3".into(),
        ],
        "{}",
        node.node_log()
    );

    // librdkafka's admin API against the same broker: one client, several denials, then it
    // still lists topics (the connection survived GetTelemetrySubscriptions' denial too).
    let client = node.copy_script("kclient.py").unwrap();
    let o = node
        .l7ctl_run(
            "ops",
            "app=ops",
            &[
                PEERS_PY,
                &client,
                "admin",
                "127.0.0.1:9092",
                "delete:precious",
                "delete:precious2,scratch2",
                "create:evil3",
                "partitions:precious",
                "delete-records:precious",
                "describe-configs:precious",
                "alter-configs:precious",
                "commit:precious",
                "fetch-offsets:kadmin/precious",
                "fetch-offsets:kadmin/open",
                "list",
            ],
        )
        .unwrap();
    let rd = String::from_utf8_lossy(&o.stdout).to_string();
    let denied = "TOPIC_AUTHORIZATION_FAILED";
    assert_eq!(
        rd.lines().collect::<Vec<_>>(),
        [
            format!("delete precious={denied}"),
            format!("delete precious2={denied} scratch2={denied}"),
            format!("create evil3={denied}"),
            format!("partitions precious={denied}"),
            format!("delete-records precious={denied}"),
            format!("describe-configs precious={denied}"),
            format!("alter-configs precious={denied}"),
            format!("commit precious={denied}"),
            // The offset admin committed (1) does not leak; `open`'s was deleted by the allowed
            // delete-offsets above (-1001: no offset).
            format!("fetch-offsets precious={denied}"),
            "fetch-offsets open=offset-1001".into(),
            "list fresh,open,precious,precious2,scratch2,scratch3".into(),
        ],
        "{}\n{}",
        String::from_utf8_lossy(&o.stderr),
        node.node_log()
    );

    // DeleteTopics built by hand, old and new versions, as an attacker's client would: the same
    // topic twice, an empty name, a topic ID (v6), mixed with the one allowed topic. Each gets
    // its own entry, and the connection still answers ApiVersions.
    let ids = admin(&["create:scratch", "id:precious"]);
    assert_eq!(ids[0], "create scratch=OK");
    let id = ids[1].trim_start_matches("id ").to_string();
    let raw = |version: &str, names: &[&str]| {
        let mut cmd = vec![PEERS_PY, client.as_str(), "rawdelete", "127.0.0.1:9092", version];
        cmd.extend_from_slice(names);
        let o = node.l7ctl_run("ops", "app=ops", &cmd).unwrap();
        format!("{}{}", String::from_utf8_lossy(&o.stdout).trim(), String::from_utf8_lossy(&o.stderr).trim())
    };
    assert_eq!(raw("1", &["precious", "precious", ""]), "=29 precious=29 precious=29 apiversions=0");
    assert_eq!(raw("3", &["precious2"]), "precious2=29 apiversions=0");
    assert_eq!(raw("4", &["precious2", "scratch", "precious2"]), "precious2=29 precious2=29 scratch=0 apiversions=0");
    assert_eq!(raw("5", &["", "precious"]), "=29 precious=29 apiversions=0");
    let by_id = format!("id:{id}");
    assert_eq!(raw("6", &[&by_id, "precious2"]), format!("{by_id}=29 precious2=29 apiversions=0"));

    // The Java producer (idempotent, the client's newest versions, capped by the proxy's
    // ApiVersions) under `role: produce` of `open`: it writes `open`, and `precious` is refused.
    let writer = node.kadmin("writer", "app=writer", &["produce:open", "produce:precious"]).unwrap();
    assert_eq!(writer, ["produce open=OK", "produce TopicAuthorizationException"], "{}", node.node_log());

    // Auto-creation through Metadata (the broker has auto.create.topics.enable): librdkafka's
    // producer to a missing topic asks Metadata to create it; that is judged as CreateTopics of
    // the topic, denied, and the broker is asked not to create it.
    let o = node
        .l7ctl_run("writer", "app=writer", &[PEERS_PY, &client, "produce", "127.0.0.1:9092", "auto-evil", "x"])
        .unwrap();
    let produced = String::from_utf8_lossy(&o.stdout).trim().to_string();
    assert!(produced.starts_with("ERROR"), "{produced}");

    // kafka-tools' TopicCommand deleting by pattern: it lists the topics (Metadata, allowed)
    // and deletes every match, each denied.
    let o = node
        .kafka_tool(
            "ops",
            "app=ops",
            "org.apache.kafka.tools.TopicCommand",
            &["--bootstrap-server", "127.0.0.1:9092", "--delete", "--topic", "precious.*"],
        )
        .unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    assert!(!o.status.success() && text.contains("TopicAuthorizationException"), "{text}");

    // What survived, seen by the unrestricted admin: every denied change left no trace.
    let state = admin(&["state:precious", "state:precious2", "list"]);
    assert_eq!(
        state,
        [
            "state precious partitions=1 earliest=0 retention.ms=604800000",
            "state precious2 partitions=1 earliest=0 retention.ms=604800000",
            "list fresh,open,precious,precious2,scratch2,scratch3",
        ]
    );
    // The allowed changes happened: 2 partitions, records deleted (up to 1, or more once the
    // 1-second retention applies), the new retention.
    let open = admin(&["state:open"]);
    let earliest: Option<i64> = open[0]
        .strip_prefix("state open partitions=2 earliest=")
        .and_then(|rest| rest.strip_suffix(" retention.ms=1000"))
        .and_then(|n| n.parse().ok());
    assert!(earliest.is_some_and(|e| e >= 1), "{open:?}");

    // Flows and metrics per topic, as for Produce.
    let flows: Vec<serde_json::Value> =
        node.flows().unwrap().into_iter().filter(|f| f["l7"]["type"] == "kafka").collect();
    let has = |api: &str, topic: &str, verdict: &str, code: i64| {
        flows.iter().any(|f| {
            let k = &f["l7"]["kafka"];
            k["api_key"] == api && k["topic"] == topic && f["verdict"] == verdict && k["error_code"] == code
        })
    };
    assert!(has("DeleteTopics", "precious", "DENIED", 29), "{flows:#?}");
    assert!(has("DeleteTopics", "scratch", "ALLOWED", 0), "{flows:#?}");
    assert!(has("DeleteTopics", "", "DENIED", 29), "delete by topic ID is judged as an unnamed topic");
    assert!(has("CreateTopics", "evil", "DENIED", 29));
    assert!(has("CreateTopics", "auto-evil", "DENIED", 29), "Metadata's auto-creation, judged as CreateTopics");
    assert!(has("IncrementalAlterConfigs", "precious", "DENIED", 29));
    assert!(has("OffsetCommit", "open", "ALLOWED", 0));
    assert!(has("OffsetFetch", "precious", "DENIED", 29));
    assert!(has("OffsetDelete", "precious", "DENIED", 29));
    assert!(has("DeleteRecords", "precious", "DENIED", 29));
    assert!(has("CreatePartitions", "precious", "DENIED", 29));
    // Metrics label the topics the policy names; `precious`, which no rule names, counts as
    // `(other)` (a client cannot add series by naming topics).
    let metrics = node.admin("/metrics").unwrap();
    let series = |api: &str, topic: &str, verdict: &str| {
        metrics.lines().any(|l| {
            l.starts_with("l7mesh_kafka_topic_verdicts_total")
                && l.contains(&format!("api_key=\"{api}\""))
                && l.contains(&format!("topic=\"{topic}\""))
                && l.contains(verdict)
        })
    };
    assert!(series("DeleteTopics", "scratch", "verdict=\"allowed\""), "{metrics}");
    assert!(series("DeleteTopics", "(other)", "verdict=\"denied\""), "{metrics}");
    assert!(!metrics.contains("topic=\"precious\""), "{metrics}");
}
