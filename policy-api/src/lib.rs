//! policy-api: the node daemon behind `l7ctl up`: the store, the controller that puts compiled
//! versions in force (the policy language itself is the `l7policy` crate), the proxy channel, the
//! REST API, simulation and the service map.
#![forbid(unsafe_code)]

pub mod cgroup_events;
pub mod cluster;
pub mod control;
pub mod flows;
pub mod metrics;
pub mod node;
pub mod proxy_channel;
pub mod rejudge;
pub mod server;
pub mod servicemap;
pub mod simulate;
pub mod store;

/// `30s`, `5m`, `2h`, `1d` (a bare number is seconds): the flow window syntax l7proxy takes.
pub fn flows_window_ok(s: &str) -> bool {
    let digits = s.trim_end_matches(['s', 'm', 'h', 'd']);
    !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()) && s.len() - digits.len() <= 1
}
