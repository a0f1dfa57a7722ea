//! What a request's rules are judged on is what the upstream acts on.
//!
//! Before any rule sees a request, its target is reduced to one canonical form, and that form is
//! what goes upstream:
//! - the path is normalized as Envoy's `normalize_path` + `merge_slashes` do: percent-encoded
//!   unreserved characters decoded (RFC 3986 §2.3), other percent-encodings kept with upper-case
//!   hex (§6.2.2.1), runs of `/` merged, dot-segments removed (§5.2.4), never above the root;
//! - forms that servers disagree on are refused, never judged one way and forwarded another:
//!   an encoded slash or backslash (`%2F`, `%5C`; some servers decode them into separators), a raw
//!   backslash (one on Windows-style servers), a malformed percent-encoding, and a dot-segment
//!   carrying path parameters (`/..;/`, which Java servlet containers resolve as `..`);
//! - the query string is kept exactly as sent (rules see path + query, as in Cilium);
//! - one authority per request: the HTTP/1 Host field (exactly one, valid, no userinfo), which an
//!   absolute-form target must agree with; HTTP/2's `:authority`, which a `host` field must agree
//!   with. Names compare case-insensitively; the name a `host` rule sees is lower-case, without a
//!   trailing dot, and without its port when the port is the connection's original destination
//!   port (as Envoy's `strip_matching_host_port`); any other port stays (`name:port`).
//!
//! Everything here is pure (no I/O), so it is unit-tested and fuzzed on its own.

use std::borrow::Cow;

use http::{header, HeaderMap, HeaderValue, Method, Uri, Version};

/// Why a request was refused before any rule saw it. HTTP/1 answers 400; HTTP/2 resets the
/// stream (PROTOCOL_ERROR), as RFC 9113 §8.1.1 asks of a malformed request.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Malformed {
    #[error("path: {0}")]
    Path(#[from] PathError),
    #[error("authority: {0}")]
    Authority(#[from] AuthorityError),
    #[error("request without Host")]
    MissingHost,
    #[error("more than one Host field")]
    DuplicateHost,
    #[error("absolute-form target `{target}` disagrees with Host `{host}`")]
    TargetHostMismatch { target: String, host: String },
    #[error(":authority `{authority}` disagrees with host `{host}`")]
    AuthorityHostMismatch { authority: String, host: String },
    #[error("scheme `{0}` (only http and https)")]
    Scheme(String),
    #[error("request-target form not allowed here (origin-form, absolute-form, or `*` for OPTIONS)")]
    TargetForm,
    #[error("field `{0}` has leading or trailing whitespace")]
    FieldWhitespace(String),
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("encoded slash or backslash (%2F, %5C)")]
    EncodedSeparator,
    #[error("backslash")]
    Backslash,
    #[error("malformed percent-encoding")]
    BadPercent,
    #[error("dot-segment with path parameters (`..;`)")]
    DotSegmentParams,
    #[error("does not start with `/`")]
    NotAbsolute,
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AuthorityError {
    #[error("empty")]
    Empty,
    #[error("userinfo is not allowed")]
    Userinfo,
    #[error("invalid host name `{0}`")]
    InvalidHost(String),
    #[error("invalid port in `{0}`")]
    InvalidPort(String),
}

/// One authority, validated: the host (as sent, IPv6 literals with their brackets) and port.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Authority<'a> {
    pub host: &'a str,
    pub port: Option<u16>,
}

impl<'a> Authority<'a> {
    /// The same authority: names case-insensitively (one trailing dot ignored), ports spelled
    /// alike (present in both and equal, or absent from both; `a` and `a:80` differ, since a
    /// `host` rule sees them differently and the Host field is what goes upstream).
    fn same_as(&self, other: &Authority<'_>) -> bool {
        same_name(self.host, other.host) && self.port == other.port
    }

    /// The value `host` rules are matched against (see the module doc).
    pub fn rule_value(&self, destination_port: u16) -> Cow<'a, str> {
        l7rules::host_rule_value(self.host, self.port, destination_port)
    }
}

/// Parses `host[:port]` strictly: a DNS-style name (letters, digits, `-`, `.`, `_`, `~`), an
/// IPv4 address, or a bracketed IPv6 literal; a port of 1 to 5 digits up to 65535. No userinfo,
/// no percent-encoding, no empty port.
pub fn parse_authority(s: &str) -> Result<Authority<'_>, AuthorityError> {
    if s.is_empty() {
        return Err(AuthorityError::Empty);
    }
    if s.contains('@') {
        return Err(AuthorityError::Userinfo);
    }
    let (host, port) = if let Some(rest) = s.strip_prefix('[') {
        let end = rest.find(']').ok_or_else(|| AuthorityError::InvalidHost(s.to_string()))?;
        let literal = &rest[..end];
        if literal.is_empty() || !literal.bytes().all(|b| b.is_ascii_hexdigit() || b == b':' || b == b'.') {
            return Err(AuthorityError::InvalidHost(s.to_string()));
        }
        if literal.parse::<std::net::Ipv6Addr>().is_err() {
            return Err(AuthorityError::InvalidHost(s.to_string()));
        }
        let after = &rest[end + 1..];
        let port = match after {
            "" => None,
            p => Some(p.strip_prefix(':').ok_or_else(|| AuthorityError::InvalidHost(s.to_string()))?),
        };
        (&s[..end + 2], port)
    } else {
        match s.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (s, None),
        }
    };
    let name_ok = |h: &str| {
        !h.is_empty()
            && h != "."
            && h.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~'))
            && !h.starts_with('.')
            && !h.contains("..")
    };
    if !host.starts_with('[') && !name_ok(host) {
        return Err(AuthorityError::InvalidHost(s.to_string()));
    }
    let port = match port {
        None => None,
        Some(p) => {
            if p.is_empty() || p.len() > 5 || !p.bytes().all(|b| b.is_ascii_digit()) {
                return Err(AuthorityError::InvalidPort(s.to_string()));
            }
            match p.parse::<u16>() {
                Ok(n) if n > 0 => Some(n),
                _ => return Err(AuthorityError::InvalidPort(s.to_string())),
            }
        }
    };
    Ok(Authority { host, port })
}

fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// The normalized form of an absolute path (no query). Borrowed when it is already canonical,
/// which is the common case and costs one scan.
pub fn normalize_path(path: &str) -> Result<Cow<'_, str>, PathError> {
    let bytes = path.as_bytes();
    if bytes.first() != Some(&b'/') {
        return Err(PathError::NotAbsolute);
    }
    if bytes.contains(&b'\\') {
        return Err(PathError::Backslash);
    }
    // Fast path: nothing to decode, no empty, `.` or `..` segment, no `..;` segment.
    let needs_work = bytes.contains(&b'%')
        || path.contains("//")
        || path.split('/').any(|seg| is_dot_segment(seg) || dot_with_params(seg));
    if !needs_work {
        return Ok(Cow::Borrowed(path));
    }
    // 1. Percent-decoding of unreserved characters; other encodings kept, upper-cased.
    let mut decoded = String::with_capacity(path.len());
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b == b'%' {
            let (Some(h), Some(l)) = (bytes.get(i + 1).copied().and_then(hex), bytes.get(i + 2).copied().and_then(hex))
            else {
                return Err(PathError::BadPercent);
            };
            let v = h * 16 + l;
            if v == b'/' || v == b'\\' {
                return Err(PathError::EncodedSeparator);
            }
            if is_unreserved(v) {
                decoded.push(v as char);
            } else {
                decoded.push('%');
                decoded.push(char::from(b"0123456789ABCDEF"[usize::from(h)]));
                decoded.push(char::from(b"0123456789ABCDEF"[usize::from(l)]));
            }
            i += 3;
        } else {
            // The path is a &str and we only split at ASCII, so pushing bytes one by one as
            // chars would break multi-byte characters: copy the run up to the next '%'.
            let next = bytes[i..].iter().position(|c| *c == b'%').map(|p| i + p).unwrap_or(bytes.len());
            decoded.push_str(&path[i..next]);
            i = next;
        }
    }
    // 2. Merged slashes and dot-segment removal, over the decoded segments.
    let segments: Vec<&str> = decoded.split('/').skip(1).collect();
    let mut out: Vec<&str> = Vec::with_capacity(segments.len());
    let mut trailing_slash = false;
    for (n, seg) in segments.iter().enumerate() {
        let last = n + 1 == segments.len();
        if dot_with_params(seg) {
            return Err(PathError::DotSegmentParams);
        }
        match *seg {
            "" => trailing_slash = last,
            "." => trailing_slash = last,
            ".." => {
                out.pop();
                trailing_slash = last;
            }
            s => {
                out.push(s);
                trailing_slash = false;
            }
        }
    }
    let mut result = String::with_capacity(decoded.len());
    for seg in &out {
        result.push('/');
        result.push_str(seg);
    }
    if trailing_slash || out.is_empty() {
        result.push('/');
    }
    Ok(if result == path { Cow::Borrowed(path) } else { Cow::Owned(result) })
}

fn is_dot_segment(seg: &str) -> bool {
    seg == "." || seg == ".."
}

/// `..;x` or `.;x`: a dot-segment with path parameters (RFC 3986 §3.3 allows `;` in a
/// segment; servlet containers strip the parameters and then resolve the dots).
fn dot_with_params(seg: &str) -> bool {
    seg.split_once(';').is_some_and(|(head, _)| is_dot_segment(head))
}

/// A request's Host fields: the first (a cheap clone, so the request itself can move on)
/// and whether there are more.
#[derive(Debug, Default)]
pub struct HostFields {
    pub first: Option<HeaderValue>,
    pub more: bool,
}

impl HostFields {
    pub fn of(headers: &HeaderMap) -> Self {
        let mut all = headers.get_all(header::HOST).iter();
        HostFields { first: all.next().cloned(), more: all.next().is_some() }
    }
}

/// A request reduced to what its rules see and what goes upstream.
#[derive(Debug, PartialEq, Eq)]
pub struct Canonical<'a> {
    /// The normalized path with the query as sent: what `path` rules match.
    pub path_and_query: Cow<'a, str>,
    /// The value `host` rules match (see [`Authority::rule_value`]); empty when the request
    /// has no authority (HTTP/1.0 without Host).
    pub host: Cow<'a, str>,
    /// The authority's host name as sent, without port ("" without authority).
    pub name: &'a str,
    /// The target the upstream must get, when it differs from what the client sent (a
    /// normalized path, or an absolute-form target turned into origin-form).
    pub rewrite: Option<Uri>,
}

/// Checks and canonicalizes one request's target and authority (see the module doc).
/// `destination_port` is the connection's original destination port.
pub fn canonicalize<'a>(
    version: Version,
    method: &Method,
    uri: &'a Uri,
    hosts: &'a HostFields,
    destination_port: u16,
) -> Result<Canonical<'a>, Malformed> {
    let h2 = version == Version::HTTP_2;
    if hosts.more {
        return Err(Malformed::DuplicateHost);
    }
    let host_field = match &hosts.first {
        Some(v) => {
            Some(v.to_str().map_err(|_| AuthorityError::InvalidHost(String::from_utf8_lossy(v.as_bytes()).into()))?)
        }
        None => None,
    };
    if let Some(other) = uri.scheme_str().filter(|s| *s != "http" && *s != "https") {
        return Err(Malformed::Scheme(other.to_string()));
    }
    if !h2 && uri.authority().is_some() && uri.scheme().is_none() {
        return Err(Malformed::TargetForm);
    }
    let target_authority = match uri.authority() {
        Some(a) => Some(parse_authority(a.as_str())?),
        None => None,
    };
    // The one authority of the request.
    let authority = match (target_authority, host_field) {
        (Some(t), Some(h)) => {
            let hv = parse_authority(h)?;
            if !t.same_as(&hv) {
                return Err(if h2 {
                    Malformed::AuthorityHostMismatch { authority: t.host.to_string(), host: h.to_string() }
                } else {
                    Malformed::TargetHostMismatch { target: uri.to_string(), host: h.to_string() }
                });
            }
            Some(t)
        }
        (Some(t), None) if h2 => Some(t),
        // HTTP/1.1 requires Host even with an absolute-form target (RFC 9112 §3.2); so does
        // HTTP/1.0 here, since the target goes upstream in origin-form and the upstream would
        // otherwise pick its default virtual host, not the name the rules judged.
        (Some(_), None) => return Err(Malformed::MissingHost),
        (None, Some(h)) => Some(parse_authority(h)?),
        (None, None) if version == Version::HTTP_10 => None,
        (None, None) => return Err(Malformed::MissingHost),
    };
    // The target's form: absolute-form has a scheme (and so an authority); authority-form
    // (CONNECT's) has an authority alone; `*` only for OPTIONS; otherwise a path from `/`.
    let absolute_form = uri.scheme().is_some();
    let pq = uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
    let (path, query) = match pq.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (pq, None),
    };
    let host = authority.as_ref().map(|a| a.rule_value(destination_port)).unwrap_or(Cow::Borrowed(""));
    let name = authority.as_ref().map(|a| a.host).unwrap_or("");
    if path == "*" {
        if method != Method::OPTIONS || query.is_some() {
            return Err(Malformed::TargetForm);
        }
        return Ok(Canonical { path_and_query: Cow::Borrowed("*"), host, name, rewrite: None });
    }
    // A path-less absolute-form target (`http://a?x`) goes upstream as `/?x` (RFC 9112 §3.2.1);
    // HTTP/2's `:path` must start with `/` (RFC 9113 §8.3.1).
    let empty_path = path.is_empty() && absolute_form && !h2;
    let normalized = if empty_path {
        Cow::Owned("/".to_string())
    } else {
        normalize_path(path).map_err(|e| match e {
            PathError::NotAbsolute => Malformed::TargetForm,
            e => Malformed::Path(e),
        })?
    };
    let changed = matches!(normalized, Cow::Owned(_));
    let path_and_query = match (normalized, query) {
        (Cow::Borrowed(_), _) => Cow::Borrowed(pq),
        (Cow::Owned(mut p), Some(q)) => {
            p.push('?');
            p.push_str(q);
            Cow::Owned(p)
        }
        (Cow::Owned(p), None) => Cow::Owned(p),
    };
    // HTTP/2 with a `host` field and no `:authority`: the upstream request gets the
    // authority from `host` (hyper's client needs one to send `:authority`).
    let h2_authority_from_host = h2 && uri.authority().is_none() && host_field.is_some();
    let rewrite = if changed || (absolute_form && !h2) || h2_authority_from_host {
        let mut parts = http::uri::Parts::default();
        if h2 {
            parts.scheme = Some(uri.scheme().cloned().unwrap_or(http::uri::Scheme::HTTP));
            parts.authority = match uri.authority() {
                Some(a) => Some(a.clone()),
                None => host_field.and_then(|h| h.parse().ok()),
            };
        }
        parts.path_and_query = Some(path_and_query.parse().map_err(|_| Malformed::Path(PathError::BadPercent))?);
        Some(Uri::from_parts(parts).map_err(|_| Malformed::Path(PathError::BadPercent))?)
    } else {
        None
    };
    Ok(Canonical { path_and_query, host, name, rewrite })
}

/// On a connection whose TLS the proxy terminated, the request must be for the name the client
/// asked for in its ClientHello (the one `serverNames` judged): another name would let a client
/// reach a virtual host the policy never saw (domain fronting). Case-insensitive, one trailing
/// dot ignored on either side.
pub fn same_name(authority_name: &str, server_name: &str) -> bool {
    fn strip(n: &str) -> &str {
        n.strip_suffix('.').unwrap_or(n)
    }
    strip(authority_name).eq_ignore_ascii_case(strip(server_name))
}

/// RFC 9113 §8.2.1: a field value with leading or trailing whitespace makes an HTTP/2 message
/// malformed (HTTP/1 parsers trim it as optional whitespace instead).
pub fn check_h2_fields(headers: &HeaderMap) -> Result<(), Malformed> {
    for (name, value) in headers {
        let v = value.as_bytes();
        if matches!(v.first(), Some(b' ' | b'\t')) || matches!(v.last(), Some(b' ' | b'\t')) {
            return Err(Malformed::FieldWhitespace(name.as_str().to_string()));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;
