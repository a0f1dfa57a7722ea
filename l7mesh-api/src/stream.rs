//! The policy stream between policy-api and l7proxy (ARCHITECTURE.md, "The policy pipeline"):
//! one JSON line per message each way.

use std::net::SocketAddr;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// A new policy version. `P` is the tables: [`crate::tables::Published`] on both sides (a
/// type parameter so the stream's tests need no tables).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Update<P> {
    pub version: u64,
    #[serde(default)]
    pub seq: u64,
    pub published: P,
}

/// Proxied connections a new version denies (`close`) or carries differently (`reroute`), by
/// downstream peer, to close.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Close {
    pub version: u64,
    pub seq: u64,
    pub close: Vec<SocketAddr>,
    #[serde(default)]
    pub reroute: Vec<SocketAddr>,
}

/// One line from policy-api to l7proxy.
#[derive(Clone, Debug, PartialEq)]
pub enum ToProxy<P> {
    Update(Update<P>),
    Close(Close),
}

impl<P: DeserializeOwned> ToProxy<P> {
    /// Parses one line. (Not an untagged enum: serde's buffering of untagged content cannot
    /// read the tables' integer map keys; a close command is the line with `close`.)
    pub fn parse(line: &str) -> Result<Self, serde_json::Error> {
        if let Ok(close) = serde_json::from_str::<Close>(line) {
            return Ok(ToProxy::Close(close));
        }
        serde_json::from_str::<Update<P>>(line).map(ToProxy::Update)
    }
}

impl<P: Serialize> ToProxy<P> {
    pub fn to_line(&self) -> Result<String, serde_json::Error> {
        match self {
            ToProxy::Update(u) => serde_json::to_string(u),
            ToProxy::Close(c) => serde_json::to_string(c),
        }
    }
}

/// One line from l7proxy to policy-api: its answer to an update or to a close command.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum FromProxy {
    /// The version's tables are in force; `errors`: rules it skipped (they match nothing).
    Loaded {
        loaded: u64,
        #[serde(default)]
        seq: u64,
        #[serde(default)]
        errors: Vec<String>,
    },
    /// The connections of a close command are closed.
    Closed {
        closed: usize,
        #[serde(default)]
        rerouted: usize,
        #[serde(default)]
        seq: u64,
    },
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    #[test]
    fn messages_round_trip() {
        // Integer map keys in the tables (policy ids) are why parsing is not untagged.
        let tables: BTreeMap<u32, String> = [(7, "default/web".to_string())].into();
        let update = ToProxy::Update(Update { version: 3, seq: 9, published: tables });
        let line = update.to_line().unwrap();
        assert_eq!(line, r#"{"version":3,"seq":9,"published":{"7":"default/web"}}"#);
        assert_eq!(ToProxy::parse(&line).unwrap(), update);
        let close = ToProxy::<BTreeMap<u32, String>>::Close(Close {
            version: 3,
            seq: 10,
            close: vec!["10.0.0.5:40001".parse().unwrap()],
            reroute: vec![],
        });
        assert_eq!(ToProxy::parse(&close.to_line().unwrap()).unwrap(), close);
        assert!(ToProxy::<BTreeMap<u32, String>>::parse("{\"version\":1}").is_err());

        let loaded = FromProxy::Loaded { loaded: 3, seq: 9, errors: vec!["rule skipped".into()] };
        let closed = FromProxy::Closed { closed: 2, rerouted: 1, seq: 10 };
        for ack in [loaded, closed] {
            assert_eq!(serde_json::from_str::<FromProxy>(&serde_json::to_string(&ack).unwrap()).unwrap(), ack);
        }
        // Today's lines (fields in any order, optional ones left out) read the same.
        assert_eq!(
            serde_json::from_str::<FromProxy>(r#"{"errors":[],"loaded":4,"seq":2}"#).unwrap(),
            FromProxy::Loaded { loaded: 4, seq: 2, errors: vec![] }
        );
        assert_eq!(
            serde_json::from_str::<FromProxy>(r#"{"closed":1,"rerouted":0,"seq":5}"#).unwrap(),
            FromProxy::Closed { closed: 1, rerouted: 0, seq: 5 }
        );
    }
}
