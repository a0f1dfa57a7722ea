//! Reads the kernel's L4 verdict events from the ring buffer into flows and metrics. Each
//! denial is a flow that names its rule and reason; the log gets one summary per period
//! ([`SUMMARY_PERIOD`]), not a line per denial (a denied retry loop would flood it).

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use redirector::{AsyncEvents, VerdictEvent};
use tokio::sync::watch;
use tracing::{debug, info, warn};

use crate::flows::{Endpoint, FlowLog, FlowRecord, FlowTime, Reason, L4};
use crate::metrics::{Metrics, VerdictLabel, VerdictLabels};
use crate::tables::KernelSide;
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
    let mut summary = DenialSummary::default();
    let mut period = tokio::time::interval(SUMMARY_PERIOD);
    period.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            batch = events.next_batch() => match batch {
                Ok(batch) => batch.iter().for_each(|e| {
                    summary.count(e);
                    record(e, &registry, &flows, &metrics)
                }),
                Err(e) => { warn!(error = %e, "L4 event ring buffer"); return; }
            },
            _ = period.tick() => {
                if let Some(line) = summary.take() {
                    info!("{line}");
                }
            }
            _ = shutdown.changed() => return,
        }
    }
}

/// How often kernel denials are summed up in the log.
pub const SUMMARY_PERIOD: Duration = Duration::from_secs(10);

/// Kernel denials (and audits) since the last summary, and how many workloads they came from.
#[derive(Default)]
pub struct DenialSummary {
    denied: u64,
    audited: u64,
    /// Source cgroups (0: from outside the node, one entry for them all), bounded: a summary
    /// says "N+ workloads" past it.
    sources: HashSet<u64>,
}

/// Distinct sources a summary counts at most.
const SUMMARY_SOURCES: usize = 1024;

impl DenialSummary {
    pub fn count(&mut self, event: &VerdictEvent) {
        match event.verdict {
            Verdict::Denied => self.denied += 1,
            Verdict::Audit => self.audited += 1,
            _ => return,
        }
        if self.sources.len() < SUMMARY_SOURCES {
            self.sources.insert(event.cgroup_id);
        }
    }

    /// The line for the period just ended, if anything was denied or audited; starts afresh.
    pub fn take(&mut self) -> Option<String> {
        if self.denied == 0 && self.audited == 0 {
            return None;
        }
        let n = self.sources.len();
        let sources = if n >= SUMMARY_SOURCES { format!("{n}+ sources") } else { format!("{n} source(s)") };
        let secs = SUMMARY_PERIOD.as_secs();
        let line = format!(
            "{} kernel denial(s){} ({sources}) in the last {secs}s; see l7ctl observe --verdict denied (or l7ctl explain)",
            self.denied,
            if self.audited > 0 { format!(" and {} audit(s)", self.audited) } else { String::new() },
        );
        *self = DenialSummary::default();
        Some(line)
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
        debug!(%verdict, %direction, dst = %event.destination, policy = event.policy_id, hook = event.hook, "L4 verdict");
    }
    let age = monotonic_now_ns().saturating_sub(event.monotonic_ns);
    let when = time::OffsetDateTime::now_utc() - time::Duration::nanoseconds(age as i64);
    let is_egress = direction == Direction::Egress;
    // A connect hook runs before the client port (and often address) is chosen.
    let source = if is_egress {
        Endpoint::unbound(event.cgroup_id).named(registry.workload(event.cgroup_id))
    } else {
        Endpoint::new(event.source, None)
    };
    let destination = Endpoint::new(event.destination, None).named(registry.listener(event.destination));
    // Which side decided, by which rule, and why: from the rule id the kernel reported.
    let why = (verdict != Verdict::Allowed).then(|| {
        fn side(e: &Endpoint, addr: std::net::SocketAddr) -> KernelSide<'_> {
            KernelSide {
                workload: e.workload.as_deref(),
                name: match &e.workload {
                    Some(w) => w.name.clone(),
                    None => addr.to_string(),
                },
            }
        }
        registry.tables().explain_kernel(
            direction,
            event.policy_id,
            &side(&source, event.source),
            &side(&destination, event.destination),
        )
    });
    flows.push(FlowRecord {
        time: FlowTime(when),
        verdict,
        direction: why.as_ref().map_or(direction, |e| e.direction),
        source,
        destination,
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
        // The deciding policy: the id the kernel reports can be the other side's allow (a
        // connect reports the egress side's id when it has one).
        policy_name: why
            .as_ref()
            .and_then(|e| e.decided_by.as_ref())
            .map(|d| d.policy.as_str().into())
            .or_else(|| (event.policy_id != 0).then(|| registry.policy_name(event.policy_id)).flatten()),
        decided_by: why.as_ref().and_then(|e| e.decided_by.clone()),
        latency_ns: None,
        reason: why.map(|e| Reason::Policy(e.reason)),
        l7: None,
    });
}

fn monotonic_now_ns() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(|t| t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(verdict: Verdict, cgroup_id: u64) -> VerdictEvent {
        VerdictEvent {
            monotonic_ns: 0,
            cgroup_id,
            source: "0.0.0.0:0".parse().unwrap(),
            destination: "127.0.0.1:80".parse().unwrap(),
            protocol: redirector::Protocol::Tcp,
            direction: Direction::Egress,
            verdict,
            policy_id: 0,
            redirected: false,
            hook: "connect",
        }
    }

    /// Denials are summed up once a period, with the workloads they came from; a quiet period
    /// logs nothing, and allowed connections are never counted.
    #[test]
    fn denials_are_summed_up_not_logged_one_by_one() {
        let mut s = DenialSummary::default();
        assert_eq!(s.take(), None);
        for cgroup in [1, 1, 2, 3] {
            s.count(&event(Verdict::Denied, cgroup));
        }
        s.count(&event(Verdict::Allowed, 9));
        s.count(&event(Verdict::Audit, 1));
        assert_eq!(
            s.take().unwrap(),
            "4 kernel denial(s) and 1 audit(s) (3 source(s)) in the last 10s; see l7ctl observe --verdict denied (or l7ctl explain)"
        );
        assert_eq!(s.take(), None, "a new period starts empty");
        for cgroup in 0..5000 {
            s.count(&event(Verdict::Denied, cgroup));
        }
        assert!(
            s.take().unwrap().starts_with("5000 kernel denial(s) (1024+ sources)"),
            "the set of sources is bounded"
        );
        s.count(&event(Verdict::Allowed, 1));
        assert_eq!(s.take(), None);
    }
}
