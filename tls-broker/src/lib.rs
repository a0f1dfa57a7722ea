//! tls-broker: the only holder of the mesh CA and imported TLS secrets (DESIGN.md).
//!
//! Not built yet: this crate is a placeholder in the workspace layout and exports nothing.
//! Its daemon, admin socket and proxy socket arrive with the TLS milestone.
#![forbid(unsafe_code)]
