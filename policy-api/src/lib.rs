//! policy-api: the CiliumNetworkPolicy model, its validation, its compilation into the
//! redirector's maps and the proxy's tables, the store, and `l7ctl`.
#![forbid(unsafe_code)]

pub mod compile;
pub mod control;
pub mod labels;
pub mod model;
pub mod node;
pub mod source;
pub mod store;
pub mod validate;
