//! Reads the kernel's L4 verdict events from the ring buffer into flows and metrics.

use std::sync::Arc;

use redirector::{AsyncEvents, VerdictEvent};
use tokio::sync::watch;
use tracing::{info, warn};

use crate::flows::{Endpoint, FlowLog, FlowRecord, FlowTime, L4};
use crate::metrics::{Metrics, VerdictLabel, VerdictLabels};
use l7mesh_api::{Direction, Verdict};

pub async fn pump(
    ring: aya::maps::RingBuf<aya::maps::MapData>,
    registry: Arc<crate::registry::Registry>,
    flows: Arc<FlowLog>,
    metrics: Arc<Metrics>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut events = match AsyncEvents::new(ring) {
        Ok(e) => e,
        Err(e) => {
            warn!(error = %e, "cannot poll the L4 event ring buffer; kernel verdicts will not appear in flows");
            return;
        }
    };
    loop {
        tokio::select! {
            batch = events.next_batch() => match batch {
                Ok(batch) => batch.iter().for_each(|e| record(e, &registry, &flows, &metrics)),
                Err(e) => { warn!(error = %e, "L4 event ring buffer"); return; }
            },
            _ = shutdown.changed() => return,
        }
    }
}

fn record(event: &VerdictEvent, registry: &crate::registry::Registry, flows: &FlowLog, metrics: &Metrics) {
    let (direction, verdict) = (event.direction, event.verdict);
    metrics
        .l4_verdicts
        .get_or_create(&VerdictLabels {
            verdict: VerdictLabel(verdict),
            direction: crate::metrics::direction_label(direction),
            hook: event.hook,
        })
        .inc();
    if verdict != Verdict::Allowed {
        info!(%verdict, %direction, dst = %event.destination, policy = event.policy_id, hook = event.hook, "L4 verdict");
    }
    let age = monotonic_now_ns().saturating_sub(event.monotonic_ns);
    let when = time::OffsetDateTime::now_utc() - time::Duration::nanoseconds(age as i64);
    let is_egress = direction == Direction::Egress;
    flows.push(FlowRecord {
        time: FlowTime(when),
        verdict,
        direction,
        // A connect hook runs before the client port (and often address) is chosen.
        source: if is_egress {
            Endpoint::unbound(event.cgroup_id).named(registry.workload(event.cgroup_id))
        } else {
            Endpoint::new(event.source, None)
        },
        destination: Endpoint::new(event.destination, None).named(registry.listener(event.destination)),
        l4: L4 {
            protocol: match event.protocol {
                redirector::Protocol::Tcp => "TCP",
                redirector::Protocol::Udp => "UDP",
            },
        },
        observer: format!("kernel:{}", event.hook).into(),
        redirected: event.redirected,
        proxy: None,
        policy: (event.policy_id != 0).then_some(event.policy_id),
        policy_name: (event.policy_id != 0).then(|| registry.policy_name(event.policy_id)).flatten(),
        latency_ns: None,
        reason: None,
        l7: None,
    });
}

fn monotonic_now_ns() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(|t| t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64)
        .unwrap_or(0)
}
