//! What every connection task shares: the direction it was accepted on, the proxy's shared
//! state, and the open connections a policy change may close.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use redirector::ProxyAddrs;
use tokio::sync::watch;
use tracing::warn;

use crate::flows::FlowLog;
use crate::metrics::Metrics;

/// The direction a connection was accepted on: the same words as its flows' direction and
/// the rule tables' parties.
pub use l7mesh_api::Direction;

/// Why policy-api asked for a proxied connection to be closed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CloseOrder {
    /// The new version denies it.
    Denied,
    /// The new version carries it differently (TLS handling, stack, or not through the proxy
    /// at all): the client reconnects and the new connection is judged as the version says.
    Rerouted,
}

/// One open proxied connection: where its close order arrives, and where its task says the
/// sockets are gone.
struct LiveEntry {
    order: watch::Sender<Option<CloseOrder>>,
    ended: watch::Receiver<bool>,
}

/// Open proxied connections by downstream peer, so that a policy change can close the ones it
/// denies or reroutes (policy-api names them on the policy stream).
#[derive(Default)]
pub struct LiveConnections {
    by_peer: std::sync::Mutex<std::collections::HashMap<SocketAddr, LiveEntry>>,
}

/// How long a close order waits for the connections' tasks to drop their sockets.
const CLOSE_WAIT: Duration = Duration::from_secs(1);

impl LiveConnections {
    pub(crate) fn register(&self, peer: SocketAddr) -> (watch::Receiver<Option<CloseOrder>>, watch::Sender<bool>) {
        let (order, order_rx) = watch::channel(None);
        let (ended_tx, ended) = watch::channel(false);
        self.by_peer.lock().unwrap_or_else(|e| e.into_inner()).insert(peer, LiveEntry { order, ended });
        (order_rx, ended_tx)
    }

    pub(crate) fn remove(&self, peer: SocketAddr) {
        self.by_peer.lock().unwrap_or_else(|e| e.into_inner()).remove(&peer);
    }

    /// Closes the open connections of `deny` and `reroute`, and returns how many of each
    /// there were once their sockets are closed (so that policy-api's apply returns after the
    /// clients saw the close).
    pub async fn close(&self, deny: &[SocketAddr], reroute: &[SocketAddr]) -> (usize, usize) {
        let mut waiting = Vec::new();
        let (mut denied, mut rerouted) = (0, 0);
        {
            let mut map = self.by_peer.lock().unwrap_or_else(|e| e.into_inner());
            for (peers, order) in [(deny, CloseOrder::Denied), (reroute, CloseOrder::Rerouted)] {
                for p in peers {
                    let Some(entry) = map.remove(p) else { continue };
                    entry.order.send_replace(Some(order));
                    waiting.push(entry.ended);
                    match order {
                        CloseOrder::Denied => denied += 1,
                        CloseOrder::Rerouted => rerouted += 1,
                    }
                }
            }
        }
        let all = async {
            for mut ended in waiting {
                let _ = ended.wait_for(|e| *e).await;
            }
        };
        if tokio::time::timeout(CLOSE_WAIT, all).await.is_err() {
            warn!("proxied connections ordered closed did not end within {CLOSE_WAIT:?}");
        }
        (denied, rerouted)
    }
}

/// What every connection task shares.
pub struct Shared {
    pub live: Arc<LiveConnections>,
    /// The kernel's maps (or, in tests, an in-memory stand-in).
    pub datapath: Arc<dyn crate::datapath::Datapath>,
    pub registry: Arc<crate::registry::Registry>,
    pub netns_cookie: u64,
    pub proxy: ProxyAddrs,
    pub flows: Arc<FlowLog>,
    pub metrics: Arc<Metrics>,
    pub limits: crate::limits::HttpLimits,
    pub pool: Arc<crate::pool::UpstreamPool>,
    pub certs: crate::tls::CertSource,
    /// Proxied connections per source workload (or remote address), bounded.
    pub connections: Arc<crate::limits::ConnectionCounts>,
    /// How the upstream learns the client's address (X-Forwarded-For mode, PROXY v2 ports).
    pub client_address: crate::client_addr::ClientAddressConfig,
    /// The identities of the tunnel between nodes (fetched from the broker when first used).
    pub tunnel: crate::tunnel::Identities,
}
