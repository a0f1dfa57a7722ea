//! The node's control socket (`l7ctl run` registers a workload on it); its messages are
//! l7mesh-api's.

pub use l7mesh_api::control::{Reply, Request};
