//! The proxy's bounds, one struct per stack (each field is a flag; README, "Bounds").

use std::time::Duration;

/// Every bound of the HTTP stack, explicit (each is a flag; README and ARCHITECTURE.md, "The proxy", list them).
#[derive(Clone, Copy, Debug)]
pub struct HttpLimits {
    /// Largest request head (HTTP/1 read buffer; HTTP/2 header list). Larger: 431.
    pub max_header_bytes: usize,
    /// Most header fields in an HTTP/1 request. More: 431.
    pub max_headers: usize,
    /// Time to receive a complete request head, and idle time between keep-alive requests.
    pub header_timeout: Duration,
    /// Time for the upstream to answer with a response head. Longer: 504.
    pub request_timeout: Duration,
    /// Concurrent HTTP/2 streams per downstream connection.
    pub max_concurrent_streams: u32,
    /// The Kafka stack's bounds.
    pub kafka: KafkaLimits,
}

/// The Kafka stack's bounds, per connection (flags; README, "Bounds").
#[derive(Clone, Copy, Debug)]
pub struct KafkaLimits {
    /// Largest request frame from the client; larger closes the connection.
    pub max_request_frame: usize,
    /// Largest response frame from the broker, or made here; larger closes the connection.
    pub max_response_frame: usize,
    /// Requests awaiting their answer; at the bound no further request is read until one is
    /// answered (as a broker, which serves one request per connection at a time).
    pub max_in_flight: usize,
    /// Bytes held for answers not yet sent (local answers, the requests kept to merge denied
    /// topics into the broker's answer); at the bound no further request is read until they drain.
    pub max_pending_bytes: usize,
    /// Items (array elements, unknown tagged fields) one request or merged response decodes
    /// into, charged as each count is read; more closes the connection.
    pub max_items: usize,
    /// Time for a request frame to arrive whole once its first byte has.
    pub frame_timeout: Duration,
    /// Bytes of large request frames being read, across all connections ([`FrameBudget`]).
    pub max_frame_bytes: usize,
    /// Time the broker may stay silent while an answer is owed.
    pub response_timeout: Duration,
}

impl Default for KafkaLimits {
    /// The flags' defaults.
    fn default() -> Self {
        KafkaLimits {
            max_request_frame: 16 << 20,
            max_response_frame: 64 << 20,
            max_in_flight: 1000,
            max_pending_bytes: 32 << 20,
            max_items: 100_000,
            frame_timeout: Duration::from_secs(30),
            max_frame_bytes: 256 << 20,
            response_timeout: Duration::from_secs(120),
        }
    }
}
