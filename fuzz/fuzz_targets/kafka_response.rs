//! An upstream Kafka response as l7proxy merges it: decoded for the request's API and
//! version, the denied topics' errors added, re-encoded. A hostile broker chooses these
//! bytes; nothing it sends may panic the proxy.
#![no_main]

use bytes::Bytes;
use kafka_protocol::messages::{ApiKey, RequestKind, ResponseKind};
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
    if let Ok(mut resp) = ResponseKind::decode(api_key, &mut Bytes::copy_from_slice(response), version) {
        add_denied(&mut resp, &request, &denied);
        let _ = encode(&resp, version);
    }
    // The proxy's own response skeleton gets the same merge.
    let mut empty = empty_response(api_key);
    add_denied(&mut empty, &request, &denied);
    let _ = encode(&empty, version);
});
