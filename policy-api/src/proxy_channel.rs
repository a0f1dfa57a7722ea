//! policy-api's side of the policy stream to l7proxy (`<run dir>/policy-proxy.sock`, root
//! only): every compiled version goes out as one JSON line the moment it exists (the current
//! one when the proxy connects), and the proxy answers `{"loaded": version, "seq": n}` once it
//! has swapped its tables. A reconcile waits for that answer before it flips the kernel.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use l7mesh_api::stream::{Close, FromProxy, ToProxy, Update};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::watch;
use tracing::{info, warn};

use l7policy::compile::Compiled;

/// Blocks until `rx` holds a value `ready` accepts (true) or `timeout` passes (false). The
/// controller runs on the blocking pool, outside any async context, so it drives the wait on
/// the runtime's handle: woken by the session's `send`, no polling.
fn wait_blocking<T>(rx: &mut watch::Receiver<T>, timeout: Duration, ready: impl FnMut(&T) -> bool) -> bool {
    let wait = async { matches!(tokio::time::timeout(timeout, rx.wait_for(ready)).await, Ok(Ok(_))) };
    match tokio::runtime::Handle::try_current() {
        Ok(handle) => handle.block_on(wait),
        // Outside a runtime (unit tests): a small one with a timer.
        Err(_) => match tokio::runtime::Builder::new_current_thread().enable_time().build() {
            Ok(rt) => rt.block_on(wait),
            Err(_) => false,
        },
    }
}

/// The proxy's last acknowledgement: the highest sequence number it answered and the policy
/// version it said it loaded.
#[derive(Clone, Copy, Debug, Default)]
struct Acked {
    seq: u64,
    version: Option<u64>,
}

/// One published version: its sequence number and the line sent.
type Published = Option<Arc<(u64, String)>>;

pub struct ProxyHub {
    current: watch::Sender<Published>,
    /// One-off commands (closing connections), each `(seq, line)`.
    commands: tokio::sync::broadcast::Sender<Arc<(u64, String)>>,
    /// Sequence numbers of published versions and commands alike.
    seq: std::sync::atomic::AtomicU64,
    /// How many connections the proxy closed for the last close command it answered
    /// (seq, denied, rerouted).
    closed: watch::Sender<(u64, usize, usize)>,
    /// What the proxy last acknowledged, in one value: a waiter woken by an acknowledgement
    /// must see the version that came with it (two channels updated one after the other let
    /// a rollback's waiter read the version before the one it had just been told was loaded).
    loaded: watch::Sender<Acked>,
    connected: AtomicUsize,
}

impl ProxyHub {
    pub fn new() -> Arc<Self> {
        Arc::new(ProxyHub {
            current: watch::channel(None).0,
            commands: tokio::sync::broadcast::channel(16).0,
            seq: std::sync::atomic::AtomicU64::new(0),
            closed: watch::channel((0, 0, 0)).0,
            loaded: watch::channel(Acked::default()).0,
            connected: AtomicUsize::new(0),
        })
    }

    /// (proxies connected, policy version the proxy has in force).
    pub fn status(&self) -> (usize, Option<u64>) {
        (self.connected.load(Ordering::Acquire), self.loaded.borrow().version)
    }

    /// Publishes `compiled` and blocks (this runs on the blocking pool, under the controller's
    /// lock) until a proxy has loaded it, waiting for one to (re)connect if none is. `Err` says
    /// why it stopped waiting after `timeout`; the version stays published and a proxy that
    /// connects later loads it first. (Meanwhile the proxy refuses connections from workloads
    /// its tables do not know, so a late proxy fails closed, not open.)
    pub fn publish_and_wait(&self, compiled: &Compiled, timeout: Duration) -> Result<(), String> {
        let seq = self.seq.fetch_add(1, Ordering::AcqRel) + 1;
        let line = ToProxy::Update(Update { version: compiled.published.version, seq, published: &compiled.published })
            .to_line()
            .map_err(|e| {
                format!("policy version {} could not be written for l7proxy: {e}", compiled.published.version)
            })?;
        let mut acked = self.loaded.subscribe();
        self.current.send_replace(Some(Arc::new((seq, line))));
        if wait_blocking(&mut acked, timeout, |a| a.seq >= seq) {
            return Ok(());
        }
        Err(if self.connected.load(Ordering::Acquire) == 0 {
            format!(
                "no l7proxy on the policy stream for {timeout:?}; it loads version {} when it connects",
                compiled.published.version
            )
        } else {
            format!("l7proxy did not load policy version {} within {timeout:?}", compiled.published.version)
        })
    }

    /// Waits (up to `timeout`) until a connected proxy has loaded `version` or a later one;
    /// `false` when none is connected or it has not by then. Async: it must not hold an async
    /// thread, which the acknowledgements themselves are read on.
    pub async fn wait_loaded(&self, version: u64, timeout: Duration) -> bool {
        if self.connected.load(Ordering::Acquire) == 0 {
            return false;
        }
        let mut loaded = self.loaded.subscribe();
        let reached = tokio::time::timeout(timeout, loaded.wait_for(|a| a.version.is_some_and(|v| v >= version))).await;
        matches!(reached, Ok(Ok(_)))
    }

    /// Publishes `previous` (the version in force) again after a newer one failed to go in
    /// force everywhere, and waits for the proxy to load it, as [`ProxyHub::publish_and_wait`].
    /// With no version in force yet, the failed one is withdrawn: a proxy that connects later
    /// gets nothing until the next version.
    pub fn republish(&self, previous: Option<&Compiled>, timeout: Duration) -> Result<(), String> {
        match previous {
            Some(c) => self.publish_and_wait(c, timeout).map_err(|e| format!("putting the version in force back: {e}")),
            None => {
                self.current.send_replace(None);
                Ok(())
            }
        }
    }

    /// Asks the proxy to close the proxied connections whose downstream peers are `deny` (a
    /// new version denies them) and `reroute` (a new version carries them differently: their
    /// clients reconnect), and blocks until it says how many of each it closed (it answers
    /// once their sockets are closed). `Err` when no proxy answered within `timeout` (the
    /// caller then closes them in the kernel).
    pub fn close_proxied(
        &self,
        version: u64,
        deny: &[std::net::SocketAddr],
        reroute: &[std::net::SocketAddr],
        timeout: Duration,
    ) -> Result<(usize, usize), String> {
        if self.connected.load(Ordering::Acquire) == 0 {
            return Err("no l7proxy on the policy stream".into());
        }
        let seq = self.seq.fetch_add(1, Ordering::AcqRel) + 1;
        let close = Close { version, seq, close: deny.to_vec(), reroute: reroute.to_vec() };
        let line = ToProxy::<&l7mesh_api::tables::Published>::Close(close)
            .to_line()
            .map_err(|e| format!("a close request could not be written: {e}"))?;
        let mut closed = self.closed.subscribe();
        let _ = self.commands.send(Arc::new((seq, line)));
        if !wait_blocking(&mut closed, timeout, |(acked, _, _)| *acked >= seq) {
            return Err(format!("l7proxy did not answer a close request within {timeout:?}"));
        }
        let (_, denied, rerouted) = *closed.borrow();
        Ok((denied, rerouted))
    }

    /// Serves proxies on `listener` until the process ends.
    pub async fn serve(self: Arc<Self>, listener: UnixListener) {
        loop {
            match listener.accept().await {
                Ok((stream, _)) => {
                    tokio::spawn(self.clone().session(stream));
                }
                Err(e) => warn!(error = %e, "policy stream accept"),
            }
        }
    }

    async fn session(self: Arc<Self>, stream: UnixStream) {
        self.connected.fetch_add(1, Ordering::AcqRel);
        info!("l7proxy connected to the policy stream");
        let (read, mut write) = stream.into_split();
        let mut lines = BufReader::new(read).lines();
        let mut current = self.current.subscribe();
        let mut commands = self.commands.subscribe();
        current.mark_changed();
        loop {
            tokio::select! {
                command = commands.recv() => {
                    let Ok(command) = command else { continue };
                    if write.write_all(format!("{}\n", command.1).as_bytes()).await.is_err() { break; }
                }
                changed = current.changed() => {
                    if changed.is_err() { break; }
                    let Some(published) = current.borrow_and_update().clone() else { continue };
                    if write.write_all(format!("{}\n", published.1).as_bytes()).await.is_err() { break; }
                }
                line = lines.next_line() => {
                    let Ok(Some(line)) = line else { break };
                    match serde_json::from_str::<FromProxy>(&line) {
                        Ok(FromProxy::Loaded { loaded, seq, errors }) => {
                            for e in &errors {
                                warn!(version = loaded, error = %e, "l7proxy skipped a rule");
                            }
                            self.loaded.send_modify(|a| {
                                a.seq = a.seq.max(seq);
                                a.version = Some(loaded);
                            });
                        }
                        Ok(FromProxy::Closed { closed, rerouted, seq }) => {
                            self.closed.send_replace((seq, closed, rerouted));
                        }
                        Err(e) => warn!(error = %e, "unreadable answer on the policy stream"),
                    }
                }
            }
        }
        self.connected.fetch_sub(1, Ordering::AcqRel);
        warn!("l7proxy left the policy stream");
    }
}
