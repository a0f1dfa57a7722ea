//! Decoding of the L4 verdict events the kernel programs put in the `L7_EVENTS` ring buffer.

use std::net::SocketAddr;

use redirector_common::{hook, verdict, L4Event, DIRECTION_INGRESS, EVENT_REDIRECTED};

use l7mesh_api::{Direction, Verdict};

use crate::{from_words, Protocol};

/// One kernel L4 verdict.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VerdictEvent {
    /// CLOCK_MONOTONIC nanoseconds (bpf_ktime_get_ns).
    pub monotonic_ns: u64,
    /// The source workload's cgroup (0 when the source is not a local workload).
    pub cgroup_id: u64,
    /// Unknown (port 0, unspecified address) for egress: the client port is not chosen yet.
    pub source: SocketAddr,
    pub destination: SocketAddr,
    pub protocol: Protocol,
    pub direction: Direction,
    /// Allowed, Denied or Audit (a denial of an audit-mode policy: let through and reported);
    /// the kernel never says Forwarded.
    pub verdict: Verdict,
    pub policy_id: u32,
    pub redirected: bool,
    /// Which hook decided: "connect", "sendmsg" or "sk_lookup".
    pub hook: &'static str,
}

impl VerdictEvent {
    /// Decodes one ring-buffer record; `None` for a record of the wrong size or unknown values.
    pub fn decode(bytes: &[u8]) -> Option<Self> {
        if bytes.len() < std::mem::size_of::<L4Event>() {
            return None;
        }
        // SAFETY: the length was checked; L4Event is plain old data and the read is unaligned.
        let raw: L4Event = unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast()) };
        Some(VerdictEvent {
            monotonic_ns: raw.timestamp_ns,
            cgroup_id: raw.cgroup_id,
            source: SocketAddr::new(from_words(raw.src_addr), raw.src_port),
            destination: SocketAddr::new(from_words(raw.dst_addr), raw.dst_port),
            protocol: Protocol::from_raw(raw.protocol)?,
            direction: if raw.direction == DIRECTION_INGRESS { Direction::Ingress } else { Direction::Egress },
            verdict: match raw.verdict {
                verdict::ALLOWED => Verdict::Allowed,
                verdict::DENIED => Verdict::Denied,
                verdict::AUDIT => Verdict::Audit,
                _ => return None,
            },
            policy_id: raw.policy_id,
            redirected: raw.flags & EVENT_REDIRECTED != 0,
            hook: match raw.hook {
                hook::CONNECT => "connect",
                hook::SENDMSG => "sendmsg",
                hook::SK_LOOKUP => "sk_lookup",
                _ => "unknown",
            },
        })
    }
}

/// The ring buffer registered with tokio's reactor, yielding decoded events.
pub struct AsyncEvents {
    fd: tokio::io::unix::AsyncFd<aya::maps::RingBuf<aya::maps::MapData>>,
}

impl AsyncEvents {
    pub fn new(ring: aya::maps::RingBuf<aya::maps::MapData>) -> std::io::Result<Self> {
        // SAFETY: the RingBuf owns its fd and is moved into the AsyncFd, so the fd stays open
        // and is not closed or reused while registered.
        let fd = unsafe { tokio::io::unix::AsyncFd::register(ring) }.map_err(|e| e.into_parts().1)?;
        Ok(AsyncEvents { fd })
    }

    /// Waits until events are available, then returns every event queued so far.
    pub async fn next_batch(&mut self) -> std::io::Result<Vec<VerdictEvent>> {
        loop {
            let mut guard = self.fd.readable_mut().await?;
            let ring = guard.get_inner_mut();
            let mut batch = Vec::new();
            while let Some(item) = ring.next() {
                if let Some(event) = VerdictEvent::decode(&item) {
                    batch.push(event);
                }
            }
            guard.clear_ready();
            if !batch.is_empty() {
                return Ok(batch);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(verdict: u8, direction: u8) -> Vec<u8> {
        let event = L4Event { verdict, direction, protocol: redirector_common::IPPROTO_TCP, ..L4Event::default() };
        // SAFETY: L4Event is plain old data; the slice covers exactly its bytes and lives only here.
        unsafe { std::slice::from_raw_parts((&event as *const L4Event).cast::<u8>(), std::mem::size_of::<L4Event>()) }
            .to_vec()
    }

    /// The ring's records decode straight to the house's Verdict and Direction; a verdict byte
    /// the kernel never writes is not guessed.
    #[test]
    fn events_decode_to_the_one_verdict_and_direction() {
        let e = VerdictEvent::decode(&raw(verdict::AUDIT, DIRECTION_INGRESS)).unwrap();
        assert_eq!((e.verdict, e.direction), (Verdict::Audit, Direction::Ingress));
        let e = VerdictEvent::decode(&raw(verdict::DENIED, redirector_common::DIRECTION_EGRESS)).unwrap();
        assert_eq!((e.verdict, e.direction), (Verdict::Denied, Direction::Egress));
        assert_eq!(VerdictEvent::decode(&raw(verdict::ALLOWED, 0)).unwrap().verdict, Verdict::Allowed);
        assert!(VerdictEvent::decode(&raw(0xee, 0)).is_none());
        assert!(VerdictEvent::decode(&raw(verdict::ALLOWED, 0)[..8]).is_none());
    }
}
