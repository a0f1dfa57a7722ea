//! Flows as l7proxy records them (`/v1/flows`, JSON Lines), as policy-api and l7ctl read them
//! back (simulation, the service map, `l7ctl observe`). Only the fields readers need; the
//! rest is ignored. l7proxy writes the same lines from its compact record (its tests parse
//! them with these types, so the two cannot drift apart).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::{Direction, Verdict};

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct FlowEndpoint {
    #[serde(default)]
    pub workload: Option<String>,
    #[serde(default)]
    pub namespace: Option<String>,
    #[serde(default)]
    pub labels: Option<BTreeMap<String, String>>,
    #[serde(default)]
    pub ip: String,
    #[serde(default)]
    pub port: u16,
}

impl FlowEndpoint {
    /// The name a person reads: the workload, else the address.
    pub fn display(&self) -> String {
        match &self.workload {
            Some(w) => w.clone(),
            None if self.ip.is_empty() => "?".into(),
            None => self.ip.clone(),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct HttpPart {
    pub method: String,
    pub url: String,
    #[serde(default)]
    pub code: u16,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GrpcPart {
    pub service: String,
    pub method: String,
    /// The authority as the proxy's `host` rules judged it (absent in older records).
    #[serde(default)]
    pub authority: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct KafkaPart {
    pub api_key: String,
    pub api_version: i16,
    #[serde(default)]
    pub topic: Option<String>,
    #[serde(default)]
    pub client_id: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum L7Part {
    Http { http: HttpPart },
    Grpc { grpc: GrpcPart },
    Kafka { kafka: KafkaPart },
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct L4Part {
    pub protocol: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Flow {
    pub time: String,
    pub verdict: Verdict,
    pub direction: Direction,
    pub source: FlowEndpoint,
    pub destination: FlowEndpoint,
    pub l4: L4Part,
    pub observer: String,
    #[serde(default)]
    pub policy_name: Option<String>,
    #[serde(default)]
    pub l7: Option<L7Part>,
}

impl Flow {
    /// `http`, `grpc`, `kafka`, or the L4 protocol in lower case.
    pub fn protocol(&self) -> String {
        match &self.l7 {
            Some(L7Part::Http { .. }) => "http".into(),
            Some(L7Part::Grpc { .. }) => "grpc".into(),
            Some(L7Part::Kafka { .. }) => "kafka".into(),
            None => self.l4.protocol.to_ascii_lowercase(),
        }
    }

    /// What was asked, for a person: `GET http://host/path`, `helloworld.Greeter/SayHello`,
    /// `Produce topic=t`, or `tcp/80`.
    pub fn detail(&self) -> String {
        match &self.l7 {
            Some(L7Part::Http { http }) => format!("{} {}", http.method, http.url),
            Some(L7Part::Grpc { grpc }) => format!("{}/{}", grpc.service, grpc.method),
            Some(L7Part::Kafka { kafka }) => match &kafka.topic {
                Some(t) => format!("{} topic={t}", kafka.api_key),
                None => kafka.api_key.clone(),
            },
            None => format!("{}/{}", self.l4.protocol.to_ascii_lowercase(), self.destination.port),
        }
    }

    /// The proxy's per-connection record (its requests are flows of their own).
    pub fn is_proxy_connection(&self) -> bool {
        self.observer == "proxy" && self.l7.is_none()
    }
}

/// Parses JSON Lines; lines that are not flows are skipped.
pub fn parse_lines(text: &str) -> Vec<Flow> {
    text.lines().filter(|l| !l.trim().is_empty()).filter_map(|l| serde_json::from_str(l).ok()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Lines exactly as l7proxy writes them (l7mesh-api/tests/flows.jsonl; l7proxy's flow
    /// tests check it writes these bytes): each is read, and the fields readers use come out right.
    #[test]
    fn reads_todays_lines() {
        let flows = parse_lines(include_str!("../tests/flows.jsonl"));
        let lines = include_str!("../tests/flows.jsonl").lines().filter(|l| !l.trim().is_empty()).count();
        assert_eq!(flows.len(), lines, "every sample line is a flow");
        assert!(flows.iter().any(|f| f.verdict == Verdict::Denied && f.protocol() == "http"));
        assert!(flows.iter().any(|f| f.direction == Direction::Ingress));
        assert!(flows.iter().any(|f| f.protocol() == "grpc"));
        assert!(flows.iter().any(|f| f.protocol() == "kafka"));
        assert!(flows.iter().any(|f| f.is_proxy_connection() && f.verdict == Verdict::Forwarded));
        for f in &flows {
            // Round trip: what a reader re-serializes reads back the same.
            let again: Flow = serde_json::from_str(&serde_json::to_string(f).unwrap()).unwrap();
            assert_eq!(&again, f);
        }
    }

    #[test]
    fn unknown_verdicts_are_not_flows() {
        let line = r#"{"time":"t","verdict":"MAYBE","direction":"EGRESS","source":{},"destination":{},"l4":{"protocol":"TCP"},"observer":"proxy"}"#;
        assert!(parse_lines(line).is_empty());
        assert_eq!(parse_lines(&line.replace("MAYBE", "AUDIT")).len(), 1);
    }
}
