//! A Kafka request frame as l7proxy judges it: `l7proxy::kafka::classify`, the one function the
//! proxy calls for every request frame (decode within the item bound, judge, rewrite, answer or
//! forward). Besides not panicking: the request forwarded upstream names no denied topic
//! (classified again, nothing is removed), every answer made here is a frame within the
//! response bound, and the denial state holds only denied items.
#![no_main]

use bytes::Bytes;
use kafka_protocol::messages::RequestKind;
use l7proxy::kafka::{classify, Action, KafkaLimits};
use l7proxy::kafka_topics::{retain_topics, Judged};
use l7proxy::tables::{Decision, KafkaRequest};
use libfuzzer_sys::fuzz_target;

/// A judge that denies a topic by its name and a salt from the input, so the fuzzer explores
/// both verdicts for every topic it invents.
fn denied(salt: u8, topic: Option<&str>) -> bool {
    let Some(t) = topic else { return salt & 0x80 != 0 };
    t.bytes().fold(salt, |h, b| h.rotate_left(3) ^ b) & 1 == 1
}

fn decide(salt: u8, r: &KafkaRequest) -> Decision {
    if denied(salt, r.topic) {
        Decision::Deny { policy: "fuzz".into() }
    } else {
        Decision::Allow { policy: None }
    }
}

/// Small bounds, so that inputs of the fuzzer's sizes reach them.
fn limits() -> KafkaLimits {
    KafkaLimits { max_items: 20_000, max_response_frame: 256 << 10, ..KafkaLimits::default() }
}

fuzz_target!(|data: &[u8]| {
    let Some((&salt, frame)) = data.split_first() else { return };
    let limits = limits();
    let Ok(c) = classify(Bytes::copy_from_slice(frame), &limits, &mut |r| decide(salt, r)) else { return };
    assert!(c.judgments.len() <= l7proxy::kafka::FLOWS_PER_REQUEST);
    match c.action {
        Action::Answer(out) => {
            assert_eq!(out.len() - 4, i32::from_be_bytes(out[..4].try_into().unwrap()) as usize);
            assert!(out.len() - 4 <= limits.max_response_frame);
        }
        Action::Drop => {}
        Action::Forward { frame: out, expect } => {
            assert_eq!(out.len() - 4, i32::from_be_bytes(out[..4].try_into().unwrap()) as usize);
            let Some(denied_part) = expect.and_then(|e| e.denied) else { return };
            // Classified again, the forwarded request has nothing left to remove.
            let again = classify(out.slice(4..), &limits, &mut |r| decide(salt, r)).expect("the forwarded request");
            assert!(
                matches!(again.action, Action::Forward { expect: Some(ref e), .. } if e.denied.is_none()),
                "the forwarded request still names a denied topic: {:?}",
                again.action
            );
            // The denial state holds only denied items: judged with the inverse verdict,
            // nothing of it is removed.
            let mut kept: RequestKind = denied_part.request().clone();
            let judged = retain_topics(&mut kept, c.version, &mut |t| denied(salt, t));
            assert!(matches!(judged, Judged::Items { removed: 0, .. } | Judged::Whole { .. } | Judged::NoTopic), "{judged:?}");
        }
    }
});
