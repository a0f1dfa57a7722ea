//! A Hubble GetFlowsRequest as the Observer socket receives it: protobuf bytes decoded, then
//! the request's filters, field mask and time range compiled and judged against flows. A bad
//! request is an `InvalidArgument`, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use prost::Message as _;

use l7mesh_hubble::proto::{Checked, Flow, GetFlowsRequest};
use l7mesh_hubble::server::Plan;

fuzz_target!(|data: &[u8]| {
    // The first byte says where the request ends and a flow to judge begins.
    let Some((&split, rest)) = data.split_first() else { return };
    let (request, flow) = rest.split_at(usize::from(split).min(rest.len()));
    let Ok(request) = Checked::<GetFlowsRequest>::decode(request) else { return };
    let Ok(plan) = Plan::new(&request) else { return };
    let flows = vec![Flow::default(), Flow::decode(flow).unwrap_or_default()];
    let _ = plan.past(flows);
});
