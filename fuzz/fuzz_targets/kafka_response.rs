//! An upstream Kafka response as l7proxy post-processes it: `l7proxy::kafka::rewrite_response`,
//! the function the proxy calls for every answer it owes (correlation checked, decoded within
//! the item bound, the denied topics' errors merged in, ApiVersions capped, re-encoded within
//! the response bound). A hostile broker chooses these bytes; nothing it sends may panic the
//! proxy, and what goes to the client is a whole frame within the bound.
#![no_main]

use bytes::{BufMut, Bytes, BytesMut};
use kafka_protocol::messages::{ApiKey, RequestKind, ResponseHeader};
use kafka_protocol::protocol::Encodable;
use l7proxy::kafka::{rewrite_response, Denied, Expect, KafkaLimits};
use l7proxy::kafka_topics::{add_denied, empty_response, encode};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // [api key: 2][version: 2][request length: 2][request body][response body]
    if data.len() < 6 {
        return;
    }
    let Ok(api_key) = ApiKey::try_from(i16::from_be_bytes([data[0], data[1]])) else { return };
    let version = i16::from_be_bytes([data[2], data[3]]);
    let versions = api_key.valid_versions();
    if version < versions.min || version > versions.max {
        return;
    }
    let split = usize::from(u16::from_be_bytes([data[4], data[5]])).min(data.len() - 6);
    let (request, response) = data[6..].split_at(split);
    let Ok(request) = RequestKind::decode(api_key, &mut Bytes::copy_from_slice(request), version) else { return };
    let salt = response.first().copied().unwrap_or(0);
    let denied = |t: Option<&str>| t.map_or(salt & 1 == 1, |t| t.len() % 2 == usize::from(salt & 1));
    let limits = KafkaLimits { max_items: 20_000, max_response_frame: 256 << 10, ..KafkaLimits::default() };
    // The broker's answer, behind the header the proxy expects (correlation id 7).
    let mut frame = BytesMut::new();
    let header = ResponseHeader::default().with_correlation_id(7);
    header.encode(&mut frame, api_key.response_header_version(version)).expect("header");
    frame.put_slice(response);
    let frame = frame.freeze();
    // As forwarded with nothing denied, and with the denied part kept.
    for with_denied in [false, true] {
        let denied_part = with_denied.then(|| Box::new(Denied::of(request.clone(), version, &mut |t| denied(t))));
        let expect = Expect { api_key, version, correlation_id: 7, denied: denied_part };
        if let Ok(out) = rewrite_response(frame.clone(), &expect, &limits) {
            let len = i32::from_be_bytes(out[..4].try_into().unwrap()) as usize;
            assert_eq!(out.len() - 4, len);
            assert!(len <= limits.max_response_frame);
        }
    }
    // A wrong correlation id is refused.
    let wrong = Expect { api_key, version, correlation_id: 8, denied: None };
    assert!(rewrite_response(frame, &wrong, &limits).is_err());
    // The proxy's own response skeleton gets the same merge.
    let mut empty = empty_response(api_key);
    add_denied(&mut empty, &request, &denied);
    let _ = encode(&empty, version);
});
