use super::*;

fn norm(p: &str) -> Result<String, PathError> {
    normalize_path(p).map(|c| c.into_owned())
}

#[test]
fn dot_segments_are_removed_in_every_spelling() {
    // Each of these is how an attacker asks for /admin/keys under an allow of /public/.*.
    for attack in [
        "/public/../admin/keys",
        "/public/%2e%2e/admin/keys",
        "/public/%2E%2E/admin/keys",
        "/public/.%2e/admin/keys",
        "/public/%2e./admin/keys",
        "/public/./../admin/keys",
        "/public//../admin/keys",
        "/public/x/../../admin/keys",
        "/public/%2e/%2e%2e/admin/keys",
        "/public/../../../../admin/keys",
        "//public/..//admin/./keys",
        "/public/..//admin/keys",
        "/%70ublic/../%61dmin/keys",
    ] {
        assert_eq!(norm(attack).unwrap(), "/admin/keys", "{attack}");
    }
}

#[test]
fn canonical_paths_are_borrowed() {
    for p in ["/", "/a", "/a/b/", "/public/status.json", "/a.b/c..d/.e/..f", "/~user/x_y-z", "/a;b=c/d"] {
        assert!(matches!(normalize_path(p), Ok(Cow::Borrowed(q)) if q == p), "{p}");
    }
}

#[test]
fn rfc3986_examples_and_edges() {
    assert_eq!(norm("/a/b/c/./../../g").unwrap(), "/a/g");
    assert_eq!(norm("/mid/content=5/../6").unwrap(), "/mid/6");
    assert_eq!(norm("/a/b/..").unwrap(), "/a/");
    assert_eq!(norm("/a/b/.").unwrap(), "/a/b/");
    assert_eq!(norm("/..").unwrap(), "/");
    assert_eq!(norm("/.").unwrap(), "/");
    assert_eq!(norm("//").unwrap(), "/");
    assert_eq!(norm("/a//b///c").unwrap(), "/a/b/c");
    assert_eq!(norm("/a/").unwrap(), "/a/");
}

#[test]
fn percent_encoding_is_canonical() {
    assert_eq!(norm("/%7euser").unwrap(), "/~user", "unreserved decoded");
    assert_eq!(norm("/a%20b").unwrap(), "/a%20b", "reserved kept");
    assert_eq!(norm("/a%3fb").unwrap(), "/a%3Fb", "hex upper-cased");
    assert_eq!(norm("/a%00b").unwrap(), "/a%00b");
    assert_eq!(norm("/%252e%252e/x").unwrap(), "/%252e%252e/x", "decoded once, never twice");
    assert_eq!(norm("/caf\u{e9}/../x").unwrap(), "/x", "non-ASCII kept intact");
}

#[test]
fn ambiguous_forms_are_refused() {
    for (p, e) in [
        ("/public/..%2fadmin", PathError::EncodedSeparator),
        ("/public%2F..%2Fadmin", PathError::EncodedSeparator),
        ("/public/..%5cadmin", PathError::EncodedSeparator),
        ("/public/..%5Cadmin", PathError::EncodedSeparator),
        ("/public/..\\admin", PathError::Backslash),
        ("/public\\..\\admin", PathError::Backslash),
        ("/a%", PathError::BadPercent),
        ("/a%2", PathError::BadPercent),
        ("/a%zz", PathError::BadPercent),
        ("/a%%32e", PathError::BadPercent),
        ("/public/..;/admin", PathError::DotSegmentParams),
        ("/public/.;x/../admin", PathError::DotSegmentParams),
        ("/public/%2e%2e;jsessionid=1/admin", PathError::DotSegmentParams),
        ("public/x", PathError::NotAbsolute),
    ] {
        assert_eq!(norm(p), Err(e), "{p}");
    }
}

#[test]
fn normalizing_twice_changes_nothing() {
    for p in ["/a/%2e%2e/b", "/x//y/./z/..", "/%7e%41%3f", "/a/b/../../../c/"] {
        let once = norm(p).unwrap();
        assert_eq!(norm(&once).unwrap(), once, "{p}");
    }
}

#[test]
fn authorities_are_strict() {
    assert_eq!(parse_authority("Example.COM:8080"), Ok(Authority { host: "Example.COM", port: Some(8080) }));
    assert_eq!(parse_authority("[::1]:80"), Ok(Authority { host: "[::1]", port: Some(80) }));
    assert_eq!(parse_authority("[::1]"), Ok(Authority { host: "[::1]", port: None }));
    assert_eq!(parse_authority("10.0.0.1"), Ok(Authority { host: "10.0.0.1", port: None }));
    assert_eq!(parse_authority("user@host"), Err(AuthorityError::Userinfo));
    assert_eq!(parse_authority("user:pw@host:80"), Err(AuthorityError::Userinfo));
    assert_eq!(parse_authority(""), Err(AuthorityError::Empty));
    for bad in ["a b", "host/x", "ho%73t", "a,b", "[::1", "[zz]", "[::1]x", ".", "..a", ".a", "a..b", "h\"x"] {
        assert!(matches!(parse_authority(bad), Err(AuthorityError::InvalidHost(_))), "{bad}");
    }
    for bad in ["host:", "host:x", "host:65536", "host:0", "host:123456", "host:8080:80", "host:+80"] {
        assert!(parse_authority(bad).is_err(), "{bad}");
    }
}

#[test]
fn host_rule_value_strips_only_the_destination_port() {
    let a = parse_authority("API.Example.:8080").unwrap();
    assert_eq!(a.rule_value(8080), "api.example");
    assert_eq!(a.rule_value(80), "api.example:8080");
    assert_eq!(parse_authority("api").unwrap().rule_value(8080), "api");
}

fn req(
    version: Version,
    method: Method,
    target: &str,
    hosts: &[&str],
) -> Result<(String, String, Option<String>), Malformed> {
    let uri: Uri = target.parse().unwrap();
    let mut h = HeaderMap::new();
    for v in hosts {
        h.append(header::HOST, v.parse().unwrap());
    }
    let hosts = HostFields::of(&h);
    canonicalize(version, &method, &uri, &hosts, 8080)
        .map(|c| (c.path_and_query.into_owned(), c.host.into_owned(), c.rewrite.map(|u| u.to_string())))
}

#[test]
fn http1_needs_exactly_one_valid_host() {
    use Version as V;
    assert_eq!(req(V::HTTP_11, Method::GET, "/x", &["a:8080"]).unwrap().1, "a");
    assert_eq!(req(V::HTTP_11, Method::GET, "/x", &[]), Err(Malformed::MissingHost));
    assert_eq!(req(V::HTTP_11, Method::GET, "/x", &["a", "b"]), Err(Malformed::DuplicateHost));
    assert_eq!(req(V::HTTP_11, Method::GET, "/x", &["a", "a"]), Err(Malformed::DuplicateHost));
    assert!(matches!(
        req(V::HTTP_11, Method::GET, "/x", &["u@a"]),
        Err(Malformed::Authority(AuthorityError::Userinfo))
    ));
    assert!(req(V::HTTP_11, Method::GET, "/x", &["a b"]).is_err());
    // HTTP/1.0 may go without Host; its host rules then see an empty name.
    assert_eq!(req(V::HTTP_10, Method::GET, "/x", &[]).unwrap().1, "");
}

#[test]
fn absolute_form_must_agree_with_host_and_goes_upstream_in_origin_form() {
    use Version as V;
    let (pq, host, rewrite) = req(V::HTTP_11, Method::GET, "http://A.example:8080/x?q=1", &["a.example:8080"]).unwrap();
    assert_eq!((pq.as_str(), host.as_str(), rewrite.as_deref()), ("/x?q=1", "a.example", Some("/x?q=1")));
    // Ports must be spelled alike: `a` and `a:80` are different rule values.
    assert!(matches!(req(V::HTTP_11, Method::GET, "http://a/x", &["a:80"]), Err(Malformed::TargetHostMismatch { .. })));
    assert!(req(V::HTTP_11, Method::GET, "http://a:80/x", &["A:80"]).is_ok());
    assert!(matches!(
        req(V::HTTP_11, Method::GET, "http://other.example/x", &["allowed.example"]),
        Err(Malformed::TargetHostMismatch { .. })
    ));
    assert!(matches!(req(V::HTTP_11, Method::GET, "http://a:81/x", &["a"]), Err(Malformed::TargetHostMismatch { .. })));
    assert!(matches!(
        req(V::HTTP_11, Method::GET, "http://u@a/x", &["a"]),
        Err(Malformed::Authority(AuthorityError::Userinfo))
    ));
    assert_eq!(req(V::HTTP_11, Method::GET, "http://a/x", &[]), Err(Malformed::MissingHost));
    assert!(matches!(req(V::HTTP_11, Method::GET, "ftp://a/x", &["a"]), Err(Malformed::Scheme(_))));
    assert_eq!(req(V::HTTP_11, Method::GET, "http://a", &["a"]).unwrap().0, "/");
}

#[test]
fn target_forms() {
    use Version as V;
    assert_eq!(req(V::HTTP_11, Method::OPTIONS, "*", &["a"]).unwrap().0, "*");
    assert_eq!(req(V::HTTP_11, Method::GET, "*", &["a"]), Err(Malformed::TargetForm));
    assert_eq!(req(V::HTTP_11, Method::GET, "a.example:80", &["a.example"]), Err(Malformed::TargetForm));
}

#[test]
fn normalized_path_keeps_the_query_as_sent_and_is_forwarded() {
    let (pq, _, rewrite) = req(Version::HTTP_11, Method::GET, "/public/%2e%2e/admin?x=/../%2e&y", &["a"]).unwrap();
    assert_eq!(pq, "/admin?x=/../%2e&y");
    assert_eq!(rewrite.as_deref(), Some("/admin?x=/../%2e&y"));
    let (pq, _, rewrite) = req(Version::HTTP_11, Method::GET, "/public/a?x", &["a"]).unwrap();
    assert_eq!((pq.as_str(), rewrite), ("/public/a?x", None));
}

#[test]
fn http2_authority_and_host_must_agree() {
    use Version as V;
    let ok = req(V::HTTP_2, Method::GET, "http://a.example:8080/p/../q", &[]).unwrap();
    assert_eq!(ok, ("/q".into(), "a.example".into(), Some("http://a.example:8080/q".into())));
    assert!(req(V::HTTP_2, Method::GET, "http://a/x", &["A"]).is_ok());
    assert!(matches!(req(V::HTTP_2, Method::GET, "http://a/x", &["b"]), Err(Malformed::AuthorityHostMismatch { .. })));
    assert_eq!(req(V::HTTP_2, Method::GET, "http://a/x", &["a", "a"]), Err(Malformed::DuplicateHost));
    assert!(matches!(
        req(V::HTTP_2, Method::GET, "http://u@a/x", &[]),
        Err(Malformed::Authority(AuthorityError::Userinfo))
    ));
}

#[test]
fn http2_field_whitespace() {
    let mut h = HeaderMap::new();
    h.insert("x-a", "v".parse().unwrap());
    assert!(check_h2_fields(&h).is_ok());
    for bad in [" v", "v ", "\tv", "v\t"] {
        let mut h = HeaderMap::new();
        h.insert("x-a", http::HeaderValue::from_str(bad).unwrap());
        assert_eq!(check_h2_fields(&h), Err(Malformed::FieldWhitespace("x-a".into())), "{bad:?}");
    }
}

/// Every path built from the characters that matter (slashes, dots, escapes, parameters,
/// backslashes, multi-byte text) either is refused or normalizes to a canonical path: no
/// empty, `.` or `..` segment left, idempotent, and never a panic. A small deterministic
/// generator keeps the run reproducible without a dependency.
#[test]
fn random_paths_normalize_to_canonical_form_or_are_refused() {
    const ALPHABET: &[&str] =
        &["/", "/", ".", ".", "%", "2", "e", "E", "f", "F", "5", "c", "a", ";", "\\", "x", "%2e", "%2E", "é", "?"];
    let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    for _ in 0..200_000 {
        let len = (next() % 24) as usize;
        let mut path = String::from("/");
        for _ in 0..len {
            path.push_str(ALPHABET[(next() % ALPHABET.len() as u64) as usize]);
        }
        let path = path.split('?').next().unwrap().to_string();
        let Ok(normalized) = normalize_path(&path) else { continue };
        let n = normalized.as_ref();
        assert!(n.starts_with('/'), "{path} -> {n}");
        assert!(!n.contains("//"), "{path} -> {n}");
        assert!(n.split('/').all(|s| s != "." && s != ".."), "{path} -> {n}");
        assert!(!n.contains('\\'), "{path} -> {n}");
        assert_eq!(normalize_path(n).unwrap(), n, "idempotent: {path}");
    }
}

// Review: forms still judged one way and forwarded another.

/// A path-less absolute-form target with a query (`http://a?x`) is judged as the path `?x`,
/// but hyper writes the rewritten target as `/?x`: a rule sees what the upstream never gets.
#[test]
fn a_path_less_target_is_judged_with_the_root_it_is_forwarded_with() {
    let (pq, _, rewrite) = req(Version::HTTP_11, Method::GET, "http://a?x", &["a"]).unwrap();
    assert_eq!((pq.as_str(), rewrite.as_deref()), ("/?x", Some("/?x")), "judged `{pq}`, forwarded {rewrite:?}");
    let (pq, _, _) = req(Version::HTTP_11, Method::OPTIONS, "http://a?x", &["a"]).unwrap();
    assert_eq!(pq, "/?x");
}

/// HTTP/2 `:path: ?x` (no leading `/`, not `*`) is not origin-form (RFC 9113 §8.3.1): it is
/// accepted, judged as `?x`, and h2 forwards `:path: ?x` as is.
#[test]
fn an_http2_path_that_is_not_origin_form_is_malformed() {
    let mut parts = http::uri::Parts::default();
    parts.scheme = Some(http::uri::Scheme::HTTP);
    parts.authority = Some("a".parse().unwrap());
    parts.path_and_query = Some("?x".parse().unwrap());
    let uri = Uri::from_parts(parts).unwrap();
    let hosts = HostFields::default();
    let got = canonicalize(Version::HTTP_2, &Method::GET, &uri, &hosts, 8080);
    assert_eq!(got.map(|c| c.path_and_query.into_owned()), Err(Malformed::TargetForm));
}

/// The rules judge the absolute-form target's (or `:authority`'s) authority, but the Host
/// field goes upstream as sent. "Agreeing" up to the scheme's default port, the two give
/// different rule values: `Host: a:80` alone on port 8080 is judged `a:80`, behind
/// `http://a/x` it is judged `a`. One authority per request means one rule value: either
/// the Host forwarded is the one judged, or the two must be spelled alike.
#[test]
fn the_host_judged_is_the_host_forwarded() {
    use Version as V;
    let alone = req(V::HTTP_11, Method::GET, "/x", &["a:80"]).unwrap().1;
    assert_eq!(alone, "a:80");
    for (v, target, host) in [
        (V::HTTP_11, "http://a/x", "a:80"),
        (V::HTTP_11, "https://a/x", "a:443"),
        (V::HTTP_2, "http://a/x", "a:80"),
        (V::HTTP_2, "https://a/x", "a:443"),
    ] {
        let judged = req(v, Method::GET, target, &[host]).map(|c| c.1);
        let forwarded_alone = req(V::HTTP_11, Method::GET, "/x", &[host]).unwrap().1;
        assert!(
            judged.is_err() || judged.as_deref() == Ok(forwarded_alone.as_str()),
            "{v:?} {target} + host {host}: judged {judged:?}, the upstream's Host is judged `{forwarded_alone}`"
        );
    }
}

/// HTTP/1.0 with an absolute-form target and no Host: the rules judge the target's name, the
/// target goes upstream in origin-form, and no Host is added, so the upstream picks its
/// default virtual host. Refuse it (as HTTP/1.1 does), or judge it as Host-less.
#[test]
fn http10_absolute_form_without_host_is_not_judged_by_a_name_the_upstream_never_gets() {
    let got = req(Version::HTTP_10, Method::GET, "http://allowed.example/x", &[]);
    assert!(
        matches!(&got, Err(Malformed::MissingHost)) || matches!(&got, Ok((_, host, _)) if host.is_empty()),
        "{got:?}"
    );
}
