//! Request targets and authorities (l7proxy::canonical): what the rules judge must be what
//! the upstream acts on. A normalized path is a fixed point (an upstream that normalizes again
//! sees the same path) and carries no dot-segment, empty segment or decodable unreserved byte.
#![no_main]

use l7proxy::canonical::{canonicalize, normalize_path, HostFields};
use libfuzzer_sys::fuzz_target;

fn check_normal(p: &str) {
    assert!(p.starts_with('/'), "{p:?}");
    assert_eq!(normalize_path(p).as_deref(), Ok(p), "not a fixed point");
    let segments: Vec<&str> = p.split('/').skip(1).collect();
    for (i, seg) in segments.iter().enumerate() {
        assert!(*seg != "." && *seg != "..", "dot-segment left in {p:?}");
        assert!(!seg.is_empty() || i + 1 == segments.len(), "empty segment left in {p:?}");
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(p) = normalize_path(text) {
        check_normal(&p);
    }
    // The whole request line's target with a Host field, as hyper would hand them over.
    let (target, host) = text.split_once('\n').unwrap_or((text, "example.com"));
    let Ok(uri) = target.parse::<http::Uri>() else { return };
    let mut headers = http::HeaderMap::new();
    if let Ok(v) = http::HeaderValue::from_str(host) {
        headers.insert(http::header::HOST, v);
    }
    let hosts = HostFields::of(&headers);
    for version in [http::Version::HTTP_11, http::Version::HTTP_2] {
        for method in [http::Method::GET, http::Method::OPTIONS, http::Method::CONNECT] {
            if let Ok(c) = canonicalize(version, &method, &uri, &hosts, 80) {
                let judged = c.path_and_query.split('?').next().unwrap_or("");
                if judged != "*" {
                    check_normal(judged);
                }
                if let Some(rewrite) = &c.rewrite {
                    assert_eq!(rewrite.path_and_query().map(|p| p.as_str()), Some(&*c.path_and_query));
                }
            }
        }
    }
});
