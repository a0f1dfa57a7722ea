//! A Kafka request frame as l7proxy judges it: header and body decoded, the denied topics
//! removed, the rest re-encoded. Besides not panicking: the request forwarded upstream names
//! no denied topic (decoded again and judged again, nothing is removed), and every request
//! that decodes can be answered with a native denial.
#![no_main]

use bytes::Bytes;
use kafka_protocol::messages::{ApiKey, RequestHeader, RequestKind};
use kafka_protocol::protocol::Decodable;
use l7proxy::kafka_topics::{
    all_topics_denied, reencode, retain_topics, whole_denial, Judged, TOPIC_AUTHORIZATION_FAILED,
};
use libfuzzer_sys::fuzz_target;

/// A judge that denies a topic by its name and a salt from the input, so the fuzzer explores
/// both verdicts for every topic it invents.
fn denied(salt: u8, topic: Option<&str>) -> bool {
    let Some(t) = topic else { return salt & 0x80 != 0 };
    t.bytes().fold(salt, |h, b| h.rotate_left(3) ^ b) & 1 == 1
}

fuzz_target!(|data: &[u8]| {
    let Some((&salt, frame)) = data.split_first() else { return };
    if frame.len() < 4 {
        return;
    }
    let api_key = i16::from_be_bytes([frame[0], frame[1]]);
    let version = i16::from_be_bytes([frame[2], frame[3]]);
    let Ok(api_key) = ApiKey::try_from(api_key) else { return };
    let versions = api_key.valid_versions();
    if version < versions.min || version > versions.max {
        return;
    }
    let mut body = Bytes::copy_from_slice(frame);
    let Ok(_header) = RequestHeader::decode(&mut body, api_key.request_header_version(version)) else { return };
    let Ok(original) = RequestKind::decode(api_key, &mut body, version) else { return };

    let mut req = original.clone();
    let judged = retain_topics(&mut req, version, &mut |t| !denied(salt, t));
    if let Judged::Items { kept, removed } = judged {
        // What the proxy forwards: the rewritten request, only if it decodes back to what was
        // judged (else the proxy refuses it). Judged again, nothing is left to remove.
        if removed > 0 && kept > 0 {
            if let Ok(out) = reencode(api_key, version, &req) {
                let mut again = RequestKind::decode(api_key, &mut out.freeze(), version).expect("checked");
                let rejudged = retain_topics(&mut again, version, &mut |t| !denied(salt, t));
                assert!(
                    !matches!(rejudged, Judged::Items { removed: 1.., .. } | Judged::Whole { allowed: false }),
                    "the forwarded request still names a denied topic: {rejudged:?}"
                );
            }
        }
    }
    // The native denials the proxy answers with.
    whole_denial(api_key, version, &original, TOPIC_AUTHORIZATION_FAILED).expect("whole denial encodes");
    if matches!(judged, Judged::Items { .. }) {
        all_topics_denied(api_key, version, &original).expect("all-topics denial encodes");
    }
});
