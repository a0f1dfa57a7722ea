//! The proxy in-process on loopback, without root or a kernel: the datapath is in memory and
//! says where each client's connection was going (what the redirector's connect hook records),
//! so every stack runs as on a node: HTTP/1.1, HTTP/2, gRPC, Kafka and opaque, each allowed
//! and denied, and TLS (serverNames, terminatingTLS, originatingTLS) with certificates and
//! trust from an in-memory broker (`l7proxy::tls::MemoryBroker`) filled from a test CA. The
//! real-kernel tests, and the real tls-broker, stay in integration/.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use http_body_util::{BodyExt, Empty, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use kafka_protocol::messages::produce_request::{PartitionProduceData, TopicProduceData};
use kafka_protocol::messages::{ApiKey, ProduceRequest, ProduceResponse, RequestHeader, ResponseHeader, TopicName};
use kafka_protocol::protocol::{Decodable, Encodable, StrBytes};
use l7mesh_api::Verdict;
use l7proxy::client_addr::{ClientAddressConfig, ForwardedMode};
use l7proxy::context::{Direction, LiveConnections, Shared};
use l7proxy::datapath::MemoryDatapath;
use l7proxy::flows::{FlowFilter, FlowLog};
use l7proxy::limits::{HttpLimits, KafkaLimits};
use l7proxy::metrics::Metrics;
use l7proxy::registry::Registry;
use l7proxy::tables::Tables;
use l7proxy::tls::MemoryBroker;
use redirector::{OriginalDestination, ProtocolHint, ProxyAddrs};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::watch;

const CLIENT: u64 = 10;
/// A second workload of the node (endpoint 2), for what one workload must not take from another.
const OTHER: u64 = 11;
const DEADLINE: Duration = Duration::from_secs(10);

/// A proxy on loopback with its egress listener, and the in-memory datapath behind it.
struct Proxy {
    egress: SocketAddr,
    datapath: Arc<MemoryDatapath>,
    shared: Arc<Shared>,
    shutdown: watch::Sender<bool>,
}

impl Proxy {
    /// Starts one with `rules` (fields every rule needs default: the client's egress, peers any).
    async fn start(rules: &[serde_json::Value]) -> Proxy {
        Proxy::start_with(rules, 1024, Arc::new(MemoryBroker::default())).await
    }

    /// As [`Proxy::start`], each workload holding at most `max_connections` connections.
    async fn start_bounded(rules: &[serde_json::Value], max_connections: usize) -> Proxy {
        Proxy::start_with(rules, max_connections, Arc::new(MemoryBroker::default())).await
    }

    /// Starts one whose certificates and trust come from `broker`.
    async fn start_with_broker(rules: &[serde_json::Value], broker: Arc<MemoryBroker>) -> Proxy {
        Proxy::start_with(rules, 1024, broker).await
    }

    async fn start_with(rules: &[serde_json::Value], max_connections: usize, broker: Arc<MemoryBroker>) -> Proxy {
        Proxy::start_configured(rules, max_connections, broker, Default::default()).await
    }

    /// As [`Proxy::start`], telling upstreams the client's address as `client_address` says.
    async fn start_client_address(rules: &[serde_json::Value], client_address: ClientAddressConfig) -> Proxy {
        Proxy::start_configured(rules, 1024, Arc::new(MemoryBroker::default()), client_address).await
    }

    async fn start_configured(
        rules: &[serde_json::Value],
        max_connections: usize,
        broker: Arc<MemoryBroker>,
        client_address: ClientAddressConfig,
    ) -> Proxy {
        let rules: Vec<_> = rules
            .iter()
            .map(|r| {
                let mut full = json!({"endpoint_id": 1, "direction": "egress", "ports": [1, 65535],
                                      "peers": "any", "policy": "default/p", "l7": {"type": "allowall"}});
                for (k, v) in r.as_object().unwrap() {
                    full[k] = v.clone();
                }
                full
            })
            .collect();
        let tables = Tables::build(
            &serde_json::from_value(json!({
                "version": 1,
                "workloads": [{"cgroup_id": CLIENT, "endpoint_id": 1, "identity": 256,
                               "name": "client", "namespace": "default"},
                              {"cgroup_id": OTHER, "endpoint_id": 2, "identity": 257,
                               "name": "other", "namespace": "default"}],
                "policy_ids": {"1": "default/p"},
                "proxy_rules": rules,
            }))
            .unwrap(),
        );
        let datapath = Arc::new(MemoryDatapath::default());
        let metrics = Arc::new(Metrics::new(None));
        let registry = Arc::new(Registry::new(datapath.clone(), true));
        registry.set_tables(Arc::new(tables));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let egress = listener.local_addr().unwrap();
        let proxy = ProxyAddrs {
            egress_port: egress.port(),
            ingress_port: egress.port(),
            upstream_src4: std::net::Ipv4Addr::LOCALHOST,
            // No mark: setting one needs CAP_NET_ADMIN, and no connect hook runs here.
            mark: 0,
            ..ProxyAddrs::default()
        };
        let shared = Arc::new(Shared {
            live: Arc::new(LiveConnections::default()),
            datapath: datapath.clone(),
            registry,
            netns_cookie: 0,
            proxy,
            flows: Arc::new(FlowLog::new(1000)),
            metrics: metrics.clone(),
            limits: HttpLimits {
                max_header_bytes: 16 << 10,
                max_headers: 100,
                header_timeout: DEADLINE,
                request_timeout: DEADLINE,
                max_concurrent_streams: 100,
                kafka: KafkaLimits::default(),
            },
            pool: l7proxy::pool::UpstreamPool::new(
                l7proxy::pool::PoolConfig {
                    connect_timeout: Duration::from_secs(2),
                    idle_timeout: Duration::from_secs(30),
                    max_destinations: 100,
                    max_connections_per_workload: 100,
                },
                metrics.clone(),
            ),
            certs: l7proxy::tls::CertSource::with_broker(
                broker,
                Duration::from_secs(60),
                16,
                Duration::from_millis(100),
                metrics,
            ),
            connections: l7proxy::limits::ConnectionCounts::new(max_connections),
            client_address,
            tunnel: Default::default(),
        });
        let (shutdown, rx) = watch::channel(false);
        tokio::spawn(l7proxy::proxy::serve(listener, Direction::Egress, shared.clone(), rx, Duration::from_secs(1)));
        Proxy { egress, datapath, shared, shutdown }
    }

    /// A client connection to `to`, redirected to the proxy as the kernel would (the client's
    /// port is known before it connects, so the redirect entry is there first).
    async fn connect(&self, to: SocketAddr, hint: ProtocolHint) -> TcpStream {
        self.connect_workload(CLIENT, to, hint).await
    }

    /// An egress connection of the workload in cgroup `cgroup_id` to `to`.
    async fn connect_workload(&self, cgroup_id: u64, to: SocketAddr, hint: ProtocolHint) -> TcpStream {
        self.connect_as(OriginalDestination {
            addr: to,
            cgroup_id,
            egress_policy_id: 1,
            ingress_policy_id: 0,
            hint,
            audit: false,
            local_destination: false,
        })
        .await
    }

    /// A client connection redirected with the kernel's entry `redirect`.
    async fn connect_as(&self, redirect: OriginalDestination) -> TcpStream {
        let socket = TcpSocket::new_v4().unwrap();
        socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        self.datapath.redirect(socket.local_addr().unwrap(), redirect);
        socket.connect(self.egress).await.unwrap()
    }

    /// The verdicts of the flows recorded so far, oldest first, as (verdict, has L7).
    fn verdicts(&self) -> Vec<(Verdict, bool)> {
        self.shared.flows.snapshot(&FlowFilter::default()).iter().map(|f| (f.verdict, f.l7.is_some())).collect()
    }
}

/// A loopback listener whose every connection `serve` handles in a task of its own.
async fn serve_each<F, Fut>(serve: F) -> SocketAddr
where
    F: Fn(TcpStream) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(serve(stream));
        }
    });
    addr
}

/// Echoes what `stream` reads.
async fn echo<S: tokio::io::AsyncRead + tokio::io::AsyncWrite>(stream: S) {
    let (mut r, mut w) = tokio::io::split(stream);
    let _ = tokio::io::copy(&mut r, &mut w).await;
}

/// An HTTP/1.1 and HTTP/2 upstream that answers every request `200 upstream <path>`.
async fn http_upstream() -> SocketAddr {
    serve_each(|stream| async move {
        let service = hyper::service::service_fn(|req: hyper::Request<hyper::body::Incoming>| async move {
            let grpc = req.headers().get("content-type").is_some_and(|v| v.as_bytes() == b"application/grpc");
            let mut resp = hyper::Response::new(Full::new(Bytes::from(format!("upstream {}", req.uri().path()))));
            if grpc {
                resp.headers_mut().insert("grpc-status", "0".parse().unwrap());
            }
            Ok::<_, std::convert::Infallible>(resp)
        });
        let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
            .serve_connection(TokioIo::new(stream), service)
            .await;
    })
    .await
}

/// An upstream that echoes what it reads.
async fn echo_upstream() -> SocketAddr {
    serve_each(echo).await
}

/// One HTTP/1.1 request; the response's status and body.
async fn http1(stream: TcpStream, method: &str, path: &str) -> (u16, String) {
    http1_to(stream, "server", method, path).await
}

/// One HTTP/1.1 request for `host` on any stream (TLS too).
async fn http1_to<S>(stream: S, host: &str, method: &str, path: &str) -> (u16, String)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.unwrap();
    tokio::spawn(conn);
    let req =
        hyper::Request::builder().method(method).uri(path).header("host", host).body(Empty::<Bytes>::new()).unwrap();
    let resp = tokio::time::timeout(DEADLINE, send.send_request(req)).await.unwrap().unwrap();
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

/// HTTP/2 requests (prior knowledge) on one connection: each one's status, grpc-status and body.
async fn http2(stream: TcpStream, requests: &[(&str, bool)]) -> Vec<(u16, Option<String>, String)> {
    let (mut send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream)).await.unwrap();
    tokio::spawn(conn);
    let mut out = Vec::new();
    for (path, grpc) in requests {
        let mut req = hyper::Request::builder().method("POST").uri(format!("http://server{path}"));
        if *grpc {
            req = req.header("content-type", "application/grpc").header("te", "trailers");
        }
        let req = req.body(Empty::<Bytes>::new()).unwrap();
        let resp = tokio::time::timeout(DEADLINE, send.send_request(req)).await.unwrap().unwrap();
        let status = resp.status().as_u16();
        let grpc_status = resp.headers().get("grpc-status").map(|v| v.to_str().unwrap().to_string());
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        out.push((status, grpc_status, String::from_utf8_lossy(&body).into_owned()));
    }
    out
}

fn http_rules() -> serde_json::Value {
    json!({"l7": {"type": "http", "rules": [{"method": "GET", "path": "/ok"}]}})
}

#[tokio::test]
async fn http1_allowed_and_denied() {
    let upstream = http_upstream().await;
    let proxy = Proxy::start(&[http_rules()]).await;
    let (status, body) = http1(proxy.connect(upstream, ProtocolHint::None).await, "GET", "/ok").await;
    assert_eq!((status, body.as_str()), (200, "upstream /ok"));
    let (status, body) = http1(proxy.connect(upstream, ProtocolHint::None).await, "POST", "/ok").await;
    assert_eq!((status, body.as_str()), (403, "Access denied\r\n"));
    let verdicts = proxy.verdicts();
    assert!(
        verdicts.contains(&(Verdict::Allowed, true)) && verdicts.contains(&(Verdict::Denied, true)),
        "{verdicts:?}"
    );
}

#[tokio::test]
async fn http2_allowed_and_denied() {
    let upstream = http_upstream().await;
    let proxy = Proxy::start(&[json!({"l7": {"type": "http", "rules": [{"method": "POST", "path": "/ok"}]}})]).await;
    let got = http2(proxy.connect(upstream, ProtocolHint::None).await, &[("/ok", false), ("/no", false)]).await;
    assert_eq!(got[0], (200, None, "upstream /ok".into()));
    assert_eq!(got[1].0, 403);
}

#[tokio::test]
async fn grpc_allowed_and_denied() {
    let upstream = http_upstream().await;
    let proxy = Proxy::start(&[json!({"l7": {"type": "grpc", "rules": [{"service": "helloworld.Greeter"}]}})]).await;
    let got = http2(
        proxy.connect(upstream, ProtocolHint::None).await,
        &[("/helloworld.Greeter/SayHello", true), ("/other.Service/Call", true)],
    )
    .await;
    assert_eq!(got[0], (200, Some("0".into()), "upstream /helloworld.Greeter/SayHello".into()));
    assert_eq!((got[1].0, got[1].1.as_deref()), (200, Some("7")), "PERMISSION_DENIED");
}

#[tokio::test]
async fn opaque_allowed_at_l4() {
    let upstream = echo_upstream().await;
    let proxy = Proxy::start(&[json!({})]).await;
    let mut client = proxy.connect(upstream, ProtocolHint::None).await;
    client.write_all(b"\x00\x01 not a protocol").await.unwrap();
    let mut back = [0u8; 17];
    tokio::time::timeout(DEADLINE, client.read_exact(&mut back)).await.unwrap().unwrap();
    assert_eq!(&back, b"\x00\x01 not a protocol");
    assert_eq!(proxy.verdicts(), [(Verdict::Allowed, false)]);
}

#[tokio::test]
async fn opaque_bytes_on_an_http_port_are_closed() {
    let upstream = echo_upstream().await;
    let proxy = Proxy::start(&[http_rules()]).await;
    let mut client = proxy.connect(upstream, ProtocolHint::None).await;
    client.write_all(b"\x00\x01 not http at all").await.unwrap();
    let mut back = Vec::new();
    let n = tokio::time::timeout(DEADLINE, client.read_to_end(&mut back)).await.unwrap().unwrap_or(0);
    assert_eq!(n, 0, "closed, nothing echoed");
    assert_eq!(proxy.verdicts(), [(Verdict::Denied, false)]);
}

#[tokio::test]
async fn no_rule_for_the_workload_is_refused() {
    let upstream = echo_upstream().await;
    let proxy = Proxy::start(&[http_rules()]).await;
    // A client the tables do not know: its connection is closed unjudged.
    let client = proxy
        .connect_as(OriginalDestination {
            addr: upstream,
            cgroup_id: 999,
            egress_policy_id: 1,
            ingress_policy_id: 0,
            hint: ProtocolHint::None,
            audit: false,
            local_destination: false,
        })
        .await;
    assert_closed_unanswered(client).await;
    assert_eq!(proxy.verdicts(), [(Verdict::Denied, false)]);
    let reason = proxy.shared.flows.snapshot(&FlowFilter::default())[0]
        .reason
        .as_ref()
        .map(|r| r.to_string())
        .unwrap_or_default();
    assert!(reason.starts_with("the source workload is not in the policy version"), "{reason}");
}

/// The proxy closes `client` without a byte of answer.
async fn assert_closed_unanswered(mut client: TcpStream) {
    let mut back = Vec::new();
    let n = tokio::time::timeout(DEADLINE, client.read_to_end(&mut back)).await.unwrap().unwrap_or(0);
    assert_eq!(n, 0, "{}", String::from_utf8_lossy(&back));
}

/// The kernel says the destination is a workload of this node (it judged that workload's
/// ingress), but the tables have no such listener: a server registered after the version
/// l7proxy holds. Judging by the client's egress rules alone would skip the server's ingress
/// rules, so the connection is refused, even for a request the client's rules allow.
#[tokio::test]
async fn a_local_server_the_tables_lack_is_refused() {
    let upstream = http_upstream().await;
    let proxy = Proxy::start(&[http_rules()]).await;
    let mut client = proxy
        .connect_as(OriginalDestination {
            addr: upstream,
            cgroup_id: CLIENT,
            egress_policy_id: 1,
            ingress_policy_id: 2,
            hint: ProtocolHint::None,
            audit: false,
            local_destination: true,
        })
        .await;
    let _ = client.write_all(b"GET /ok HTTP/1.1\r\nhost: server\r\n\r\n").await;
    assert_closed_unanswered(client).await;
    assert_eq!(proxy.verdicts(), [(Verdict::Denied, false)]);
    let reason = proxy.shared.flows.snapshot(&FlowFilter::default())[0]
        .reason
        .as_ref()
        .map(|r| r.to_string())
        .unwrap_or_default();
    assert!(reason.starts_with("the destination workload is not in the policy version"), "{reason}");
}

/// A Kafka frame: length, then `header` and `body`.
fn kafka_frame(parts: &[&[u8]]) -> Vec<u8> {
    let len: usize = parts.iter().map(|p| p.len()).sum();
    let mut out = (len as i32).to_be_bytes().to_vec();
    for p in parts {
        out.extend_from_slice(p);
    }
    out
}

const PRODUCE_VERSION: i16 = 7;

fn produce(topic: &'static str, correlation_id: i32) -> Vec<u8> {
    let mut head = BytesMut::new();
    RequestHeader::default()
        .with_request_api_key(ApiKey::Produce as i16)
        .with_request_api_version(PRODUCE_VERSION)
        .with_correlation_id(correlation_id)
        .with_client_id(Some(StrBytes::from_static_str("direct")))
        .encode(&mut head, ApiKey::Produce.request_header_version(PRODUCE_VERSION))
        .unwrap();
    let mut body = BytesMut::new();
    ProduceRequest::default()
        .with_acks(1)
        .with_timeout_ms(5000)
        .with_topic_data(vec![TopicProduceData::default()
            .with_name(TopicName(StrBytes::from_static_str(topic)))
            .with_partition_data(vec![PartitionProduceData::default().with_index(0)])])
        .encode(&mut body, PRODUCE_VERSION)
        .unwrap();
    kafka_frame(&[&head, &body])
}

async fn read_frame(stream: &mut TcpStream) -> Bytes {
    let len = tokio::time::timeout(DEADLINE, stream.read_i32()).await.unwrap().unwrap();
    let mut buf = vec![0u8; len as usize];
    stream.read_exact(&mut buf).await.unwrap();
    Bytes::from(buf)
}

/// The topic error codes of a Produce response, with its correlation id.
fn produce_codes(mut frame: Bytes) -> (i32, Vec<(String, i16)>) {
    let header = ResponseHeader::decode(&mut frame, ApiKey::Produce.response_header_version(PRODUCE_VERSION)).unwrap();
    let resp = ProduceResponse::decode(&mut frame, PRODUCE_VERSION).unwrap();
    let codes = resp
        .responses
        .iter()
        .flat_map(|t| t.partition_responses.iter().map(move |p| (t.name.0.to_string(), p.error_code)))
        .collect();
    (header.correlation_id, codes)
}

/// A broker that answers every Produce with error code 0 for the topics it names.
async fn kafka_upstream() -> SocketAddr {
    use kafka_protocol::messages::produce_response::{PartitionProduceResponse, TopicProduceResponse};
    serve_each(|mut stream| async move {
        while let Ok(len) = stream.read_i32().await {
            let mut buf = vec![0u8; len as usize];
            if stream.read_exact(&mut buf).await.is_err() {
                return;
            }
            let mut req = Bytes::from(buf);
            let version = (&req[2..4]).get_i16();
            let header = RequestHeader::decode(&mut req, ApiKey::Produce.request_header_version(version)).unwrap();
            let produce = ProduceRequest::decode(&mut req, version).unwrap();
            let resp = ProduceResponse::default().with_responses(
                produce
                    .topic_data
                    .iter()
                    .map(|t| {
                        TopicProduceResponse::default()
                            .with_name(t.name.clone())
                            .with_partition_responses(vec![PartitionProduceResponse::default().with_index(0)])
                    })
                    .collect(),
            );
            let mut head = BytesMut::new();
            ResponseHeader::default()
                .with_correlation_id(header.correlation_id)
                .encode(&mut head, ApiKey::Produce.response_header_version(version))
                .unwrap();
            let mut body = BytesMut::new();
            resp.encode(&mut body, version).unwrap();
            let mut out = BytesMut::new();
            out.put_slice(&kafka_frame(&[&head, &body]));
            if stream.write_all(&out).await.is_err() {
                return;
            }
        }
    })
    .await
}

#[tokio::test]
async fn kafka_allowed_and_denied() {
    let upstream = kafka_upstream().await;
    let proxy =
        Proxy::start(&[json!({"l7": {"type": "kafka", "rules": [{"role": "produce", "topic": "orders"}]}})]).await;
    let mut client = proxy.connect(upstream, ProtocolHint::Kafka).await;
    client.write_all(&produce("orders", 1)).await.unwrap();
    assert_eq!(produce_codes(read_frame(&mut client).await), (1, vec![("orders".into(), 0)]));
    client.write_all(&produce("secrets", 2)).await.unwrap();
    assert_eq!(
        produce_codes(read_frame(&mut client).await),
        (2, vec![("secrets".into(), 29)]),
        "TOPIC_AUTHORIZATION_FAILED, answered by the proxy"
    );
}

/// The first flight of a TLS client naming `server_name` (a ClientHello), as bytes.
fn client_hello(server_name: &'static str) -> Vec<u8> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
    let name = rustls::pki_types::ServerName::try_from(server_name).unwrap();
    let mut conn = rustls::ClientConnection::new(Arc::new(config), name).unwrap();
    let mut out = Vec::new();
    while conn.wants_write() {
        conn.write_tls(&mut out).unwrap();
    }
    out
}

/// serverNames: the ClientHello's name is judged, then the bytes pass untouched (the echo
/// upstream sends the ClientHello back) or the connection is closed.
#[tokio::test]
async fn tls_server_names_allowed_and_denied() {
    let upstream = echo_upstream().await;
    let proxy =
        Proxy::start(&[json!({"ports": [1, 65535], "l7": {"type": "tls"}, "server_names": ["api.example.com"]})]).await;
    for (name, allowed) in [("api.example.com", true), ("evil.example.com", false)] {
        let hello = client_hello(name);
        let mut client = proxy.connect(upstream, ProtocolHint::None).await;
        client.write_all(&hello).await.unwrap();
        let mut back = vec![0u8; hello.len()];
        let read = tokio::time::timeout(DEADLINE, client.read_exact(&mut back)).await.unwrap();
        assert_eq!(read.is_ok() && back == hello, allowed, "{name}");
    }
    assert_eq!(proxy.verdicts(), [(Verdict::Allowed, false), (Verdict::Denied, false)]);
}

/// An echo upstream that counts the connections it accepted.
async fn counted_echo_upstream() -> (SocketAddr, Arc<std::sync::atomic::AtomicUsize>) {
    let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = accepted.clone();
    let addr = serve_each(move |stream| {
        count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        echo(stream)
    })
    .await;
    (addr, accepted)
}

/// `n` opaque connections through the proxy to `upstream`, each shown to carry bytes.
async fn open_echoing(proxy: &Proxy, upstream: SocketAddr, n: usize) -> Vec<TcpStream> {
    let mut open = Vec::new();
    for _ in 0..n {
        let mut client = proxy.connect(upstream, ProtocolHint::None).await;
        assert_echoes(&mut client).await;
        open.push(client);
    }
    open
}

/// `client` carries bytes both ways through the proxy.
async fn assert_echoes(client: &mut TcpStream) {
    client.write_all(b"ping").await.unwrap();
    let mut back = [0u8; 4];
    tokio::time::timeout(DEADLINE, client.read_exact(&mut back)).await.unwrap().unwrap();
    assert_eq!(&back, b"ping");
}

impl Proxy {
    /// A connection of the workload `OTHER` to `to`.
    async fn connect_other(&self, to: SocketAddr, hint: ProtocolHint) -> TcpStream {
        self.connect_workload(OTHER, to, hint).await
    }

    /// Waits until the workload `cgroup` holds `n` connections through the proxy.
    async fn wait_held(&self, cgroup: u64, n: usize) {
        let owner = l7proxy::limits::ConnectionOwner::Workload(cgroup);
        let deadline = tokio::time::Instant::now() + DEADLINE;
        while self.shared.connections.held(owner) != n {
            assert!(tokio::time::Instant::now() < deadline, "held {} != {n}", self.shared.connections.held(owner));
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// `l7mesh_limits_tripped_total{limit="connections_per_workload"}`, 0 when absent.
    fn connection_bound_trips(&self) -> u64 {
        let prefix = r#"l7mesh_limits_tripped_total{limit="connections_per_workload"} "#;
        let text = self.shared.metrics.encode();
        text.lines().find_map(|l| l.strip_prefix(prefix)).map_or(0, |v| v.parse().unwrap())
    }

    /// The reasons of the DENIED flows so far.
    fn denials(&self) -> Vec<String> {
        let flows = self.shared.flows.snapshot(&FlowFilter::default());
        flows
            .iter()
            .filter(|f| f.verdict == Verdict::Denied)
            .map(|f| f.reason.as_ref().map(|r| r.to_string()).unwrap_or_default())
            .collect()
    }
}

/// `--max-connections-per-workload` on opaque connections: the workload's connection over the
/// bound is closed before the proxy connects upstream for it, another workload is served
/// meanwhile, and a connection that ends gives its place back.
#[tokio::test]
async fn connections_per_workload_are_bounded_opaque() {
    let (upstream, accepted) = counted_echo_upstream().await;
    let proxy = Proxy::start_bounded(&[json!({}), json!({"endpoint_id": 2})], 3).await;
    let mut held = open_echoing(&proxy, upstream, 3).await;
    assert_closed_unanswered(proxy.connect(upstream, ProtocolHint::None).await).await;
    assert_eq!(proxy.connection_bound_trips(), 1);
    let denials = proxy.denials();
    assert_eq!(denials.len(), 1, "{denials:?}");
    assert!(
        denials[0].contains("default/client")
            && denials[0].contains("holds 3 connections")
            && denials[0].contains("--max-connections-per-workload"),
        "{denials:?}"
    );
    // Another workload is untouched by the first one's bound.
    let mut other = proxy.connect_other(upstream, ProtocolHint::None).await;
    assert_echoes(&mut other).await;
    assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 4, "no upstream connect for the refused one");
    // One of the first workload's connections ends: it may open one again, and only one.
    drop(held.pop());
    proxy.wait_held(CLIENT, 2).await;
    let mut again = proxy.connect(upstream, ProtocolHint::None).await;
    assert_echoes(&mut again).await;
    assert_closed_unanswered(proxy.connect(upstream, ProtocolHint::None).await).await;
    assert_eq!(proxy.connection_bound_trips(), 2);
    // All closed, the counts go back to nothing (each connection released once).
    drop((held, again, other));
    proxy.wait_held(CLIENT, 0).await;
    proxy.wait_held(OTHER, 0).await;
    assert_eq!(proxy.shared.connections.owners(), 0);
}

/// The same bound on HTTP connections (the HTTP stack's client connections, not only the
/// upstream ones the pool bounds): held keep-alive connections count until they close.
#[tokio::test]
async fn connections_per_workload_are_bounded_http() {
    let upstream = http_upstream().await;
    let other_rules = json!({"endpoint_id": 2, "l7": {"type": "http", "rules": [{"method": "GET", "path": "/ok"}]}});
    let proxy = Proxy::start_bounded(&[http_rules(), other_rules], 2).await;
    let mut held = Vec::new();
    for _ in 0..2 {
        let stream = proxy.connect(upstream, ProtocolHint::None).await;
        let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.unwrap();
        let conn = tokio::spawn(conn);
        let req = hyper::Request::get("/ok").header("host", "server").body(Empty::<Bytes>::new()).unwrap();
        let resp = tokio::time::timeout(DEADLINE, send.send_request(req)).await.unwrap().unwrap();
        assert_eq!(resp.status(), 200);
        resp.into_body().collect().await.unwrap();
        held.push((send, conn));
    }
    let mut over = proxy.connect(upstream, ProtocolHint::None).await;
    let _ = over.write_all(b"GET /ok HTTP/1.1\r\nhost: server\r\n\r\n").await;
    assert_closed_unanswered(over).await;
    assert_eq!(proxy.connection_bound_trips(), 1);
    assert!(proxy.denials().iter().any(|r| r.contains("default/client") && r.contains("holds 2 connections")));
    let (status, body) = http1(proxy.connect_other(upstream, ProtocolHint::None).await, "GET", "/ok").await;
    assert_eq!((status, body.as_str()), (200, "upstream /ok"), "another workload is served");
    // Closing one keep-alive connection frees its place.
    let (send, conn) = held.pop().unwrap();
    drop(send);
    let _ = conn.await;
    proxy.wait_held(CLIENT, 1).await;
    let (status, _) = http1(proxy.connect(upstream, ProtocolHint::None).await, "GET", "/ok").await;
    assert_eq!(status, 200);
    assert_eq!(proxy.connection_bound_trips(), 1);
}

/// The same bound on the Kafka stack (each connection has its own upstream leg to the broker).
#[tokio::test]
async fn connections_per_workload_are_bounded_kafka() {
    let upstream = kafka_upstream().await;
    let rules = json!({"l7": {"type": "kafka", "rules": [{"role": "produce", "topic": "orders"}]}});
    let other = json!({"endpoint_id": 2, "l7": {"type": "kafka", "rules": [{"role": "produce", "topic": "orders"}]}});
    let proxy = Proxy::start_bounded(&[rules, other], 2).await;
    let mut held = Vec::new();
    for i in 0..2 {
        let mut client = proxy.connect(upstream, ProtocolHint::Kafka).await;
        client.write_all(&produce("orders", i)).await.unwrap();
        assert_eq!(produce_codes(read_frame(&mut client).await), (i, vec![("orders".into(), 0)]));
        held.push(client);
    }
    let mut over = proxy.connect(upstream, ProtocolHint::Kafka).await;
    let _ = over.write_all(&produce("orders", 3)).await;
    assert_closed_unanswered(over).await;
    assert_eq!(proxy.connection_bound_trips(), 1);
    let mut b = proxy.connect_other(upstream, ProtocolHint::Kafka).await;
    b.write_all(&produce("orders", 4)).await.unwrap();
    assert_eq!(produce_codes(read_frame(&mut b).await), (4, vec![("orders".into(), 0)]), "another workload");
    drop(held.pop());
    proxy.wait_held(CLIENT, 1).await;
    let mut again = proxy.connect(upstream, ProtocolHint::Kafka).await;
    again.write_all(&produce("orders", 5)).await.unwrap();
    assert_eq!(produce_codes(read_frame(&mut again).await), (5, vec![("orders".into(), 0)]));
}

/// A CA made for one test, and leaves it signs (what tls-broker would mint or a secret hold).
struct Pki {
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
    ca_pem: String,
}

impl Pki {
    fn new() -> Pki {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.distinguished_name.push(rcgen::DnType::CommonName, "direct test CA");
        params.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign, rcgen::KeyUsagePurpose::DigitalSignature];
        let ca_pem = params.self_signed(&key).unwrap().pem();
        Pki { issuer: rcgen::Issuer::new(params, key), ca_pem }
    }

    /// A server leaf for `name` (a DNS name or an IP): (certificate PEM, key PEM).
    fn leaf(&self, name: &str) -> (String, String) {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(vec![name.to_string()]).unwrap();
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
        (params.signed_by(&key, &self.issuer).unwrap().pem(), key.serialize_pem())
    }

    /// A broker whose mesh CA is this one and that holds a leaf for each of `names`.
    fn broker(&self, names: &[&str]) -> Arc<MemoryBroker> {
        let broker = Arc::new(MemoryBroker::default());
        broker.set_ca(self.ca_pem.clone());
        for name in names {
            let (cert, key) = self.leaf(name);
            broker.set_leaf(*name, cert, key);
        }
        broker
    }

    /// A TLS client trusting this CA alone, offering http/1.1.
    fn client(&self) -> tokio_rustls::TlsConnector {
        let mut roots = rustls::RootCertStore::empty();
        for cert in rustls::pki_types::CertificateDer::pem_slice_iter(self.ca_pem.as_bytes()) {
            roots.add(cert.unwrap()).unwrap();
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        tokio_rustls::TlsConnector::from(Arc::new(config))
    }

    /// A server config presenting this CA's leaf for `name`.
    fn server(&self, name: &str) -> Arc<rustls::ServerConfig> {
        let (cert, key) = self.leaf(name);
        let chain = rustls::pki_types::CertificateDer::pem_slice_iter(cert.as_bytes()).map(Result::unwrap).collect();
        let key = rustls::pki_types::PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .unwrap();
        Arc::new(config)
    }
}

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::ServerName;

/// An HTTP/1.1 upstream over TLS (presenting `config`) that answers `200 tls upstream <path>`.
async fn tls_http_upstream(config: Arc<rustls::ServerConfig>) -> SocketAddr {
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    serve_each(move |stream| {
        let acceptor = acceptor.clone();
        async move {
            let Ok(stream) = acceptor.accept(stream).await else { return };
            let service = hyper::service::service_fn(|req: hyper::Request<hyper::body::Incoming>| async move {
                let body = Full::new(Bytes::from(format!("tls upstream {}", req.uri().path())));
                Ok::<_, std::convert::Infallible>(hyper::Response::new(body))
            });
            let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), service).await;
        }
    })
    .await
}

/// An upstream over TLS (presenting `config`) that echoes what it reads.
async fn tls_echo_upstream(config: Arc<rustls::ServerConfig>) -> SocketAddr {
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    serve_each(move |stream| {
        let acceptor = acceptor.clone();
        async move {
            if let Ok(stream) = acceptor.accept(stream).await {
                echo(stream).await;
            }
        }
    })
    .await
}

/// The reasons of the flows recorded so far, oldest first.
fn reasons(proxy: &Proxy) -> Vec<String> {
    proxy
        .shared
        .flows
        .snapshot(&FlowFilter::default())
        .iter()
        .filter_map(|f| f.reason.as_ref().map(|r| r.to_string()))
        .collect()
}

/// Whether `broker` was asked to mint a certificate for `name`.
fn minted_for(broker: &MemoryBroker, name: &str) -> bool {
    broker.asked().iter().any(|r| matches!(r, Request::IssueServer { names } if names.iter().any(|n| n == name)))
}

use l7mesh_api::broker::Request;

const API: &str = "api.example.com";

/// terminatingTLS with HTTP rules and serverNames: the client's handshake completes with the
/// broker's certificate for its SNI (the client trusts only the test CA), then each request is
/// judged: an allowed one reaches the plain upstream, a denied one gets 403 from the proxy.
#[tokio::test]
async fn terminating_tls_allowed_and_denied() {
    let (pki, upstream) = (Pki::new(), http_upstream().await);
    let broker = pki.broker(&[API]);
    let mut rule = http_rules();
    rule["terminating_tls"] = json!({});
    rule["server_names"] = json!([API]);
    let proxy = Proxy::start_with_broker(&[rule], broker.clone()).await;
    for (method, want) in [("GET", (200, "upstream /ok")), ("POST", (403, "Access denied\r\n"))] {
        let tcp = proxy.connect(upstream, ProtocolHint::None).await;
        let tls = tokio::time::timeout(DEADLINE, pki.client().connect(ServerName::try_from(API).unwrap(), tcp))
            .await
            .unwrap()
            .expect("the proxy's certificate for the SNI verifies against the test CA");
        assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
        let (status, body) = http1_to(tls, API, method, "/ok").await;
        assert_eq!((status, body.as_str()), want, "{method}");
    }
    let verdicts = proxy.verdicts();
    assert!(
        verdicts.contains(&(Verdict::Allowed, true)) && verdicts.contains(&(Verdict::Denied, true)),
        "{verdicts:?}"
    );
    // One certificate for the name, cached for the second connection.
    assert_eq!(broker.asked(), [Request::IssueServer { names: vec![API.into()] }]);
}

/// Attack attempts on a terminating port: a ClientHello naming a server the policy does not
/// name, or none (an IP address is never sent as SNI), is refused before any certificate is
/// minted for it (the broker holds leaves for both, so only the policy stops them), and plain
/// HTTP sent to the port is closed unanswered, never judged as a request.
#[tokio::test]
async fn terminating_tls_refuses_unnamed_servers_and_plain_http() {
    let (pki, upstream) = (Pki::new(), http_upstream().await);
    let broker = pki.broker(&[API, "evil.example.com", "127.0.0.1"]);
    let mut rule = http_rules();
    rule["terminating_tls"] = json!({});
    rule["server_names"] = json!([API]);
    let proxy = Proxy::start_with_broker(&[rule], broker.clone()).await;
    let names = [ServerName::try_from("evil.example.com").unwrap(), ServerName::IpAddress(upstream.ip().into())];
    for name in names {
        let tcp = proxy.connect(upstream, ProtocolHint::None).await;
        let handshake = tokio::time::timeout(DEADLINE, pki.client().connect(name.clone(), tcp)).await.unwrap();
        assert!(handshake.is_err(), "{name:?}: handshake refused");
    }
    let mut plain = proxy.connect(upstream, ProtocolHint::None).await;
    plain.write_all(b"GET /ok HTTP/1.1\r\nhost: server\r\nconnection: close\r\n\r\n").await.unwrap();
    let mut back = Vec::new();
    let _ = tokio::time::timeout(DEADLINE, plain.read_to_end(&mut back)).await.unwrap();
    assert!(!back.starts_with(b"HTTP/"), "{}", String::from_utf8_lossy(&back));
    assert!(!minted_for(&broker, "evil.example.com") && !minted_for(&broker, "127.0.0.1"), "{:?}", broker.asked());
    assert_eq!(proxy.verdicts(), [(Verdict::Denied, false); 3]);
    let reasons = reasons(&proxy);
    assert_eq!(reasons[0], "TLS server name `evil.example.com` is not in the policy's serverNames");
    assert_eq!(reasons[1], "the TLS ClientHello names no server (no SNI); serverNames need one");
    assert!(reasons[2].starts_with("TLS ClientHello refused"), "{}", reasons[2]);
}

/// originatingTLS: a plain client's allowed request goes to the upstream over TLS, verified
/// against the mesh CA (no secret) or a secret's CA, as the request's host; a denied one never
/// leaves the proxy.
#[tokio::test]
async fn originating_tls_to_a_trusted_upstream() {
    let pki = Pki::new();
    let upstream = tls_http_upstream(pki.server("server")).await;
    let broker = pki.broker(&[]);
    // The secret carries only a CA: the mesh CA is wrong for it, so it must be the one used.
    let other = Pki::new();
    broker.set_ca(other.ca_pem.clone());
    broker.set_secret(
        l7proxy::tables::SecretName { namespace: "default".into(), name: "upstream-ca".into() },
        None,
        None,
        Some(pki.ca_pem.clone()),
    );
    let mut by_secret = http_rules();
    by_secret["originating_tls"] = json!({"secret": {"name": "upstream-ca"}});
    let proxy = Proxy::start_with_broker(&[by_secret], broker.clone()).await;
    let (status, body) = http1(proxy.connect(upstream, ProtocolHint::None).await, "GET", "/ok").await;
    assert_eq!((status, body.as_str()), (200, "tls upstream /ok"));
    let (status, _) = http1(proxy.connect(upstream, ProtocolHint::None).await, "POST", "/ok").await;
    assert_eq!(status, 403);

    let mut by_mesh_ca = http_rules();
    by_mesh_ca["originating_tls"] = json!({});
    let proxy = Proxy::start_with_broker(&[by_mesh_ca], pki.broker(&[])).await;
    let (status, body) = http1(proxy.connect(upstream, ProtocolHint::None).await, "GET", "/ok").await;
    assert_eq!((status, body.as_str()), (200, "tls upstream /ok"));
}

/// originatingTLS fails closed: an upstream whose certificate the trust does not accept, or
/// whose certificate names another server, gets no request (502), and no plaintext either.
#[tokio::test]
async fn originating_tls_to_an_untrusted_or_misnamed_upstream_fails_closed() {
    let (pki, stranger) = (Pki::new(), Pki::new());
    let mut rule = http_rules();
    rule["originating_tls"] = json!({});
    let proxy = Proxy::start_with_broker(&[rule], pki.broker(&[])).await;
    for upstream in [tls_http_upstream(stranger.server("server")).await, tls_http_upstream(pki.server("other")).await] {
        let (status, body) = http1(proxy.connect(upstream, ProtocolHint::None).await, "GET", "/ok").await;
        assert_eq!((status, body.as_str()), (502, "upstream connect error\r\n"));
    }
    // Plaintext to a plain upstream would have been answered: originatingTLS never falls back.
    let (status, _) = http1(proxy.connect(http_upstream().await, ProtocolHint::None).await, "GET", "/ok").await;
    assert_eq!(status, 502);
}

/// TLS with no L7 rules (opaque): terminated for the SNI, forwarded as it is decrypted, to a
/// plain upstream, or re-encrypted to a TLS one verified as the port's first serverNames entry.
#[tokio::test]
async fn opaque_over_terminated_and_originated_tls() {
    let pki = Pki::new();
    let broker = pki.broker(&[API]);
    let terminate = json!({"terminating_tls": {}, "server_names": [API]});
    let both = json!({"terminating_tls": {}, "originating_tls": {}, "server_names": [API]});
    let upstreams = [(terminate, echo_upstream().await), (both, tls_echo_upstream(pki.server(API)).await)];
    for (rule, upstream) in upstreams {
        let proxy = Proxy::start_with_broker(std::slice::from_ref(&rule), broker.clone()).await;
        let tcp = proxy.connect(upstream, ProtocolHint::None).await;
        let mut tls = tokio::time::timeout(DEADLINE, pki.client().connect(ServerName::try_from(API).unwrap(), tcp))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(tls.get_ref().1.alpn_protocol(), None, "opaque offers no ALPN");
        tls.write_all(b"\x00\x01 not a protocol").await.unwrap();
        let mut back = [0u8; 17];
        let read = tokio::time::timeout(DEADLINE, tls.read_exact(&mut back)).await.unwrap();
        assert!(read.is_ok(), "{rule}: {read:?}, {:?}", reasons(&proxy));
        assert_eq!(&back, b"\x00\x01 not a protocol", "{rule}");
        assert_eq!(proxy.verdicts(), [(Verdict::Allowed, false)], "{rule}");
    }
}

/// Each request records one flow and one count, whichever way it is answered: allowed,
/// denied by the rules, or refused before them (CONNECT); the connection its own flow first.
#[tokio::test]
async fn each_request_records_one_flow_and_one_count() {
    let upstream = http_upstream().await;
    let proxy = Proxy::start(&[http_rules()]).await;
    let mut client = proxy.connect(upstream, ProtocolHint::None).await;
    client
        .write_all(
            b"GET /ok HTTP/1.1\r\nhost: server\r\n\r\n\
              POST /ok HTTP/1.1\r\nhost: server\r\ncontent-length: 0\r\n\r\n\
              CONNECT server:443 HTTP/1.1\r\nhost: server:443\r\n\r\n",
        )
        .await
        .unwrap();
    let mut back = Vec::new();
    tokio::time::timeout(DEADLINE, client.read_to_end(&mut back)).await.unwrap().unwrap();
    let back = String::from_utf8_lossy(&back);
    let statuses: Vec<_> = back.match_indices("HTTP/1.1 ").map(|(i, _)| &back[i + 9..i + 12]).collect();
    assert_eq!(statuses, ["200", "403", "405"], "{back}");
    assert_eq!(
        proxy.verdicts(),
        [(Verdict::Allowed, false), (Verdict::Allowed, true), (Verdict::Denied, true), (Verdict::Denied, true)]
    );
    let metrics = proxy.shared.metrics.encode();
    for (verdict, n) in [("allowed", 1), ("denied", 2)] {
        let line = format!("l7mesh_requests_total{{protocol=\"http\",direction=\"egress\",verdict=\"{verdict}\"}} {n}");
        assert!(metrics.contains(&line), "{line} in\n{metrics}");
    }
    // Each request's flow carries its answer: the status, and (forwarded only) the upstream leg
    // and a latency, as written on /v1/flows.
    let flows: Vec<serde_json::Value> = proxy
        .shared
        .flows
        .snapshot(&FlowFilter::default())
        .iter()
        .filter(|f| f.l7.is_some())
        .map(|f| serde_json::to_value(f).unwrap())
        .collect();
    let codes: Vec<_> = flows.iter().map(|f| f["l7"]["http"]["code"].as_u64().unwrap()).collect();
    assert_eq!(codes, [200, 403, 405], "{flows:#?}");
    assert_ne!(flows[0]["proxy"]["upstream"], "", "the allowed request's upstream leg");
    assert_eq!(flows[1]["proxy"]["upstream"], "", "a denied request has none");
    assert!(flows[0]["latency_ns"].as_u64().unwrap() > 0);
}

/// Kafka rules next to terminatingTLS or originatingTLS (policy-api refuses such a policy;
/// these tables skip it): the proxy does not judge Kafka inside TLS, so the connection is
/// closed unanswered with a DENIED flow, never passed opaquely with its requests unjudged.
#[tokio::test]
async fn kafka_rules_next_to_tls_are_refused_not_passed_through() {
    let pki = Pki::new();
    let upstream = kafka_upstream().await;
    for tls in ["terminating_tls", "originating_tls"] {
        let mut rule = json!({"l7": {"type": "kafka", "rules": [{"role": "produce", "topic": "orders"}]}});
        rule[tls] = json!({});
        let proxy = Proxy::start_with_broker(&[rule], pki.broker(&["127.0.0.1"])).await;
        let mut client = proxy.connect(upstream, ProtocolHint::Kafka).await;
        // A produce to a topic the rules deny: were the bytes passed, the upstream would answer.
        let _ = client.write_all(&produce("secrets", 1)).await;
        let mut back = Vec::new();
        let _ = tokio::time::timeout(DEADLINE, client.read_to_end(&mut back)).await.unwrap();
        assert!(back.is_empty(), "{tls}: nothing answered, got {} bytes", back.len());
        assert_eq!(proxy.verdicts(), [(Verdict::Denied, false)], "{tls}");
        assert!(reasons(&proxy)[0].contains("does not judge Kafka inside TLS"), "{tls}: {:?}", reasons(&proxy));
    }
}

/// Closes a client connection with a reset (SO_LINGER 0), not a FIN.
fn reset(client: TcpStream) {
    client.set_zero_linger().unwrap();
    drop(client);
}

/// `--max-connections-per-workload` slots come back however a terminatingTLS connection ends
/// before it is proxied: a reset in the middle of the ClientHello, a reset after a whole one,
/// a plain close, and a handshake the client never finishes (held until the proxy's handshake
/// deadline, counted meanwhile, so that it cannot be used to hold descriptors past the bound).
#[tokio::test]
async fn connection_slots_come_back_when_a_tls_handshake_ends_oddly() {
    let (pki, upstream) = (Pki::new(), http_upstream().await);
    let mut rule = http_rules();
    rule["terminating_tls"] = json!({});
    rule["server_names"] = json!([API]);
    let other = json!({"endpoint_id": 2});
    let proxy = Proxy::start_with(&[rule, other], 2, pki.broker(&[API])).await;
    let hello = client_hello(API);
    for round in 0..3 {
        let mut half = proxy.connect(upstream, ProtocolHint::None).await;
        half.write_all(&hello[..hello.len() / 2]).await.unwrap();
        let mut whole = proxy.connect(upstream, ProtocolHint::None).await;
        whole.write_all(&hello).await.unwrap();
        proxy.wait_held(CLIENT, 2).await;
        reset(half);
        // The proxy answered the whole ClientHello (its ServerHello): the reset comes mid-handshake.
        let mut first = [0u8; 1];
        tokio::time::timeout(DEADLINE, whole.read_exact(&mut first)).await.unwrap().unwrap();
        reset(whole);
        drop(proxy.connect(upstream, ProtocolHint::None).await);
        proxy.wait_held(CLIENT, 0).await;
        assert_eq!(proxy.connection_bound_trips(), 0, "round {round}");
    }
    // Two handshakes left hanging hold the workload's two places until the deadline.
    let mut stalled = Vec::new();
    for _ in 0..2 {
        let mut client = proxy.connect(upstream, ProtocolHint::None).await;
        client.write_all(&hello).await.unwrap();
        stalled.push(client);
    }
    proxy.wait_held(CLIENT, 2).await;
    assert_closed_unanswered(proxy.connect(upstream, ProtocolHint::None).await).await;
    assert_eq!(proxy.connection_bound_trips(), 1);
    let mut other = proxy.connect_other(echo_upstream().await, ProtocolHint::None).await;
    assert_echoes(&mut other).await;
    // The proxy gives up on them at its handshake deadline and their places come back.
    tokio::time::sleep(l7proxy::proxy::SNIFF_TIMEOUT).await;
    proxy.wait_held(CLIENT, 0).await;
    let tcp = proxy.connect(upstream, ProtocolHint::None).await;
    let tls = tokio::time::timeout(DEADLINE, pki.client().connect(ServerName::try_from(API).unwrap(), tcp))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(http1_to(tls, API, "GET", "/ok").await.0, 200);
    drop((stalled, other));
    proxy.wait_held(CLIENT, 0).await;
    proxy.wait_held(OTHER, 0).await;
    assert_eq!(proxy.shared.connections.owners(), 0);
}

/// A close order from re-judging (denied or rerouted by a new policy version) and the drain
/// deadline at shutdown each give the connections' places back once: the count reaches zero
/// and never goes below it (the workload then holds the whole bound again).
#[tokio::test]
async fn connection_slots_come_back_on_close_orders_and_the_drain_deadline() {
    let (upstream, _) = counted_echo_upstream().await;
    let proxy = Proxy::start_bounded(&[json!({}), json!({"endpoint_id": 2})], 2).await;
    let mut clients = open_echoing(&proxy, upstream, 2).await;
    let peers: Vec<_> = clients.iter().map(|c| c.local_addr().unwrap()).collect();
    assert_eq!(proxy.shared.live.close(&peers[..1], &peers[1..]).await, (1, 1));
    proxy.wait_held(CLIENT, 0).await;
    for client in clients.drain(..) {
        assert_closed_unanswered(client).await;
    }
    // Ordered closed again after the fact (a late duplicate): nothing is given back twice.
    assert_eq!(proxy.shared.live.close(&peers, &[]).await, (0, 0));
    for _ in 0..2 {
        let mut client = proxy.connect(upstream, ProtocolHint::None).await;
        assert_echoes(&mut client).await;
        clients.push(client);
    }
    proxy.wait_held(CLIENT, 2).await;
    assert_closed_unanswered(proxy.connect(upstream, ProtocolHint::None).await).await;
    assert_eq!(proxy.connection_bound_trips(), 1);
    let mut other = proxy.connect_other(upstream, ProtocolHint::None).await;
    assert_echoes(&mut other).await;
    // Shutdown: the open connections outlive the drain (1 s here) and are cut at its deadline.
    proxy.shutdown.send(true).unwrap();
    proxy.wait_held(CLIENT, 0).await;
    proxy.wait_held(OTHER, 0).await;
    assert_eq!(proxy.shared.connections.owners(), 0);
    for client in clients {
        assert_closed_unanswered(client).await;
    }
}

/// HTTP/2 and gRPC: one connection is one place whatever number of streams it carries, and
/// streams reset by the client (or whole connections reset mid-request) give nothing back twice.
#[tokio::test]
async fn an_http2_connection_is_one_place_however_many_streams() {
    let upstream = http_upstream().await;
    let rules = json!({"l7": {"type": "http", "rules": [{"method": "POST", "path": "/ok"}]}});
    let proxy = Proxy::start_bounded(&[rules], 2).await;
    let stream = proxy.connect(upstream, ProtocolHint::None).await;
    let requests: Vec<_> = (0..20).map(|i| if i % 2 == 0 { ("/ok", false) } else { ("/no", true) }).collect();
    let got = http2(stream, &requests).await;
    assert_eq!(got.len(), 20);
    proxy.wait_held(CLIENT, 0).await;
    // Two held connections, each with streams open; a third is refused.
    let mut held = Vec::new();
    for _ in 0..2 {
        let stream = proxy.connect(upstream, ProtocolHint::None).await;
        let (send, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream)).await.unwrap();
        held.push((send, tokio::spawn(conn)));
    }
    for (send, _) in &mut held {
        let req = hyper::Request::post("http://server/ok").body(Empty::<Bytes>::new()).unwrap();
        let resp = tokio::time::timeout(DEADLINE, send.send_request(req)).await.unwrap().unwrap();
        assert_eq!(resp.status(), 200);
    }
    proxy.wait_held(CLIENT, 2).await;
    assert_closed_unanswered(proxy.connect(upstream, ProtocolHint::None).await).await;
    for (_, conn) in held {
        conn.abort();
    }
    proxy.wait_held(CLIENT, 0).await;
    assert_eq!(proxy.shared.connections.owners(), 0);
}

/// An upstream that reads requests and never answers; each connection it accepts is signalled.
async fn silent_upstream() -> (SocketAddr, tokio::sync::mpsc::UnboundedReceiver<()>) {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let addr = serve_each(move |mut stream| {
        let tx = tx.clone();
        async move {
            let mut buf = [0u8; 4096];
            while matches!(stream.read(&mut buf).await, Ok(n) if n > 0) {
                let _ = tx.send(());
            }
        }
    })
    .await;
    (addr, rx)
}

/// A request the rules allowed (or, in audit, let through) and sent upstream, whose client goes
/// away before the answer (its HTTP/2 stream reset): it reached the upstream, so it records its
/// one flow and one count all the same, with no status and the reason, rather than nothing.
#[tokio::test]
async fn a_request_whose_client_goes_away_before_the_answer_is_recorded_once() {
    let (upstream, mut reached) = silent_upstream().await;
    let rules = json!({"l7": {"type": "http", "rules": [{"method": "POST", "path": "/ok"}]}});
    let proxy = Proxy::start(&[rules]).await;
    let stream = proxy.connect(upstream, ProtocolHint::None).await;
    let (mut send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream)).await.unwrap();
    let conn = tokio::spawn(conn);
    let req = hyper::Request::post("http://server/ok").body(Empty::<Bytes>::new()).unwrap();
    let pending = tokio::spawn(send.send_request(req));
    tokio::time::timeout(DEADLINE, reached.recv()).await.unwrap().unwrap();
    // The client gives up on the answer: hyper resets the stream.
    pending.abort();
    let deadline = tokio::time::Instant::now() + DEADLINE;
    let flows = loop {
        let flows = proxy.shared.flows.snapshot(&FlowFilter::default());
        if flows.iter().any(|f| f.l7.is_some()) || tokio::time::Instant::now() > deadline {
            break flows;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let requests: Vec<_> = flows.iter().filter(|f| f.l7.is_some()).collect();
    assert_eq!(requests.len(), 1, "{flows:?}");
    assert_eq!(requests[0].verdict, Verdict::Allowed);
    let reason = requests[0].reason.as_ref().map(|r| r.to_string()).unwrap_or_default();
    assert!(reason.contains("went away before the answer"), "{reason}");
    let metrics = proxy.shared.metrics.encode();
    let line = r#"l7mesh_requests_total{protocol="http",direction="egress",verdict="allowed"} 1"#;
    assert!(metrics.contains(line), "{line} in\n{metrics}");
    drop(send);
    conn.abort();
}

/// An HTTP/1.1 and HTTP/2 upstream answering `xff=<X-Forwarded-For fields> fwd=<Forwarded
/// fields>` (each field's values joined by `|`, as many as arrived).
async fn forwarded_upstream() -> SocketAddr {
    serve_each(|stream| async move {
        let service = hyper::service::service_fn(|req: hyper::Request<hyper::body::Incoming>| async move {
            let all = |name: &str| {
                req.headers()
                    .get_all(name)
                    .iter()
                    .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
                    .collect::<Vec<_>>()
                    .join("|")
            };
            let mut body = format!("xff={} fwd={}", all("x-forwarded-for"), all("forwarded"));
            // A lookalike a CGI-style backend would read as X-Forwarded-For.
            if req
                .headers()
                .keys()
                .any(|k| k.as_str().replace('_', "-") == "x-forwarded-for" && k.as_str().contains('_'))
            {
                body.push_str(" lookalike");
            }
            Ok::<_, std::convert::Infallible>(hyper::Response::new(Full::new(Bytes::from(body))))
        });
        let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
            .serve_connection(TokioIo::new(stream), service)
            .await;
    })
    .await
}

/// One GET with `headers` over HTTP/1.1 or HTTP/2 (prior knowledge): status and body.
async fn get_with(stream: TcpStream, h2: bool, headers: &[(&str, &str)]) -> (u16, String) {
    let mut req = hyper::Request::builder().method("GET").uri(if h2 { "http://server/x" } else { "/x" });
    if !h2 {
        req = req.header("host", "server");
    }
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req.body(Empty::<Bytes>::new()).unwrap();
    let resp = if h2 {
        let (mut send, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream)).await.unwrap();
        tokio::spawn(conn);
        tokio::time::timeout(DEADLINE, send.send_request(req)).await.unwrap().unwrap()
    } else {
        let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.unwrap();
        tokio::spawn(conn);
        tokio::time::timeout(DEADLINE, send.send_request(req)).await.unwrap().unwrap()
    };
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

/// A client claiming to be someone else every way these fields allow.
const SPOOFED: [(&str, &str); 5] = [
    ("X-Forwarded-For", "1.2.3.4"),
    ("X_Forwarded_For", "6.6.6.6"),
    ("x-forwarded-for", "5.6.7.8, 9.9.9.9"),
    ("Forwarded", "for=1.2.3.4;proto=https"),
    ("forwarded", "for=\"[2001:db8::1]\""),
];

#[tokio::test]
async fn forwarded_fields_name_the_client_and_replace_its_own_claims() {
    let upstream = forwarded_upstream().await;
    let proxy = Proxy::start(&[json!({"l7": {"type": "http", "rules": [{"method": "GET"}]}})]).await;
    for h2 in [false, true] {
        let got = get_with(proxy.connect(upstream, ProtocolHint::None).await, h2, &SPOOFED).await;
        assert_eq!(got, (200, "xff=127.0.0.1 fwd=for=127.0.0.1".to_string()), "h2={h2}");
        let got = get_with(proxy.connect(upstream, ProtocolHint::None).await, h2, &[]).await;
        assert_eq!(got, (200, "xff=127.0.0.1 fwd=for=127.0.0.1".to_string()), "h2={h2}, nothing claimed");
    }
}

#[tokio::test]
async fn append_mode_keeps_the_clients_hops_and_names_the_client_last() {
    let upstream = forwarded_upstream().await;
    let config = ClientAddressConfig { forwarded: ForwardedMode::Append, ..Default::default() };
    let proxy =
        Proxy::start_client_address(&[json!({"l7": {"type": "http", "rules": [{"method": "GET"}]}})], config).await;
    for h2 in [false, true] {
        let got = get_with(proxy.connect(upstream, ProtocolHint::None).await, h2, &SPOOFED).await;
        assert_eq!(
            got,
            (
                200,
                "xff=1.2.3.4, 5.6.7.8, 9.9.9.9, 127.0.0.1 fwd=for=1.2.3.4;proto=https, for=\"[2001:db8::1]\", for=127.0.0.1"
                    .to_string()
            ),
            "h2={h2}"
        );
    }
}

#[tokio::test]
async fn rules_on_x_forwarded_for_judge_the_proxys_value_not_the_clients_claim() {
    let upstream = forwarded_upstream().await;
    // Only requests "from 1.2.3.4" are allowed: a client on 127.0.0.1 claiming it is refused.
    let only_spoof = json!({"l7": {"type": "http", "rules": [{"headers": ["X-Forwarded-For: 1.2.3.4"]}]}});
    let proxy = Proxy::start(&[only_spoof]).await;
    for h2 in [false, true] {
        let got =
            get_with(proxy.connect(upstream, ProtocolHint::None).await, h2, &[("X-Forwarded-For", "1.2.3.4")]).await;
        assert_eq!(got.0, 403, "h2={h2}: {got:?}");
    }
    let only_real = json!({"l7": {"type": "http", "rules": [{"headers": ["X-Forwarded-For: 127.0.0.1"]}]}});
    let proxy = Proxy::start(&[only_real]).await;
    let got =
        get_with(proxy.connect(upstream, ProtocolHint::None).await, false, &[("X-Forwarded-For", "1.2.3.4")]).await;
    assert_eq!(got, (200, "xff=127.0.0.1 fwd=for=127.0.0.1".to_string()));
}

#[tokio::test]
async fn proxy_protocol_v2_starts_an_opted_in_opaque_port_only() {
    let upstream = echo_upstream().await;
    let other = echo_upstream().await;
    let config = ClientAddressConfig { proxy_protocol_ports: [upstream.port()].into(), ..Default::default() };
    let proxy = Proxy::start_client_address(&[json!({})], config).await;
    let mut client = proxy.connect(upstream, ProtocolHint::None).await;
    let me = client.local_addr().unwrap();
    client.write_all(b"\x00\x01 opaque").await.unwrap();
    let header = l7proxy::client_addr::proxy_v2_header(me, upstream);
    let mut back = vec![0u8; header.len() + 9];
    tokio::time::timeout(DEADLINE, client.read_exact(&mut back)).await.unwrap().unwrap();
    assert_eq!(&back[..header.len()], &header[..], "the echo starts with the header the upstream got");
    assert_eq!(&back[header.len()..], b"\x00\x01 opaque");
    // Another port: the client's bytes alone.
    let mut client = proxy.connect(other, ProtocolHint::None).await;
    client.write_all(b"\x00\x01 opaque").await.unwrap();
    let mut back = [0u8; 9];
    tokio::time::timeout(DEADLINE, client.read_exact(&mut back)).await.unwrap().unwrap();
    assert_eq!(&back, b"\x00\x01 opaque");
}
