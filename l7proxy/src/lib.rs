//! l7proxy as a library: the proxy's modules, so that the binary (`main.rs`), the fuzz targets
//! (`fuzz/`) and in-process tests drive the same code.
#![forbid(unsafe_code)]

pub mod admin;
pub mod body;
pub mod canonical;
pub mod client_addr;
pub mod context;
pub mod datapath;
pub mod events;
pub mod flow_history;
pub mod flows;
pub mod framing;
pub mod http;
pub mod hubble;
pub mod kafka;
pub mod kafka_topics;
pub mod limits;
pub mod metric_context;
pub mod metrics;
pub mod plan;
pub mod policy_stream;
pub mod pool;
pub mod proxy;
pub mod registry;
pub mod respond;
pub mod sni;
pub use l7rules as tables;
pub mod tls;
pub mod tunnel;
pub mod upstream;
