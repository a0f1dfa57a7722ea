//! The proxy's bounds, one struct per stack (each field is a flag; README, "Bounds").

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use thiserror::Error;

/// Every bound of the HTTP stack, explicit (each is a flag; README and ARCHITECTURE.md, "The proxy", list them).
#[derive(Clone, Copy, Debug)]
pub struct HttpLimits {
    /// Largest request head (HTTP/1 read buffer; HTTP/2 header list). Larger: 431.
    pub max_header_bytes: usize,
    /// Most header fields in an HTTP/1 request. More: 431.
    pub max_headers: usize,
    /// Time to receive a complete request head, and idle time between keep-alive requests.
    pub header_timeout: Duration,
    /// Time for the upstream to answer with a response head. Longer: 504.
    pub request_timeout: Duration,
    /// Concurrent HTTP/2 streams per downstream connection.
    pub max_concurrent_streams: u32,
    /// The Kafka stack's bounds.
    pub kafka: KafkaLimits,
}

/// The Kafka stack's bounds, per connection (flags; README, "Bounds").
#[derive(Clone, Copy, Debug)]
pub struct KafkaLimits {
    /// Largest request frame from the client; larger closes the connection.
    pub max_request_frame: usize,
    /// Largest response frame from the broker, or made here; larger closes the connection.
    pub max_response_frame: usize,
    /// Requests awaiting their answer; at the bound no further request is read until one is
    /// answered (as a broker, which serves one request per connection at a time).
    pub max_in_flight: usize,
    /// Bytes held for answers not yet sent (local answers, the requests kept to merge denied
    /// topics into the broker's answer); at the bound no further request is read until they drain.
    pub max_pending_bytes: usize,
    /// Items (array elements, unknown tagged fields) one request or merged response decodes
    /// into, charged as each count is read; more closes the connection.
    pub max_items: usize,
    /// Time for a request frame to arrive whole once its first byte has.
    pub frame_timeout: Duration,
    /// Bytes of large request frames being read, across all connections ([`FrameBudget`]).
    pub max_frame_bytes: usize,
    /// Time the broker may stay silent while an answer is owed.
    pub response_timeout: Duration,
}

impl Default for KafkaLimits {
    /// The flags' defaults.
    fn default() -> Self {
        KafkaLimits {
            max_request_frame: 16 << 20,
            max_response_frame: 64 << 20,
            max_in_flight: 1000,
            max_pending_bytes: 32 << 20,
            max_items: 100_000,
            frame_timeout: Duration::from_secs(30),
            max_frame_bytes: 256 << 20,
            response_timeout: Duration::from_secs(120),
        }
    }
}

/// Who a proxied connection counts against for `--max-connections-per-workload`: the source
/// workload (its cgroup, from the kernel's redirect entry, so known before any policy and not
/// chosen by the client), else the remote address (an ingress peer from outside the node, or an
/// egress connection the kernel gave no source for). An IPv6 peer counts per /64, the block one
/// party is usually given, so that it cannot spread over addresses it owns.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ConnectionOwner {
    Workload(u64),
    Remote(IpAddr),
}

impl ConnectionOwner {
    /// The owner of a connection from `peer` whose source workload is `cgroup_id`.
    pub fn of(cgroup_id: Option<u64>, peer: IpAddr) -> Self {
        match (cgroup_id, peer) {
            (Some(cgroup), _) => ConnectionOwner::Workload(cgroup),
            (None, IpAddr::V6(ip)) => match ip.to_ipv4_mapped() {
                Some(v4) => ConnectionOwner::Remote(IpAddr::V4(v4)),
                None => ConnectionOwner::Remote(IpAddr::V6(Ipv6Addr::from(ip.to_bits() & !u128::from(u64::MAX)))),
            },
            (None, ip) => ConnectionOwner::Remote(ip),
        }
    }
}

impl std::fmt::Display for ConnectionOwner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ConnectionOwner::Workload(cgroup) => write!(f, "workload cgroup {cgroup}"),
            ConnectionOwner::Remote(IpAddr::V6(ip)) => write!(f, "remote {ip}/64"),
            ConnectionOwner::Remote(ip) => write!(f, "remote {ip}"),
        }
    }
}

/// A new connection over `--max-connections-per-workload`: its owner holds `max` already.
#[derive(Clone, Copy, Debug, Error)]
#[error("{owner} holds {max} connections through the proxy (--max-connections-per-workload)")]
pub struct OverConnectionBound {
    pub owner: ConnectionOwner,
    pub max: usize,
}

/// Concurrent proxied connections per [`ConnectionOwner`], at most `max` each, so that no one
/// party takes the proxy's descriptors from the others. An owner's entry goes with its last
/// connection: the map holds only owners with connections open.
#[derive(Debug)]
pub struct ConnectionCounts {
    max: usize,
    held: Mutex<HashMap<ConnectionOwner, usize>>,
    /// When a refusal was last logged, and how many since went unlogged.
    logged: Mutex<(Option<Instant>, u64)>,
}

/// One connection counted against its owner, given back once, on drop.
#[derive(Debug)]
pub struct ConnectionSlot {
    counts: Arc<ConnectionCounts>,
    owner: ConnectionOwner,
}

/// How often a refusal over the bound is logged at most (a flood logs once a period, with a count).
pub const REFUSAL_LOG_PERIOD: Duration = Duration::from_secs(1);

impl ConnectionCounts {
    pub fn new(max: usize) -> Arc<Self> {
        Arc::new(ConnectionCounts { max, held: Mutex::default(), logged: Mutex::default() })
    }

    pub fn max(&self) -> usize {
        self.max
    }

    /// A slot for one more connection of `owner`, unless it holds `max` already.
    pub fn try_acquire(self: &Arc<Self>, owner: ConnectionOwner) -> Result<ConnectionSlot, OverConnectionBound> {
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        let count = held.entry(owner).or_insert(0);
        if *count >= self.max {
            return Err(OverConnectionBound { owner, max: self.max });
        }
        *count += 1;
        Ok(ConnectionSlot { counts: self.clone(), owner })
    }

    /// Connections `owner` holds now.
    pub fn held(&self, owner: ConnectionOwner) -> usize {
        self.held.lock().unwrap_or_else(|e| e.into_inner()).get(&owner).copied().unwrap_or(0)
    }

    /// Owners holding connections now.
    pub fn owners(&self) -> usize {
        self.held.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Whether a refusal should be logged now: once per [`REFUSAL_LOG_PERIOD`], with the number
    /// of refusals not logged since the last one.
    pub fn log_refusal(&self, now: Instant) -> Option<u64> {
        let mut logged = self.logged.lock().unwrap_or_else(|e| e.into_inner());
        match logged.0 {
            Some(last) if now.saturating_duration_since(last) < REFUSAL_LOG_PERIOD => {
                logged.1 += 1;
                None
            }
            _ => {
                let suppressed = std::mem::take(&mut logged.1);
                logged.0 = Some(now);
                Some(suppressed)
            }
        }
    }
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        let mut held = self.counts.held.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(count) = held.get_mut(&self.owner) {
            *count -= 1;
            if *count == 0 {
                held.remove(&self.owner);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_owner_is_bounded_alone_and_a_slot_gives_back_once() {
        let counts = ConnectionCounts::new(2);
        let a = ConnectionOwner::Workload(1);
        let b = ConnectionOwner::Workload(2);
        let a1 = counts.try_acquire(a).unwrap();
        let a2 = counts.try_acquire(a).unwrap();
        let over = counts.try_acquire(a).unwrap_err();
        assert_eq!((over.owner, over.max), (a, 2));
        assert_eq!(counts.held(a), 2, "a refusal takes nothing");
        // Another owner is untouched by a's bound.
        let b1 = counts.try_acquire(b).unwrap();
        let _b2 = counts.try_acquire(b).unwrap();
        assert!(counts.try_acquire(b).is_err());
        drop(a1);
        assert_eq!(counts.held(a), 1);
        let a3 = counts.try_acquire(a).unwrap();
        assert!(counts.try_acquire(a).is_err());
        drop((a2, a3, b1));
        assert_eq!((counts.held(a), counts.held(b)), (0, 1));
        assert_eq!(counts.owners(), 1, "an owner's entry goes with its last connection");
    }

    #[test]
    fn remote_owners_are_addresses_and_ipv6_blocks() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert_eq!(ConnectionOwner::of(Some(7), ip("10.0.0.1")), ConnectionOwner::Workload(7));
        assert_eq!(ConnectionOwner::of(None, ip("10.0.0.1")), ConnectionOwner::Remote(ip("10.0.0.1")));
        assert_ne!(ConnectionOwner::of(None, ip("10.0.0.1")), ConnectionOwner::of(None, ip("10.0.0.2")));
        assert_eq!(ConnectionOwner::of(None, ip("::ffff:10.0.0.1")), ConnectionOwner::Remote(ip("10.0.0.1")));
        assert_eq!(
            ConnectionOwner::of(None, ip("2001:db8:1:2::5")),
            ConnectionOwner::of(None, ip("2001:db8:1:2:ff::9"))
        );
        assert_ne!(ConnectionOwner::of(None, ip("2001:db8:1:2::5")), ConnectionOwner::of(None, ip("2001:db8:1:3::5")));
    }

    #[test]
    fn refusals_are_logged_once_a_period_with_a_count() {
        let counts = ConnectionCounts::new(1);
        let t = Instant::now();
        assert_eq!(counts.log_refusal(t), Some(0));
        assert_eq!(counts.log_refusal(t + Duration::from_millis(10)), None);
        assert_eq!(counts.log_refusal(t + Duration::from_millis(20)), None);
        assert_eq!(counts.log_refusal(t + REFUSAL_LOG_PERIOD), Some(2));
        assert_eq!(counts.log_refusal(t + REFUSAL_LOG_PERIOD), None);
    }
}
