//! Flows as l7proxy records them, read back for simulation and the service map: the shared
//! types in `l7mesh_api::flow` (ARCHITECTURE.md, "Contracts between processes (`l7mesh-api`)").

pub use l7mesh_api::flow::*;
