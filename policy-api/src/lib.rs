//! policy-api: the CiliumNetworkPolicy model, its validation, its compilation into the
//! redirector's maps and the proxy's tables, the store, and the node daemon behind `l7ctl up`.
#![forbid(unsafe_code)]

pub mod cgroup_events;
pub mod compile;
pub mod control;
pub mod flows;
pub mod labels;
pub mod model;
pub mod node;
pub mod proxy_channel;
pub mod rejudge;
pub mod server;
pub mod servicemap;
pub mod simulate;
pub mod source;
pub mod store;
pub mod validate;

/// `30s`, `5m`, `2h`, `1d` (a bare number is seconds): the flow window syntax l7proxy takes.
pub fn flows_window_ok(s: &str) -> bool {
    let digits = s.trim_end_matches(['s', 'm', 'h', 'd']);
    !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()) && s.len() - digits.len() <= 1
}
