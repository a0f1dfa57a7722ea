//! Hubble's Observer API over the flow ring (`l7mesh_hubble`): the ring's records as Hubble
//! flows, served on a root-only unix socket (`--hubble-socket`).

use std::sync::Arc;

use l7mesh_hubble::convert::{to_hubble, Workloads};
use l7mesh_hubble::proto;
use l7mesh_hubble::server::{Counts, FlowSource};

use crate::flows::{FlowFilter, FlowLog, FlowRecord};

/// The flow log as the Hubble server reads it; flows name `node_name` as the node they were
/// observed on.
pub struct RingSource {
    pub flows: Arc<FlowLog>,
    pub node_name: String,
}

impl FlowSource for RingSource {
    type Record = FlowRecord;

    fn to_hubble(&self, r: &FlowRecord) -> proto::Flow {
        let workloads =
            Workloads { source: r.source.workload.as_deref(), destination: r.destination.workload.as_deref() };
        to_hubble(&r.view(), workloads, &self.node_name)
    }

    fn snapshot(&self) -> Vec<FlowRecord> {
        self.flows.snapshot(&FlowFilter::default())
    }

    fn follow(&self) -> (Vec<FlowRecord>, tokio::sync::broadcast::Receiver<FlowRecord>) {
        let (_, past, live) = self.flows.follow(&FlowFilter::default());
        (past, live)
    }

    fn counts(&self) -> Counts {
        let (num, max, seen) = self.flows.counts();
        Counts { num_flows: num as u64, max_flows: max as u64, seen_flows: seen }
    }
}

/// The node's name for Hubble's `node_name`: the kernel's host name.
pub fn node_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname").map(|s| s.trim().to_string()).unwrap_or_default()
}
