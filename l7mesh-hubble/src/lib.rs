//! Hubble's Observer gRPC API over l7mesh's flows, so that the `hubble` CLI and tools built on
//! Hubble read a node's flows unchanged: the wire messages with Hubble's field numbers
//! ([`proto`]), an l7mesh flow as Hubble's ([`convert`]), Hubble's flow filters ([`filter`]) and
//! the server on a root-only unix socket ([`server`]; l7proxy runs it over its flow ring).
#![forbid(unsafe_code)]

pub mod convert;
pub mod filter;
pub mod mask;
pub mod proto;
pub mod server;
