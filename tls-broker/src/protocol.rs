//! One JSON request and one JSON reply per line on the broker's sockets: the types live in
//! `l7mesh_api::broker` (ARCHITECTURE.md, "Contracts between processes (`l7mesh-api`)").

pub use l7mesh_api::broker::{Reply, Request};
