//! The JSON Schema editors use (schema/ciliumnetworkpolicy.schema.json) agrees with the model
//! the validator reads: the same fields at every place, every policy that loads is valid
//! against it, and what the model refuses as an unknown field or a wrong type it refuses too.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use l7policy::model::*;
use l7policy::source::parse_documents;
use l7policy::validate::{canonical_field_names, load_path, load_text, Severity};
use serde::de::DeserializeOwned;
use serde_json::{json, Value};

fn schema() -> Value {
    serde_json::from_str(include_str!("../schema/ciliumnetworkpolicy.schema.json")).expect("the schema is JSON")
}

fn validator() -> jsonschema::Validator {
    jsonschema::draft7::new(&schema()).expect("the schema is a draft-07 schema")
}

fn schema_errors(v: &jsonschema::Validator, doc: &Value) -> Vec<String> {
    v.iter_errors(doc).map(|e| format!("{}: {e}", e.instance_path())).collect()
}

/// The fields serde knows for `T`, from the error its `deny_unknown_fields` gives.
fn model_fields<T: DeserializeOwned>() -> BTreeSet<String> {
    let err = serde_json::from_value::<T>(json!({"\u{1}probe": 0})).err().expect("an unknown field is refused");
    let text = err.to_string();
    let expected = text.split_once("expected").map(|(_, e)| e.to_string()).unwrap_or_default();
    expected.split('`').skip(1).step_by(2).map(str::to_string).collect()
}

fn schema_fields(schema: &Value, definition: Option<&str>) -> BTreeSet<String> {
    let node = match definition {
        Some(d) => &schema["definitions"][d],
        None => schema,
    };
    assert_eq!(node["additionalProperties"], json!(false), "{definition:?} refuses unknown fields");
    node["properties"].as_object().expect("properties").keys().cloned().collect()
}

#[test]
fn every_place_has_the_models_fields() {
    let s = schema();
    let places: Vec<(Option<&str>, BTreeSet<String>)> = vec![
        (None, model_fields::<PolicyDocument>()),
        (Some("rule"), model_fields::<Rule>()),
        (Some("defaultDeny"), model_fields::<DefaultDeny>()),
        (Some("selector"), model_fields::<Selector>()),
        (Some("requirement"), model_fields::<Requirement>()),
        (Some("ingressRule"), model_fields::<IngressRule>()),
        (Some("egressRule"), model_fields::<EgressRule>()),
        (Some("cidrRule"), model_fields::<CidrRule>()),
        (Some("portRule"), model_fields::<PortRule>()),
        (Some("portProtocol"), model_fields::<PortProtocol>()),
        (Some("tlsContext"), model_fields::<TlsContext>()),
        (Some("secretRef"), model_fields::<SecretRef>()),
        (Some("l7Rules"), model_fields::<L7Rules>()),
        (Some("httpRule"), model_fields::<HttpRule>()),
        (Some("headerMatch"), model_fields::<HeaderMatch>()),
        (Some("kafkaRule"), model_fields::<KafkaRule>()),
        (Some("grpcRule"), model_fields::<GrpcRule>()),
    ];
    for (definition, fields) in &places {
        assert!(fields.len() >= 2, "{definition:?}: {fields:?}");
        assert_eq!(&schema_fields(&s, *definition), fields, "{definition:?}");
    }
    // Every definition is one of those, or metadata (open, as Kubernetes' is).
    let defined: BTreeSet<&str> = s["definitions"].as_object().unwrap().keys().map(String::as_str).collect();
    let checked: BTreeSet<&str> = places.iter().filter_map(|(d, _)| *d).chain(["metadata"]).collect();
    assert_eq!(defined, checked);
}

fn yaml_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            yaml_files(&path, out);
        } else if matches!(path.extension().and_then(|e| e.to_str()), Some("yaml" | "yml" | "json")) {
            out.push(path);
        }
    }
}

#[test]
fn every_policy_that_loads_is_valid_against_the_schema() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = Vec::new();
    for dir in ["../examples/policies", "../examples/candidates", "tests/data/cilium"] {
        yaml_files(&root.join(dir), &mut files);
    }
    let v = validator();
    let mut loaded = 0;
    for file in &files {
        let (policies, diags) = load_path(file);
        let text = std::fs::read_to_string(file).unwrap();
        let docs = parse_documents("f", &text).unwrap();
        if diags.iter().any(|d| d.severity == Severity::Error) {
            // What the reader refuses as unknown or mistyped, the schema refuses too.
            let structural = diags.iter().any(|d| {
                d.message.starts_with("unknown field")
                    || d.message.starts_with("invalid type")
                    || d.message.starts_with("missing field")
            });
            if structural {
                assert!(docs.iter().any(|d| !v.is_valid(&d.value)), "{}: the schema accepts {diags:?}", file.display());
            }
            continue;
        }
        assert_eq!(policies.len(), docs.len(), "{}", file.display());
        for d in &docs {
            // Field names in another case (Cilium's `rules.HTTP`) load, with a warning, but the
            // schema names each field once, as Kubernetes' API server keeps it.
            let mut canonical = d.value.clone();
            let renamed = canonical_field_names(&mut canonical);
            let e = schema_errors(&v, &canonical);
            assert!(e.is_empty(), "{}: {e:#?}", file.display());
            assert_eq!(v.is_valid(&d.value), renamed.is_empty(), "{}: {renamed:?}", file.display());
            loaded += 1;
        }
    }
    // The examples and Cilium's corpus (36 files of it load).
    assert!(loaded >= 40, "{loaded}");
}

const HEAD: &str = "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata:\n  name: p\nspec:\n  endpointSelector: {matchLabels: {app: web}}\n";

fn first_doc(text: &str) -> Value {
    parse_documents("p.yaml", text).unwrap().remove(0).value
}

#[test]
fn policies_using_every_field_l7mesh_supports_are_valid() {
    let v = validator();
    for body in [
        "  ingress:\n  - fromEndpoints: [{matchLabels: {\"k8s:app\": a}, matchExpressions: [{key: env, operator: notin, values: [dev]}]}]\n    toPorts:\n    - ports: [{port: \"8080\", protocol: TCP}, {port: 9000, endPort: 9010, protocol: TCP}]\n      rules:\n        http:\n        - {method: GET, path: /v1/.*, host: api.example, headers: [\"X-A\", \"X-B: 1\"], headerMatches: [{name: X-C, value: v}]}\n",
        "  egress:\n  - toCIDRSet: [{cidr: 10.0.0.0/8, except: [10.96.0.0/12]}]\n    toPorts:\n    - ports: [{port: \"443\", protocol: TCP}]\n      terminatingTLS: {secret: {name: s, namespace: n}}\n      originatingTLS: {}\n      serverNames: [\"*.example.com\"]\n      rules: {grpc: [{service: helloworld.Greeter, method: SayHello}]}\n  - toEntities: [world]\n  egressDeny:\n  - toCIDR: [192.0.2.1]\n    toPorts: [{ports: [{port: \"22\"}]}]\n  enableDefaultDeny: {ingress: false, egress: true}\n  description: d\n",
        "  ingress:\n  - toPorts: [{ports: [{port: \"9092\", protocol: TCP}], rules: {kafka: [{role: produce, topic: t}, {apiKey: fetch, apiVersion: \"4\", clientID: c}]}}]\n  egress:\n",
    ] {
        let text = format!("{HEAD}{body}");
        let (policies, diags) = load_text("p.yaml", &text);
        assert_eq!(policies.len(), 1, "{diags:?}");
        let e = schema_errors(&v, &first_doc(&text));
        assert!(e.is_empty(), "{e:#?}\n{text}");
    }
}

#[test]
fn unknown_fields_and_wrong_types_are_refused_by_both() {
    let v = validator();
    let port = |rule: &str| format!("  egress:\n  - toPorts: [{rule}]\n");
    for body in [
        "  colour: blue\n".to_string(),
        "  egress:\n  - toPort: [{ports: [{port: \"80\"}]}]\n".to_string(),
        port("{ports: [{port: \"80\", protocol: TCP}], rule: {http: [{}]}}"),
        port("{ports: [{port: \"80\", protocol: TCP}], rules: {http: [{methd: GET}]}}"),
        port("{ports: [{port: \"80\", protcol: TCP}]}"),
        port("{ports: \"80\"}"),
        port("{ports: [{port: true}]}"),
        port("{ports: [{port: \"80\", endPort: \"81\"}]}"),
        port("{ports: [{port: \"80\", protocol: 6}]}"),
        port("{ports: [{port: \"80\", protocol: TCP}], rules: {http: {method: GET}}}"),
        port("{ports: [{port: \"80\", protocol: TCP}], rules: {http: [{method: [GET]}]}}"),
        port("{ports: [{port: \"80\", protocol: TCP}], rules: {grpc: [{method: M}]}}"),
        port("{ports: [{port: \"80\", protocol: TCP}], terminatingTLS: {secret: {namespace: n}}}"),
        port("{ports: [{port: \"80\", protocol: TCP}], serverNames: a.example}"),
        port("{ports: [{port: \"9092\", protocol: TCP}], rules: {kafka: [{apiVersion: 4}]}}"),
        "  ingress:\n  - fromEndpoints: {matchLabels: {app: a}}\n".to_string(),
        "  ingress:\n  - fromEndpoints: [{matchLabels: [app]}]\n".to_string(),
        "  ingress:\n  - fromEndpoints: [{matchLabels: {app: 1}}]\n".to_string(),
        "  ingress:\n  - fromEndpoints: [{matchExpressions: [{key: app}]}]\n".to_string(),
        "  ingress:\n  - fromCIDRSet: [{cidr: 10.0.0.0/8, except: 10.1.0.0/16}]\n".to_string(),
        "  ingress:\n  - fromCIDR: 10.0.0.0/8\n".to_string(),
        "  enableDefaultDeny: {ingress: yes please}\n".to_string(),
    ] {
        let text = format!("{HEAD}{body}");
        let (policies, diags) = load_text("p.yaml", &text);
        assert!(policies.is_empty(), "the validator accepts\n{text}");
        assert!(
            diags.iter().any(|d| d.message.starts_with("unknown field")
                || d.message.starts_with("invalid type")
                || d.message.starts_with("missing field")),
            "{diags:?}"
        );
        assert!(!v.is_valid(&first_doc(&text)), "the schema accepts\n{text}");
    }
    for (text, what) in [
        ("apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {}\nspec: {endpointSelector: {}}\n", "no name"),
        ("apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: p}\nspec: []\n", "spec as a list"),
        ("apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: p}\nspecs: {}\n", "specs as a map"),
        ("apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: p, labels: [a]}\nspec: {endpointSelector: {}}\n", "labels as a list"),
    ] {
        let (policies, _) = load_text("p.yaml", text);
        assert!(policies.is_empty(), "{what}: the validator accepts");
        assert!(!v.is_valid(&first_doc(text)), "{what}: the schema accepts");
    }
}
