//! One place that says how each refusal is answered in HTTP (status and body) and gRPC (status,
//! trailers-only) (ARCHITECTURE.md, "The proxy"). Kafka is not here: a denial's error code names
//! what it denies, which depends on the request (topic, group, transactional id or cluster:
//! `kafka_topics::whole_denial_code`, and per topic inside partly denied requests), and the
//! Kafka stack answers its other failures by closing the connection, which clients retry.

use std::borrow::Cow;

/// The body of Cilium's (Envoy's) HTTP denial.
pub const ACCESS_DENIED: &str = "Access denied\r\n";

/// Why the proxy answers a request itself instead of the upstream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Refused {
    /// Denied by the named policy.
    Denied { policy: String },
    /// The request's parties are gone from the tables in force (its workload is closing).
    PartiesGone,
    /// A request that cannot be framed or judged as written.
    Malformed,
    /// A method the proxy does not carry (CONNECT).
    MethodNotAllowed,
    /// The upstream sent no response head in time.
    UpstreamTimeout,
    /// Connecting upstream timed out (the pool's message).
    ConnectTimeout(String),
    /// This workload's upstream connections are at their limit (the pool's message).
    WorkloadLimit(String),
    /// The upstream could not be reached.
    Unavailable,
}

/// An HTTP answer: a status and a plain-text body; `close`: nothing more is read on the
/// connection (HTTP/1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HttpAnswer {
    pub status: u16,
    pub body: &'static str,
    pub close: bool,
}

/// gRPC status codes used here (grpc/status.h).
pub mod grpc_code {
    pub const DEADLINE_EXCEEDED: u8 = 4;
    pub const PERMISSION_DENIED: u8 = 7;
    pub const INTERNAL: u8 = 13;
    pub const UNAVAILABLE: u8 = 14;
}

impl Refused {
    /// The HTTP answer.
    pub fn http(&self) -> HttpAnswer {
        use Refused::*;
        let (status, body, close) = match self {
            Denied { .. } => (403, ACCESS_DENIED, false),
            PartiesGone => (403, ACCESS_DENIED, true),
            Malformed => (400, "Bad Request\r\n", true),
            MethodNotAllowed => (405, "CONNECT is not supported\r\n", true),
            UpstreamTimeout => (504, "upstream request timeout\r\n", false),
            ConnectTimeout(_) => (504, "upstream connect timeout\r\n", false),
            WorkloadLimit(_) => (503, "upstream connection limit\r\n", false),
            Unavailable => (502, "upstream connect error\r\n", false),
        };
        HttpAnswer { status, body, close }
    }

    /// The gRPC status and message (a trailers-only response).
    pub fn grpc(&self) -> (u8, Cow<'static, str>) {
        use Refused::*;
        match self {
            Denied { policy } => (grpc_code::PERMISSION_DENIED, format!("request denied by policy {policy}").into()),
            PartiesGone => (grpc_code::PERMISSION_DENIED, "request denied".into()),
            Malformed => (grpc_code::INTERNAL, "malformed request".into()),
            MethodNotAllowed => (grpc_code::INTERNAL, "method not supported".into()),
            UpstreamTimeout => (grpc_code::DEADLINE_EXCEEDED, "upstream timed out".into()),
            ConnectTimeout(m) | WorkloadLimit(m) => (grpc_code::UNAVAILABLE, m.clone().into()),
            Unavailable => (grpc_code::UNAVAILABLE, "upstream unavailable".into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn http(r: Refused) -> (u16, bool) {
        let a = r.http();
        (a.status, a.close)
    }

    fn grpc(r: Refused) -> (u8, String) {
        let (code, message) = r.grpc();
        (code, message.into_owned())
    }

    #[test]
    fn http_statuses() {
        assert_eq!(http(Refused::Denied { policy: "p".into() }), (403, false));
        assert_eq!(http(Refused::PartiesGone), (403, true));
        assert_eq!(http(Refused::Malformed), (400, true));
        assert_eq!(http(Refused::MethodNotAllowed), (405, true));
        assert_eq!(http(Refused::UpstreamTimeout), (504, false));
        assert_eq!(http(Refused::ConnectTimeout("t".into())), (504, false));
        assert_eq!(http(Refused::WorkloadLimit("l".into())), (503, false));
        assert_eq!(http(Refused::Unavailable), (502, false));
    }

    #[test]
    fn the_denial_body_is_envoys() {
        assert_eq!(Refused::Denied { policy: "p".into() }.http().body, "Access denied\r\n");
    }

    #[test]
    fn grpc_statuses() {
        assert_eq!(
            grpc(Refused::Denied { policy: "default/p".into() }),
            (7, "request denied by policy default/p".into())
        );
        assert_eq!(grpc(Refused::UpstreamTimeout), (4, "upstream timed out".into()));
        assert_eq!(grpc(Refused::ConnectTimeout("connect timed out".into())), (14, "connect timed out".into()));
        assert_eq!(grpc(Refused::WorkloadLimit("at limit".into())), (14, "at limit".into()));
        assert_eq!(grpc(Refused::Unavailable), (14, "upstream unavailable".into()));
    }
}
