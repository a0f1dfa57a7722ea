//! Flows as l7proxy records them (`/v1/flows`, JSON Lines), read back for simulation and the
//! service map. Only the fields those need; the rest passes through untouched.

use std::collections::BTreeMap;

use serde::Deserialize;

#[derive(Clone, Debug, Default, Deserialize)]
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

#[derive(Clone, Debug, Deserialize)]
pub struct HttpPart {
    pub method: String,
    pub url: String,
    #[serde(default)]
    pub code: u16,
}

#[derive(Clone, Debug, Deserialize)]
pub struct GrpcPart {
    pub service: String,
    pub method: String,
    /// The authority as the proxy's `host` rules judged it (absent in older records).
    #[serde(default)]
    pub authority: String,
}

#[derive(Clone, Debug, Deserialize)]
pub struct KafkaPart {
    pub api_key: String,
    pub api_version: i16,
    #[serde(default)]
    pub topic: Option<String>,
    #[serde(default)]
    pub client_id: String,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum L7Part {
    Http { http: HttpPart },
    Grpc { grpc: GrpcPart },
    Kafka { kafka: KafkaPart },
}

#[derive(Clone, Debug, Deserialize)]
pub struct L4Part {
    pub protocol: String,
}

#[derive(Clone, Debug, Deserialize)]
pub struct Flow {
    pub time: String,
    pub verdict: String,
    pub direction: String,
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
