//! l7policy: the policy language (ARCHITECTURE.md, "The policy pipeline"): the
//! CiliumNetworkPolicy model, its reader (YAML/JSON with line numbers), labels and selectors, the
//! validation that names `file:line: field` for what is refused, and the compiler into the
//! redirector's map entries and the proxy's rule tables. Pure: the daemon (policy-api), l7ctl and
//! the fuzz targets link it.
#![forbid(unsafe_code)]

pub mod compile;
pub mod labels;
pub mod model;
pub mod source;
pub mod validate;
