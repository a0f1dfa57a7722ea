//! policy-api: the CiliumNetworkPolicy model, its validation and compilation into the
//! redirector's maps and the proxy's tables, the REST API and `l7ctl` (DESIGN.md).
//!
//! Not built yet: this crate is a placeholder in the workspace layout and exports nothing.
//! Until the policy milestone, policies are written with the redirector's typed operations
//! (`redirector::PolicySnapshot`), which is exactly what the compiler will produce.
#![forbid(unsafe_code)]
