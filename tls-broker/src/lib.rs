//! tls-broker: the only holder of the mesh CA and of imported TLS secrets.
//!
//! State lives in a 0700 directory (keys 0600, never logged): `ca.key`, `ca.crt`, and
//! `secrets/<namespace>/<name>/{tls.crt,tls.key,ca.crt}`. Two Unix sockets serve it:
//! - the admin socket (root only, 0600): import a secret, read the CA certificate; it never
//!   returns a key;
//! - the proxy socket: issues leaf certificates and hands out secrets, only to callers whose
//!   peer credentials (SO_PEERCRED uid), cgroup and executable match the proxy's identity.
//!
//! The protocol is one JSON request and one JSON reply per line ([`Request`], [`Reply`]).
#![forbid(unsafe_code)]

pub mod ca;
pub mod protocol;
pub mod server;
pub mod trust;

pub use ca::{Ca, CaError, Issued};
pub use protocol::{Reply, Request};
