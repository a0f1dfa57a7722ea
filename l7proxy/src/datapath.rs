//! What the proxy reads from the kernel's pinned maps, behind a trait: the real maps on a node,
//! an in-memory table in tests that run the proxy on loopback without root (l7proxy/tests/direct.rs).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Mutex;

use redirector::{Counters, Listener, Maps, OriginalDestination};

/// The datapath's answers the proxy needs.
pub trait Datapath: std::fmt::Debug + Send + Sync + 'static {
    /// The redirect entry for `peer`'s connection: where it was going, and for whom.
    fn original_destination(&self, netns_cookie: u64, peer: SocketAddr) -> Option<OriginalDestination>;
    /// The node's workload listeners.
    fn listeners(&self) -> Vec<Listener>;
    /// The datapath's counters.
    fn counters(&self) -> redirector::Result<Counters>;
    /// The loaded policy generation (readiness).
    fn generation(&self) -> redirector::Result<u32>;
}

impl Datapath for Maps {
    fn original_destination(&self, netns_cookie: u64, peer: SocketAddr) -> Option<OriginalDestination> {
        Maps::original_destination(self, netns_cookie, peer)
    }
    fn listeners(&self) -> Vec<Listener> {
        Maps::listeners(self)
    }
    fn counters(&self) -> redirector::Result<Counters> {
        Maps::counters(self)
    }
    fn generation(&self) -> redirector::Result<u32> {
        Maps::generation(self)
    }
}

/// A datapath held in memory: the redirect entries and listeners a test sets.
#[derive(Debug, Default)]
pub struct MemoryDatapath {
    redirects: Mutex<HashMap<SocketAddr, OriginalDestination>>,
    listeners: Mutex<Vec<Listener>>,
}

impl MemoryDatapath {
    /// Records that `peer`'s connection was redirected from `to` (what the kernel's connect
    /// hook would have written).
    pub fn redirect(&self, peer: SocketAddr, to: OriginalDestination) {
        self.redirects.lock().unwrap_or_else(|e| e.into_inner()).insert(peer, to);
    }

    /// Adds a workload listener.
    pub fn listen(&self, listener: Listener) {
        self.listeners.lock().unwrap_or_else(|e| e.into_inner()).push(listener);
    }
}

impl Datapath for MemoryDatapath {
    fn original_destination(&self, _netns_cookie: u64, peer: SocketAddr) -> Option<OriginalDestination> {
        self.redirects.lock().unwrap_or_else(|e| e.into_inner()).get(&peer).copied()
    }
    fn listeners(&self) -> Vec<Listener> {
        self.listeners.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
    fn counters(&self) -> redirector::Result<Counters> {
        Ok(Counters { values: Vec::new() })
    }
    fn generation(&self) -> redirector::Result<u32> {
        Ok(1)
    }
}
