//! Per-topic judgment for every Kafka request type `kafka-protocol` decodes, and for every
//! denial a response of the request's own type carrying an authorization error.
//!
//! Every request type is classified here, exhaustively (the `match` over `RequestKind` has no
//! catch-all for the topic-bearing APIs):
//! - names topics (or topic config resources): each topic is judged on its own; denied ones are
//!   removed before the request goes upstream and answered with TOPIC_AUTHORIZATION_FAILED
//!   merged into the broker's response ([`retain_topics`], [`add_denied`]);
//! - stands for topics it does not name (topic IDs, "every topic"): judged as one topic with no
//!   name, which only rules without a topic allow ([`UNNAMED`]), as a whole;
//! - names no topic: judged as a whole by its API key.

use bytes::BytesMut;
use kafka_protocol::messages::*;
use kafka_protocol::messages::{RequestKind as Q, ResponseKind as R};
use kafka_protocol::protocol::StrBytes;

pub const TOPIC_AUTHORIZATION_FAILED: i16 = 29;
pub const GROUP_AUTHORIZATION_FAILED: i16 = 30;
pub const CLUSTER_AUTHORIZATION_FAILED: i16 = 31;
pub const TRANSACTIONAL_ID_AUTHORIZATION_FAILED: i16 = 53;

/// The name a topic is judged by when the request does not name it (a topic ID, "every topic",
/// an empty name): validation refuses an empty topic in a rule, so only rules without a topic
/// allow it. Fail-closed: a topic ID can never borrow a named topic's permission.
pub const UNNAMED: &str = "";

/// The config resource type of a topic (DescribeConfigs, AlterConfigs, IncrementalAlterConfigs).
const TOPIC_RESOURCE: i8 = 2;

/// How a request was judged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Judged {
    /// It names no topic: judge it as a whole by its API key.
    NoTopic,
    /// It stands for topics it does not name: judged as one unnamed topic, as a whole.
    Whole { allowed: bool },
    /// Judged per topic: how many items were kept and how many removed.
    Items { kept: usize, removed: usize },
}

/// The judge: `Some(topic)` for a topic (or [`UNNAMED`]), `None` for an item that names no
/// topic (a broker config resource); true allows.
pub type Judge<'a> = dyn FnMut(Option<&str>) -> bool + 'a;

fn tn(t: &TopicName) -> &str {
    &t.0
}

/// A topic name as judged (an empty one is [`UNNAMED`], as a topic ID is).
fn named(t: &TopicName) -> Option<&str> {
    Some(tn(t))
}

#[derive(Default)]
struct Count {
    kept: usize,
    removed: usize,
    items: bool,
    whole: bool,
    whole_denied: bool,
}

impl Count {
    fn keep<T>(&mut self, items: &mut Vec<T>, name: impl Fn(&T) -> Option<&str>, judge: &mut Judge) {
        items.retain(|t| {
            self.items = true;
            let ok = judge(name(t));
            if ok {
                self.kept += 1;
            } else {
                self.removed += 1;
            }
            ok
        });
    }

    /// A topic list where `None` stands for every topic.
    fn keep_opt<T>(&mut self, items: &mut Option<Vec<T>>, name: impl Fn(&T) -> Option<&str>, judge: &mut Judge) {
        match items {
            Some(items) => self.keep(items, name, judge),
            None => self.whole(judge),
        }
    }

    /// Topics the request does not name: one unnamed topic, for the whole request.
    fn whole(&mut self, judge: &mut Judge) {
        self.whole = true;
        if !judge(Some(UNNAMED)) {
            self.whole_denied = true;
        }
    }

    /// Topics judged all or nothing: any denied denies the request (rare APIs whose responses
    /// l7mesh does not merge).
    fn all_or_nothing<'a>(&mut self, names: impl IntoIterator<Item = &'a str>, judge: &mut Judge) {
        for n in names {
            self.whole = true;
            if !judge(Some(n)) {
                self.whole_denied = true;
            }
        }
    }

    fn done(self) -> Judged {
        if self.whole_denied {
            Judged::Whole { allowed: false }
        } else if self.items {
            Judged::Items { kept: self.kept, removed: self.removed }
        } else if self.whole {
            Judged::Whole { allowed: true }
        } else {
            Judged::NoTopic
        }
    }
}

/// Judges every topic `req` names, removing the denied ones from it.
pub fn retain_topics(req: &mut Q, version: i16, judge: &mut Judge) -> Judged {
    let mut c = Count::default();
    match req {
        // Topic IDs (v13) carry no name: judged as UNNAMED.
        Q::Produce(r) => c.keep(&mut r.topic_data, |t| named(&t.name), judge),
        Q::Fetch(r) => c.keep(&mut r.topics, |t| named(&t.topic), judge),
        Q::ListOffsets(r) => c.keep(&mut r.topics, |t| named(&t.name), judge),
        // Metadata is judged by API key (see ARCHITECTURE: topic reads and writes are judged
        // per topic where they happen); auto-creation is judged in `kafka.rs` as CreateTopics.
        Q::Metadata(_) => {}
        Q::OffsetCommit(r) => c.keep(&mut r.topics, |t| named(&t.name), judge),
        Q::OffsetFetch(r) => {
            if version < 8 {
                c.keep_opt(&mut r.topics, |t| named(&t.name), judge);
            } else {
                for g in &mut r.groups {
                    c.keep_opt(&mut g.topics, |t| named(&t.name), judge);
                }
            }
        }
        Q::OffsetDelete(r) => c.keep(&mut r.topics, |t| named(&t.name), judge),
        Q::TxnOffsetCommit(r) => c.keep(&mut r.topics, |t| named(&t.name), judge),
        Q::AddPartitionsToTxn(r) => {
            c.keep(&mut r.v3_and_below_topics, |t| named(&t.name), judge);
            for t in &mut r.transactions {
                c.keep(&mut t.topics, |t| named(&t.name), judge);
            }
        }
        Q::CreateTopics(r) => c.keep(&mut r.topics, |t| named(&t.name), judge),
        Q::DeleteTopics(r) => {
            c.keep(&mut r.topic_names, named, judge);
            // v6: by name or by ID; an ID alone is UNNAMED.
            c.keep(
                &mut r.topics,
                |t| t.name.as_ref().map(tn).map(|s| if s.is_empty() { UNNAMED } else { s }).or(Some(UNNAMED)),
                judge,
            );
        }
        Q::CreatePartitions(r) => c.keep(&mut r.topics, |t| named(&t.name), judge),
        Q::DeleteRecords(r) => c.keep(&mut r.topics, |t| named(&t.name), judge),
        Q::DescribeConfigs(r) => c.keep(&mut r.resources, |x| resource(x.resource_type, &x.resource_name), judge),
        Q::AlterConfigs(r) => c.keep(&mut r.resources, |x| resource(x.resource_type, &x.resource_name), judge),
        Q::IncrementalAlterConfigs(r) => {
            c.keep(&mut r.resources, |x| resource(x.resource_type, &x.resource_name), judge)
        }
        Q::ElectLeaders(r) => c.keep_opt(&mut r.topic_partitions, |t| named(&t.topic), judge),
        Q::AlterPartitionReassignments(r) => c.keep(&mut r.topics, |t| named(&t.name), judge),
        Q::ListPartitionReassignments(r) => c.keep_opt(&mut r.topics, |t| named(&t.name), judge),
        Q::DescribeProducers(r) => c.keep(&mut r.topics, |t| named(&t.name), judge),
        Q::OffsetForLeaderEpoch(r) => c.keep(&mut r.topics, |t| named(&t.topic), judge),
        Q::DescribeTopicPartitions(r) => {
            c.keep(&mut r.topics, |t| named(&t.name), judge);
            if let Some(cursor) = &r.cursor {
                c.all_or_nothing([tn(&cursor.topic_name)], judge);
            }
        }
        Q::AlterReplicaLogDirs(r) => {
            for d in &mut r.dirs {
                c.keep(&mut d.topics, |t| named(&t.name), judge);
            }
        }
        Q::DescribeLogDirs(r) => c.keep_opt(&mut r.topics, |t| named(&t.topic), judge),
        Q::WriteTxnMarkers(r) => {
            for m in &mut r.markers {
                c.keep(&mut m.topics, |t| named(&t.name), judge);
            }
        }
        Q::DescribeShareGroupOffsets(r) => {
            for g in &r.groups {
                match &g.topics {
                    Some(ts) => c.all_or_nothing(ts.iter().map(|t| tn(&t.topic_name)), judge),
                    None => c.whole(judge),
                }
            }
        }
        Q::AlterShareGroupOffsets(r) => c.all_or_nothing(r.topics.iter().map(|t| tn(&t.topic_name)), judge),
        Q::DeleteShareGroupOffsets(r) => c.all_or_nothing(r.topics.iter().map(|t| tn(&t.topic_name)), judge),
        // Topic IDs only: the whole request is one unnamed topic.
        Q::ShareFetch(r) => {
            if !r.topics.is_empty() || !r.forgotten_topics_data.is_empty() {
                c.whole(judge)
            }
        }
        Q::ShareAcknowledge(r) => {
            if !r.topics.is_empty() {
                c.whole(judge)
            }
        }
        Q::AlterPartition(r) => {
            if !r.topics.is_empty() {
                c.whole(judge)
            }
        }
        Q::AssignReplicasToDirs(r) => {
            if r.directories.iter().any(|d| !d.topics.is_empty()) {
                c.whole(judge)
            }
        }
        Q::InitializeShareGroupState(r) => {
            if !r.topics.is_empty() {
                c.whole(judge)
            }
        }
        Q::ReadShareGroupState(r) => {
            if !r.topics.is_empty() {
                c.whole(judge)
            }
        }
        Q::WriteShareGroupState(r) => {
            if !r.topics.is_empty() {
                c.whole(judge)
            }
        }
        Q::DeleteShareGroupState(r) => {
            if !r.topics.is_empty() {
                c.whole(judge)
            }
        }
        Q::ReadShareGroupStateSummary(r) => {
            if !r.topics.is_empty() {
                c.whole(judge)
            }
        }
        // Names no topic. ConsumerGroupHeartbeat and ShareGroupHeartbeat carry subscriptions
        // (and owned partitions by ID): joining reads nothing, the Fetch and OffsetCommit that
        // follow are judged per topic. The raft APIs (Vote, BeginQuorumEpoch, EndQuorumEpoch,
        // DescribeQuorum, FetchSnapshot) name only the cluster metadata log. ACL requests name
        // resource patterns, judged by API key (ACL management is cluster administration).
        Q::FindCoordinator(_)
        | Q::JoinGroup(_)
        | Q::Heartbeat(_)
        | Q::LeaveGroup(_)
        | Q::SyncGroup(_)
        | Q::DescribeGroups(_)
        | Q::ListGroups(_)
        | Q::SaslHandshake(_)
        | Q::ApiVersions(_)
        | Q::InitProducerId(_)
        | Q::AddOffsetsToTxn(_)
        | Q::EndTxn(_)
        | Q::DescribeAcls(_)
        | Q::CreateAcls(_)
        | Q::DeleteAcls(_)
        | Q::SaslAuthenticate(_)
        | Q::CreateDelegationToken(_)
        | Q::RenewDelegationToken(_)
        | Q::ExpireDelegationToken(_)
        | Q::DescribeDelegationToken(_)
        | Q::DeleteGroups(_)
        | Q::DescribeClientQuotas(_)
        | Q::AlterClientQuotas(_)
        | Q::DescribeUserScramCredentials(_)
        | Q::AlterUserScramCredentials(_)
        | Q::Vote(_)
        | Q::BeginQuorumEpoch(_)
        | Q::EndQuorumEpoch(_)
        | Q::DescribeQuorum(_)
        | Q::UpdateFeatures(_)
        | Q::Envelope(_)
        | Q::FetchSnapshot(_)
        | Q::DescribeCluster(_)
        | Q::BrokerRegistration(_)
        | Q::BrokerHeartbeat(_)
        | Q::UnregisterBroker(_)
        | Q::DescribeTransactions(_)
        | Q::ListTransactions(_)
        | Q::AllocateProducerIds(_)
        | Q::ConsumerGroupHeartbeat(_)
        | Q::ConsumerGroupDescribe(_)
        | Q::ControllerRegistration(_)
        | Q::GetTelemetrySubscriptions(_)
        | Q::PushTelemetry(_)
        | Q::ListConfigResources(_)
        | Q::ShareGroupHeartbeat(_)
        | Q::ShareGroupDescribe(_)
        | Q::AddRaftVoter(_)
        | Q::RemoveRaftVoter(_)
        | Q::UpdateRaftVoter(_) => {}
        // `RequestKind` is non-exhaustive: a variant a newer codec adds is refused as a whole
        // unnamed topic until it is classified here.
        #[allow(unreachable_patterns)]
        _ => c.whole(judge),
    }
    c.done()
}

/// A config resource: a topic resource names its topic; other resources (brokers, loggers,
/// groups, client metrics) name none.
fn resource(kind: i8, name: &StrBytes) -> Option<&str> {
    (kind == TOPIC_RESOURCE).then(|| if name.is_empty() { UNNAMED } else { &**name })
}

/// The response's own type, empty.
pub fn empty_response(api_key: ApiKey) -> R {
    match api_key {
        ApiKey::Produce => R::Produce(ProduceResponse::default()),
        ApiKey::Fetch => R::Fetch(FetchResponse::default()),
        ApiKey::ListOffsets => R::ListOffsets(ListOffsetsResponse::default()),
        ApiKey::Metadata => R::Metadata(MetadataResponse::default()),
        ApiKey::OffsetCommit => R::OffsetCommit(OffsetCommitResponse::default()),
        ApiKey::OffsetFetch => R::OffsetFetch(OffsetFetchResponse::default()),
        ApiKey::FindCoordinator => R::FindCoordinator(FindCoordinatorResponse::default()),
        ApiKey::JoinGroup => R::JoinGroup(JoinGroupResponse::default()),
        ApiKey::Heartbeat => R::Heartbeat(HeartbeatResponse::default()),
        ApiKey::LeaveGroup => R::LeaveGroup(LeaveGroupResponse::default()),
        ApiKey::SyncGroup => R::SyncGroup(SyncGroupResponse::default()),
        ApiKey::DescribeGroups => R::DescribeGroups(DescribeGroupsResponse::default()),
        ApiKey::ListGroups => R::ListGroups(ListGroupsResponse::default()),
        ApiKey::SaslHandshake => R::SaslHandshake(SaslHandshakeResponse::default()),
        ApiKey::ApiVersions => R::ApiVersions(ApiVersionsResponse::default()),
        ApiKey::CreateTopics => R::CreateTopics(CreateTopicsResponse::default()),
        ApiKey::DeleteTopics => R::DeleteTopics(DeleteTopicsResponse::default()),
        ApiKey::DeleteRecords => R::DeleteRecords(DeleteRecordsResponse::default()),
        ApiKey::InitProducerId => R::InitProducerId(InitProducerIdResponse::default()),
        ApiKey::OffsetForLeaderEpoch => R::OffsetForLeaderEpoch(OffsetForLeaderEpochResponse::default()),
        ApiKey::AddPartitionsToTxn => R::AddPartitionsToTxn(AddPartitionsToTxnResponse::default()),
        ApiKey::AddOffsetsToTxn => R::AddOffsetsToTxn(AddOffsetsToTxnResponse::default()),
        ApiKey::EndTxn => R::EndTxn(EndTxnResponse::default()),
        ApiKey::WriteTxnMarkers => R::WriteTxnMarkers(WriteTxnMarkersResponse::default()),
        ApiKey::TxnOffsetCommit => R::TxnOffsetCommit(TxnOffsetCommitResponse::default()),
        ApiKey::DescribeAcls => R::DescribeAcls(DescribeAclsResponse::default()),
        ApiKey::CreateAcls => R::CreateAcls(CreateAclsResponse::default()),
        ApiKey::DeleteAcls => R::DeleteAcls(DeleteAclsResponse::default()),
        ApiKey::DescribeConfigs => R::DescribeConfigs(DescribeConfigsResponse::default()),
        ApiKey::AlterConfigs => R::AlterConfigs(AlterConfigsResponse::default()),
        ApiKey::AlterReplicaLogDirs => R::AlterReplicaLogDirs(AlterReplicaLogDirsResponse::default()),
        ApiKey::DescribeLogDirs => R::DescribeLogDirs(DescribeLogDirsResponse::default()),
        ApiKey::SaslAuthenticate => R::SaslAuthenticate(SaslAuthenticateResponse::default()),
        ApiKey::CreatePartitions => R::CreatePartitions(CreatePartitionsResponse::default()),
        ApiKey::CreateDelegationToken => R::CreateDelegationToken(CreateDelegationTokenResponse::default()),
        ApiKey::RenewDelegationToken => R::RenewDelegationToken(RenewDelegationTokenResponse::default()),
        ApiKey::ExpireDelegationToken => R::ExpireDelegationToken(ExpireDelegationTokenResponse::default()),
        ApiKey::DescribeDelegationToken => R::DescribeDelegationToken(DescribeDelegationTokenResponse::default()),
        ApiKey::DeleteGroups => R::DeleteGroups(DeleteGroupsResponse::default()),
        ApiKey::ElectLeaders => R::ElectLeaders(ElectLeadersResponse::default()),
        ApiKey::IncrementalAlterConfigs => R::IncrementalAlterConfigs(IncrementalAlterConfigsResponse::default()),
        ApiKey::AlterPartitionReassignments => {
            R::AlterPartitionReassignments(AlterPartitionReassignmentsResponse::default())
        }
        ApiKey::ListPartitionReassignments => {
            R::ListPartitionReassignments(ListPartitionReassignmentsResponse::default())
        }
        ApiKey::OffsetDelete => R::OffsetDelete(OffsetDeleteResponse::default()),
        ApiKey::DescribeClientQuotas => R::DescribeClientQuotas(DescribeClientQuotasResponse::default()),
        ApiKey::AlterClientQuotas => R::AlterClientQuotas(AlterClientQuotasResponse::default()),
        ApiKey::DescribeUserScramCredentials => {
            R::DescribeUserScramCredentials(DescribeUserScramCredentialsResponse::default())
        }
        ApiKey::AlterUserScramCredentials => R::AlterUserScramCredentials(AlterUserScramCredentialsResponse::default()),
        ApiKey::Vote => R::Vote(VoteResponse::default()),
        ApiKey::BeginQuorumEpoch => R::BeginQuorumEpoch(BeginQuorumEpochResponse::default()),
        ApiKey::EndQuorumEpoch => R::EndQuorumEpoch(EndQuorumEpochResponse::default()),
        ApiKey::DescribeQuorum => R::DescribeQuorum(DescribeQuorumResponse::default()),
        ApiKey::AlterPartition => R::AlterPartition(AlterPartitionResponse::default()),
        ApiKey::UpdateFeatures => R::UpdateFeatures(UpdateFeaturesResponse::default()),
        ApiKey::Envelope => R::Envelope(EnvelopeResponse::default()),
        ApiKey::FetchSnapshot => R::FetchSnapshot(FetchSnapshotResponse::default()),
        ApiKey::DescribeCluster => R::DescribeCluster(DescribeClusterResponse::default()),
        ApiKey::DescribeProducers => R::DescribeProducers(DescribeProducersResponse::default()),
        ApiKey::BrokerRegistration => R::BrokerRegistration(BrokerRegistrationResponse::default()),
        ApiKey::BrokerHeartbeat => R::BrokerHeartbeat(BrokerHeartbeatResponse::default()),
        ApiKey::UnregisterBroker => R::UnregisterBroker(UnregisterBrokerResponse::default()),
        ApiKey::DescribeTransactions => R::DescribeTransactions(DescribeTransactionsResponse::default()),
        ApiKey::ListTransactions => R::ListTransactions(ListTransactionsResponse::default()),
        ApiKey::AllocateProducerIds => R::AllocateProducerIds(AllocateProducerIdsResponse::default()),
        ApiKey::ConsumerGroupHeartbeat => R::ConsumerGroupHeartbeat(ConsumerGroupHeartbeatResponse::default()),
        ApiKey::ConsumerGroupDescribe => R::ConsumerGroupDescribe(ConsumerGroupDescribeResponse::default()),
        ApiKey::ControllerRegistration => R::ControllerRegistration(ControllerRegistrationResponse::default()),
        ApiKey::GetTelemetrySubscriptions => R::GetTelemetrySubscriptions(GetTelemetrySubscriptionsResponse::default()),
        ApiKey::PushTelemetry => R::PushTelemetry(PushTelemetryResponse::default()),
        ApiKey::AssignReplicasToDirs => R::AssignReplicasToDirs(AssignReplicasToDirsResponse::default()),
        ApiKey::ListConfigResources => R::ListConfigResources(ListConfigResourcesResponse::default()),
        ApiKey::DescribeTopicPartitions => R::DescribeTopicPartitions(DescribeTopicPartitionsResponse::default()),
        ApiKey::ShareGroupHeartbeat => R::ShareGroupHeartbeat(ShareGroupHeartbeatResponse::default()),
        ApiKey::ShareGroupDescribe => R::ShareGroupDescribe(ShareGroupDescribeResponse::default()),
        ApiKey::ShareFetch => R::ShareFetch(ShareFetchResponse::default()),
        ApiKey::ShareAcknowledge => R::ShareAcknowledge(ShareAcknowledgeResponse::default()),
        ApiKey::AddRaftVoter => R::AddRaftVoter(AddRaftVoterResponse::default()),
        ApiKey::RemoveRaftVoter => R::RemoveRaftVoter(RemoveRaftVoterResponse::default()),
        ApiKey::UpdateRaftVoter => R::UpdateRaftVoter(UpdateRaftVoterResponse::default()),
        ApiKey::InitializeShareGroupState => R::InitializeShareGroupState(InitializeShareGroupStateResponse::default()),
        ApiKey::ReadShareGroupState => R::ReadShareGroupState(ReadShareGroupStateResponse::default()),
        ApiKey::WriteShareGroupState => R::WriteShareGroupState(WriteShareGroupStateResponse::default()),
        ApiKey::DeleteShareGroupState => R::DeleteShareGroupState(DeleteShareGroupStateResponse::default()),
        ApiKey::ReadShareGroupStateSummary => {
            R::ReadShareGroupStateSummary(ReadShareGroupStateSummaryResponse::default())
        }
        ApiKey::DescribeShareGroupOffsets => R::DescribeShareGroupOffsets(DescribeShareGroupOffsetsResponse::default()),
        ApiKey::AlterShareGroupOffsets => R::AlterShareGroupOffsets(AlterShareGroupOffsetsResponse::default()),
        ApiKey::DeleteShareGroupOffsets => R::DeleteShareGroupOffsets(DeleteShareGroupOffsetsResponse::default()),
    }
}

/// Sets the response's top-level error code, where its type has one; false where it has none.
fn set_error(resp: &mut R, code: i16) -> bool {
    match resp {
        R::Fetch(r) => r.error_code = code,
        R::Metadata(r) => r.error_code = code,
        R::OffsetFetch(r) => r.error_code = code,
        R::FindCoordinator(r) => r.error_code = code,
        R::JoinGroup(r) => r.error_code = code,
        R::Heartbeat(r) => r.error_code = code,
        R::LeaveGroup(r) => r.error_code = code,
        R::SyncGroup(r) => r.error_code = code,
        R::ListGroups(r) => r.error_code = code,
        R::SaslHandshake(r) => r.error_code = code,
        R::ApiVersions(r) => r.error_code = code,
        R::InitProducerId(r) => r.error_code = code,
        R::AddPartitionsToTxn(r) => r.error_code = code,
        R::AddOffsetsToTxn(r) => r.error_code = code,
        R::EndTxn(r) => r.error_code = code,
        R::DescribeAcls(r) => r.error_code = code,
        R::DescribeLogDirs(r) => r.error_code = code,
        R::SaslAuthenticate(r) => r.error_code = code,
        R::CreateDelegationToken(r) => r.error_code = code,
        R::RenewDelegationToken(r) => r.error_code = code,
        R::ExpireDelegationToken(r) => r.error_code = code,
        R::DescribeDelegationToken(r) => r.error_code = code,
        R::ElectLeaders(r) => r.error_code = code,
        R::AlterPartitionReassignments(r) => r.error_code = code,
        R::ListPartitionReassignments(r) => r.error_code = code,
        R::OffsetDelete(r) => r.error_code = code,
        R::DescribeClientQuotas(r) => r.error_code = code,
        R::DescribeUserScramCredentials(r) => r.error_code = code,
        R::Vote(r) => r.error_code = code,
        R::BeginQuorumEpoch(r) => r.error_code = code,
        R::EndQuorumEpoch(r) => r.error_code = code,
        R::DescribeQuorum(r) => r.error_code = code,
        R::AlterPartition(r) => r.error_code = code,
        R::UpdateFeatures(r) => r.error_code = code,
        R::Envelope(r) => r.error_code = code,
        R::FetchSnapshot(r) => r.error_code = code,
        R::DescribeCluster(r) => r.error_code = code,
        R::BrokerRegistration(r) => r.error_code = code,
        R::BrokerHeartbeat(r) => r.error_code = code,
        R::UnregisterBroker(r) => r.error_code = code,
        R::ListTransactions(r) => r.error_code = code,
        R::AllocateProducerIds(r) => r.error_code = code,
        R::ConsumerGroupHeartbeat(r) => r.error_code = code,
        R::ControllerRegistration(r) => r.error_code = code,
        R::GetTelemetrySubscriptions(r) => r.error_code = code,
        R::PushTelemetry(r) => r.error_code = code,
        R::AssignReplicasToDirs(r) => r.error_code = code,
        R::ListConfigResources(r) => r.error_code = code,
        R::ShareGroupHeartbeat(r) => r.error_code = code,
        R::ShareFetch(r) => r.error_code = code,
        R::ShareAcknowledge(r) => r.error_code = code,
        R::AddRaftVoter(r) => r.error_code = code,
        R::RemoveRaftVoter(r) => r.error_code = code,
        R::UpdateRaftVoter(r) => r.error_code = code,
        R::AlterShareGroupOffsets(r) => r.error_code = code,
        R::DeleteShareGroupOffsets(r) => r.error_code = code,
        _ => return false,
    }
    true
}

/// Adds to `resp` an entry with TOPIC_AUTHORIZATION_FAILED for every item of `req` (the request
/// as the client sent it) whose topic `denied` says was removed. False for the APIs whose
/// responses carry no per-topic error (their denied topics are only removed).
pub fn add_denied(resp: &mut R, req: &Q, denied: &dyn Fn(Option<&str>) -> bool) -> bool {
    let code = TOPIC_AUTHORIZATION_FAILED;
    let d = |n: &TopicName| denied(Some(if tn(n).is_empty() { UNNAMED } else { tn(n) }));
    match (resp, req) {
        (R::Produce(r), Q::Produce(q)) => {
            use produce_response::{PartitionProduceResponse, TopicProduceResponse};
            for t in q.topic_data.iter().filter(|t| d(&t.name)) {
                let mut tr = TopicProduceResponse::default().with_name(t.name.clone()).with_topic_id(t.topic_id);
                for p in &t.partition_data {
                    tr.partition_responses.push(
                        PartitionProduceResponse::default()
                            .with_index(p.index)
                            .with_error_code(code)
                            .with_base_offset(-1)
                            .with_log_append_time_ms(-1)
                            .with_log_start_offset(-1),
                    );
                }
                r.responses.push(tr);
            }
        }
        (R::Fetch(r), Q::Fetch(q)) => {
            use fetch_response::{FetchableTopicResponse, PartitionData};
            for t in q.topics.iter().filter(|t| d(&t.topic)) {
                let mut tr = FetchableTopicResponse::default().with_topic(t.topic.clone()).with_topic_id(t.topic_id);
                for p in &t.partitions {
                    tr.partitions.push(
                        PartitionData::default()
                            .with_partition_index(p.partition)
                            .with_error_code(code)
                            .with_high_watermark(-1)
                            .with_last_stable_offset(-1)
                            .with_log_start_offset(-1),
                    );
                }
                r.responses.push(tr);
            }
        }
        (R::ListOffsets(r), Q::ListOffsets(q)) => {
            use list_offsets_response::{ListOffsetsPartitionResponse, ListOffsetsTopicResponse};
            for t in q.topics.iter().filter(|t| d(&t.name)) {
                let mut tr = ListOffsetsTopicResponse::default().with_name(t.name.clone());
                for p in &t.partitions {
                    tr.partitions.push(
                        ListOffsetsPartitionResponse::default()
                            .with_partition_index(p.partition_index)
                            .with_error_code(code)
                            .with_offset(-1)
                            .with_timestamp(-1),
                    );
                }
                r.topics.push(tr);
            }
        }
        (R::Metadata(r), Q::Metadata(q)) => {
            use metadata_response::MetadataResponseTopic;
            for t in q.topics.iter().flatten() {
                let name = t.name.as_ref().map(tn).unwrap_or(UNNAMED);
                if denied(Some(name)) {
                    r.topics.push(
                        MetadataResponseTopic::default()
                            .with_error_code(code)
                            .with_name(t.name.clone())
                            .with_topic_id(t.topic_id),
                    );
                }
            }
        }
        (R::OffsetCommit(r), Q::OffsetCommit(q)) => {
            use offset_commit_response::{OffsetCommitResponsePartition, OffsetCommitResponseTopic};
            for t in q.topics.iter().filter(|t| d(&t.name)) {
                let mut tr = OffsetCommitResponseTopic::default().with_name(t.name.clone());
                for p in &t.partitions {
                    tr.partitions.push(
                        OffsetCommitResponsePartition::default()
                            .with_partition_index(p.partition_index)
                            .with_error_code(code),
                    );
                }
                r.topics.push(tr);
            }
        }
        (R::OffsetFetch(r), Q::OffsetFetch(q)) => {
            use offset_fetch_response::*;
            for t in q.topics.iter().flatten().filter(|t| d(&t.name)) {
                let mut tr = OffsetFetchResponseTopic::default().with_name(t.name.clone());
                for p in &t.partition_indexes {
                    tr.partitions.push(
                        OffsetFetchResponsePartition::default()
                            .with_partition_index(*p)
                            .with_committed_offset(-1)
                            .with_error_code(code),
                    );
                }
                r.topics.push(tr);
            }
            for g in &q.groups {
                let mut topics = Vec::new();
                for t in g.topics.iter().flatten().filter(|t| d(&t.name)) {
                    let mut tr =
                        OffsetFetchResponseTopics::default().with_name(t.name.clone()).with_topic_id(t.topic_id);
                    for p in &t.partition_indexes {
                        tr.partitions.push(
                            OffsetFetchResponsePartitions::default()
                                .with_partition_index(*p)
                                .with_committed_offset(-1)
                                .with_error_code(code),
                        );
                    }
                    topics.push(tr);
                }
                if topics.is_empty() {
                    continue;
                }
                match r.groups.iter_mut().find(|rg| rg.group_id == g.group_id) {
                    Some(rg) => rg.topics.extend(topics),
                    None => r.groups.push(
                        OffsetFetchResponseGroup::default().with_group_id(g.group_id.clone()).with_topics(topics),
                    ),
                }
            }
        }
        (R::OffsetDelete(r), Q::OffsetDelete(q)) => {
            use offset_delete_response::{OffsetDeleteResponsePartition, OffsetDeleteResponseTopic};
            for t in q.topics.iter().filter(|t| d(&t.name)) {
                let mut tr = OffsetDeleteResponseTopic::default().with_name(t.name.clone());
                for p in &t.partitions {
                    tr.partitions.push(
                        OffsetDeleteResponsePartition::default()
                            .with_partition_index(p.partition_index)
                            .with_error_code(code),
                    );
                }
                r.topics.push(tr);
            }
        }
        (R::TxnOffsetCommit(r), Q::TxnOffsetCommit(q)) => {
            use txn_offset_commit_response::{TxnOffsetCommitResponsePartition, TxnOffsetCommitResponseTopic};
            for t in q.topics.iter().filter(|t| d(&t.name)) {
                let mut tr = TxnOffsetCommitResponseTopic::default().with_name(t.name.clone());
                for p in &t.partitions {
                    tr.partitions.push(
                        TxnOffsetCommitResponsePartition::default()
                            .with_partition_index(p.partition_index)
                            .with_error_code(code),
                    );
                }
                r.topics.push(tr);
            }
        }
        (R::AddPartitionsToTxn(r), Q::AddPartitionsToTxn(q)) => {
            use add_partitions_to_txn_response::*;
            let results = |topics: &[add_partitions_to_txn_request::AddPartitionsToTxnTopic]| {
                let mut out = Vec::new();
                for t in topics.iter().filter(|t| d(&t.name)) {
                    let mut tr = AddPartitionsToTxnTopicResult::default().with_name(t.name.clone());
                    for p in &t.partitions {
                        tr.results_by_partition.push(
                            AddPartitionsToTxnPartitionResult::default()
                                .with_partition_index(*p)
                                .with_partition_error_code(code),
                        );
                    }
                    out.push(tr);
                }
                out
            };
            r.results_by_topic_v3_and_below.extend(results(&q.v3_and_below_topics));
            for t in &q.transactions {
                let topics = results(&t.topics);
                if topics.is_empty() {
                    continue;
                }
                match r.results_by_transaction.iter_mut().find(|x| x.transactional_id == t.transactional_id) {
                    Some(x) => x.topic_results.extend(topics),
                    None => r.results_by_transaction.push(
                        AddPartitionsToTxnResult::default()
                            .with_transactional_id(t.transactional_id.clone())
                            .with_topic_results(topics),
                    ),
                }
            }
        }
        (R::CreateTopics(r), Q::CreateTopics(q)) => {
            use create_topics_response::CreatableTopicResult;
            for t in q.topics.iter().filter(|t| d(&t.name)) {
                r.topics.push(
                    CreatableTopicResult::default()
                        .with_name(t.name.clone())
                        .with_error_code(code)
                        .with_error_message(Some(denied_message()))
                        .with_num_partitions(-1)
                        .with_replication_factor(-1),
                );
            }
        }
        (R::DeleteTopics(r), Q::DeleteTopics(q)) => {
            use delete_topics_response::DeletableTopicResult;
            for n in q.topic_names.iter().filter(|n| d(n)) {
                r.responses.push(
                    DeletableTopicResult::default()
                        .with_name(Some(n.clone()))
                        .with_error_code(code)
                        .with_error_message(Some(denied_message())),
                );
            }
            for t in &q.topics {
                let name = t.name.as_ref().map(tn).filter(|s| !s.is_empty()).unwrap_or(UNNAMED);
                if denied(Some(name)) {
                    r.responses.push(
                        DeletableTopicResult::default()
                            .with_name(t.name.clone())
                            .with_topic_id(t.topic_id)
                            .with_error_code(code)
                            .with_error_message(Some(denied_message())),
                    );
                }
            }
        }
        (R::CreatePartitions(r), Q::CreatePartitions(q)) => {
            use create_partitions_response::CreatePartitionsTopicResult;
            for t in q.topics.iter().filter(|t| d(&t.name)) {
                r.results.push(
                    CreatePartitionsTopicResult::default()
                        .with_name(t.name.clone())
                        .with_error_code(code)
                        .with_error_message(Some(denied_message())),
                );
            }
        }
        (R::DeleteRecords(r), Q::DeleteRecords(q)) => {
            use delete_records_response::{DeleteRecordsPartitionResult, DeleteRecordsTopicResult};
            for t in q.topics.iter().filter(|t| d(&t.name)) {
                let mut tr = DeleteRecordsTopicResult::default().with_name(t.name.clone());
                for p in &t.partitions {
                    tr.partitions.push(
                        DeleteRecordsPartitionResult::default()
                            .with_partition_index(p.partition_index)
                            .with_low_watermark(-1)
                            .with_error_code(code),
                    );
                }
                r.topics.push(tr);
            }
        }
        (R::DescribeConfigs(r), Q::DescribeConfigs(q)) => {
            use describe_configs_response::DescribeConfigsResult;
            for x in q.resources.iter().filter(|x| denied(resource(x.resource_type, &x.resource_name))) {
                r.results.push(
                    DescribeConfigsResult::default()
                        .with_error_code(resource_code(x.resource_type))
                        .with_error_message(Some(denied_message()))
                        .with_resource_type(x.resource_type)
                        .with_resource_name(x.resource_name.clone()),
                );
            }
        }
        (R::AlterConfigs(r), Q::AlterConfigs(q)) => {
            use alter_configs_response::AlterConfigsResourceResponse;
            for x in q.resources.iter().filter(|x| denied(resource(x.resource_type, &x.resource_name))) {
                r.responses.push(
                    AlterConfigsResourceResponse::default()
                        .with_error_code(resource_code(x.resource_type))
                        .with_error_message(Some(denied_message()))
                        .with_resource_type(x.resource_type)
                        .with_resource_name(x.resource_name.clone()),
                );
            }
        }
        (R::IncrementalAlterConfigs(r), Q::IncrementalAlterConfigs(q)) => {
            use incremental_alter_configs_response::AlterConfigsResourceResponse;
            for x in q.resources.iter().filter(|x| denied(resource(x.resource_type, &x.resource_name))) {
                r.responses.push(
                    AlterConfigsResourceResponse::default()
                        .with_error_code(resource_code(x.resource_type))
                        .with_error_message(Some(denied_message()))
                        .with_resource_type(x.resource_type)
                        .with_resource_name(x.resource_name.clone()),
                );
            }
        }
        (R::ElectLeaders(r), Q::ElectLeaders(q)) => {
            use elect_leaders_response::{PartitionResult, ReplicaElectionResult};
            for t in q.topic_partitions.iter().flatten().filter(|t| d(&t.topic)) {
                let mut tr = ReplicaElectionResult::default().with_topic(t.topic.clone());
                for p in &t.partitions {
                    tr.partition_result.push(
                        PartitionResult::default()
                            .with_partition_id(*p)
                            .with_error_code(code)
                            .with_error_message(Some(denied_message())),
                    );
                }
                r.replica_election_results.push(tr);
            }
        }
        (R::AlterPartitionReassignments(r), Q::AlterPartitionReassignments(q)) => {
            use alter_partition_reassignments_response::{ReassignablePartitionResponse, ReassignableTopicResponse};
            for t in q.topics.iter().filter(|t| d(&t.name)) {
                let mut tr = ReassignableTopicResponse::default().with_name(t.name.clone());
                for p in &t.partitions {
                    tr.partitions.push(
                        ReassignablePartitionResponse::default()
                            .with_partition_index(p.partition_index)
                            .with_error_code(code)
                            .with_error_message(Some(denied_message())),
                    );
                }
                r.responses.push(tr);
            }
        }
        (R::DescribeProducers(r), Q::DescribeProducers(q)) => {
            use describe_producers_response::{PartitionResponse, TopicResponse};
            for t in q.topics.iter().filter(|t| d(&t.name)) {
                let mut tr = TopicResponse::default().with_name(t.name.clone());
                for p in &t.partition_indexes {
                    tr.partitions.push(
                        PartitionResponse::default()
                            .with_partition_index(*p)
                            .with_error_code(code)
                            .with_error_message(Some(denied_message())),
                    );
                }
                r.topics.push(tr);
            }
        }
        (R::OffsetForLeaderEpoch(r), Q::OffsetForLeaderEpoch(q)) => {
            use offset_for_leader_epoch_response::{EpochEndOffset, OffsetForLeaderTopicResult};
            for t in q.topics.iter().filter(|t| d(&t.topic)) {
                let mut tr = OffsetForLeaderTopicResult::default().with_topic(t.topic.clone());
                for p in &t.partitions {
                    tr.partitions.push(
                        EpochEndOffset::default()
                            .with_partition(p.partition)
                            .with_error_code(code)
                            .with_leader_epoch(-1)
                            .with_end_offset(-1),
                    );
                }
                r.topics.push(tr);
            }
        }
        (R::DescribeTopicPartitions(r), Q::DescribeTopicPartitions(q)) => {
            use describe_topic_partitions_response::DescribeTopicPartitionsResponseTopic;
            for t in q.topics.iter().filter(|t| d(&t.name)) {
                r.topics.push(
                    DescribeTopicPartitionsResponseTopic::default()
                        .with_error_code(code)
                        .with_name(Some(t.name.clone())),
                );
            }
        }
        (R::AlterReplicaLogDirs(r), Q::AlterReplicaLogDirs(q)) => {
            use alter_replica_log_dirs_response::{AlterReplicaLogDirPartitionResult, AlterReplicaLogDirTopicResult};
            for t in q.dirs.iter().flat_map(|x| &x.topics).filter(|t| d(&t.name)) {
                let mut tr = AlterReplicaLogDirTopicResult::default().with_topic_name(t.name.clone());
                for p in &t.partitions {
                    tr.partitions.push(
                        AlterReplicaLogDirPartitionResult::default().with_partition_index(*p).with_error_code(code),
                    );
                }
                r.results.push(tr);
            }
        }
        (R::WriteTxnMarkers(r), Q::WriteTxnMarkers(q)) => {
            use write_txn_markers_response::*;
            for m in &q.markers {
                let mut topics = Vec::new();
                for t in m.topics.iter().filter(|t| d(&t.name)) {
                    let mut tr = WritableTxnMarkerTopicResult::default().with_name(t.name.clone());
                    for p in &t.partition_indexes {
                        tr.partitions.push(
                            WritableTxnMarkerPartitionResult::default().with_partition_index(*p).with_error_code(code),
                        );
                    }
                    topics.push(tr);
                }
                if topics.is_empty() {
                    continue;
                }
                match r.markers.iter_mut().find(|x| x.producer_id == m.producer_id) {
                    Some(x) => x.topics.extend(topics),
                    None => r
                        .markers
                        .push(WritableTxnMarkerResult::default().with_producer_id(m.producer_id).with_topics(topics)),
                }
            }
        }
        _ => return false,
    }
    true
}

fn resource_code(kind: i8) -> i16 {
    if kind == TOPIC_RESOURCE {
        TOPIC_AUTHORIZATION_FAILED
    } else {
        CLUSTER_AUTHORIZATION_FAILED
    }
}

fn denied_message() -> StrBytes {
    StrBytes::from_static_str("denied by l7mesh policy")
}

/// The authorization error for a request denied as a whole: the group's, the transactional
/// id's, the topic's (requests standing for unnamed topics) or the cluster's.
pub fn whole_denial_code(req: &Q, judged: Judged) -> i16 {
    if matches!(judged, Judged::Whole { .. }) {
        return TOPIC_AUTHORIZATION_FAILED;
    }
    match req {
        Q::OffsetCommit(_)
        | Q::OffsetFetch(_)
        | Q::OffsetDelete(_)
        | Q::JoinGroup(_)
        | Q::Heartbeat(_)
        | Q::LeaveGroup(_)
        | Q::SyncGroup(_)
        | Q::DescribeGroups(_)
        | Q::DeleteGroups(_)
        | Q::ConsumerGroupHeartbeat(_)
        | Q::ConsumerGroupDescribe(_)
        | Q::ShareGroupHeartbeat(_)
        | Q::ShareGroupDescribe(_)
        | Q::DescribeShareGroupOffsets(_)
        | Q::AlterShareGroupOffsets(_)
        | Q::DeleteShareGroupOffsets(_) => GROUP_AUTHORIZATION_FAILED,
        Q::AddOffsetsToTxn(_)
        | Q::EndTxn(_)
        | Q::TxnOffsetCommit(_)
        | Q::AddPartitionsToTxn(_)
        | Q::DescribeTransactions(_) => TRANSACTIONAL_ID_AUTHORIZATION_FAILED,
        Q::InitProducerId(r) if r.transactional_id.is_some() => TRANSACTIONAL_ID_AUTHORIZATION_FAILED,
        Q::FindCoordinator(r) if r.key_type == 1 => TRANSACTIONAL_ID_AUTHORIZATION_FAILED,
        Q::FindCoordinator(_) => GROUP_AUTHORIZATION_FAILED,
        _ => CLUSTER_AUTHORIZATION_FAILED,
    }
}

/// Per-item answers for the response types that carry their errors per group, per ACL, per
/// entity (no top-level error code).
fn fill_items(resp: &mut R, req: &Q, version: i16, code: i16) {
    match (resp, req) {
        (R::DescribeGroups(r), Q::DescribeGroups(q)) => {
            for g in &q.groups {
                r.groups.push(
                    describe_groups_response::DescribedGroup::default()
                        .with_group_id(g.clone())
                        .with_error_code(code)
                        .with_authorized_operations(i32::MIN),
                );
            }
        }
        (R::DeleteGroups(r), Q::DeleteGroups(q)) => {
            for g in &q.groups_names {
                r.results.push(
                    delete_groups_response::DeletableGroupResult::default()
                        .with_group_id(g.clone())
                        .with_error_code(code),
                );
            }
        }
        (R::ConsumerGroupDescribe(r), Q::ConsumerGroupDescribe(q)) => {
            for g in &q.group_ids {
                r.groups.push(
                    consumer_group_describe_response::DescribedGroup::default()
                        .with_group_id(g.clone())
                        .with_error_code(code)
                        .with_error_message(Some(denied_message())),
                );
            }
        }
        (R::ShareGroupDescribe(r), Q::ShareGroupDescribe(q)) => {
            for g in &q.group_ids {
                r.groups.push(
                    share_group_describe_response::DescribedGroup::default()
                        .with_group_id(g.clone())
                        .with_error_code(code)
                        .with_error_message(Some(denied_message())),
                );
            }
        }
        (R::CreateAcls(r), Q::CreateAcls(q)) => {
            for _ in &q.creations {
                r.results.push(
                    create_acls_response::AclCreationResult::default()
                        .with_error_code(code)
                        .with_error_message(Some(denied_message())),
                );
            }
        }
        (R::DeleteAcls(r), Q::DeleteAcls(q)) => {
            for _ in &q.filters {
                r.filter_results.push(
                    delete_acls_response::DeleteAclsFilterResult::default()
                        .with_error_code(code)
                        .with_error_message(Some(denied_message())),
                );
            }
        }
        (R::DescribeTransactions(r), Q::DescribeTransactions(q)) => {
            for t in &q.transactional_ids {
                r.transaction_states.push(
                    describe_transactions_response::TransactionState::default()
                        .with_transactional_id(t.clone())
                        .with_error_code(code)
                        .with_producer_id(ProducerId(-1))
                        .with_producer_epoch(-1),
                );
            }
        }
        (R::AlterUserScramCredentials(r), Q::AlterUserScramCredentials(q)) => {
            let users = q.deletions.iter().map(|x| &x.name).chain(q.upsertions.iter().map(|x| &x.name));
            for u in users {
                r.results.push(
                    alter_user_scram_credentials_response::AlterUserScramCredentialsResult::default()
                        .with_user(u.clone())
                        .with_error_code(code)
                        .with_error_message(Some(denied_message())),
                );
            }
        }
        (R::AlterClientQuotas(r), Q::AlterClientQuotas(q)) => {
            use alter_client_quotas_response::{EntityData, EntryData};
            for e in &q.entries {
                let entity = e
                    .entity
                    .iter()
                    .map(|x| {
                        EntityData::default()
                            .with_entity_type(x.entity_type.clone())
                            .with_entity_name(x.entity_name.clone())
                    })
                    .collect();
                r.entries.push(
                    EntryData::default()
                        .with_error_code(code)
                        .with_error_message(Some(denied_message()))
                        .with_entity(entity),
                );
            }
        }
        (R::OffsetFetch(r), Q::OffsetFetch(q)) => {
            for g in &q.groups {
                r.groups.push(
                    offset_fetch_response::OffsetFetchResponseGroup::default()
                        .with_group_id(g.group_id.clone())
                        .with_error_code(code),
                );
            }
        }
        (R::FindCoordinator(r), Q::FindCoordinator(q)) => {
            for key in &q.coordinator_keys {
                r.coordinators.push(
                    find_coordinator_response::Coordinator::default()
                        .with_key(key.clone())
                        .with_node_id(BrokerId(-1))
                        .with_port(-1)
                        .with_error_code(code)
                        .with_error_message(Some(denied_message())),
                );
            }
            if version < 4 {
                r.node_id = BrokerId(-1);
                r.port = -1;
            }
        }
        (R::InitProducerId(r), _) => {
            r.producer_id = ProducerId(-1);
            r.producer_epoch = -1;
        }
        (R::JoinGroup(r), _) => r.generation_id = -1,
        _ => {}
    }
}

/// The response to a request denied as a whole: its own type, with `code` in its top-level
/// error field where the version has one, per item (group, ACL, topic...) where it has not.
pub fn whole_denial(api_key: ApiKey, version: i16, req: &Q, code: i16) -> Result<BytesMut, String> {
    let mut resp = empty_response(api_key);
    fill_items(&mut resp, req, version, code);
    let mut with_error = resp.clone();
    if set_error(&mut with_error, code) {
        if let Ok(b) = encode(&with_error, version) {
            return Ok(b);
        }
    }
    // This version has no top-level error field: the per-topic entries carry it.
    add_denied(&mut resp, req, &|_| true);
    if code != TOPIC_AUTHORIZATION_FAILED {
        set_topic_codes(&mut resp, code);
    }
    encode(&resp, version)
}

/// Per-topic entries of a whole denial carry the request's own code (a group's, say).
fn set_topic_codes(resp: &mut R, code: i16) {
    match resp {
        R::OffsetFetch(r) => r.topics.iter_mut().flat_map(|t| &mut t.partitions).for_each(|p| p.error_code = code),
        R::OffsetCommit(r) => r.topics.iter_mut().flat_map(|t| &mut t.partitions).for_each(|p| p.error_code = code),
        R::TxnOffsetCommit(r) => r.topics.iter_mut().flat_map(|t| &mut t.partitions).for_each(|p| p.error_code = code),
        R::AddPartitionsToTxn(r) => r
            .results_by_topic_v3_and_below
            .iter_mut()
            .flat_map(|t| &mut t.results_by_partition)
            .for_each(|p| p.partition_error_code = code),
        _ => {}
    }
}

/// The response to a request whose every topic was denied: the request's own type with an
/// entry per topic, or the top-level error where the type has no per-topic error.
pub fn all_topics_denied(api_key: ApiKey, version: i16, req: &Q) -> Result<BytesMut, String> {
    let mut resp = empty_response(api_key);
    if !add_denied(&mut resp, req, &|_| true) {
        return whole_denial(api_key, version, req, TOPIC_AUTHORIZATION_FAILED);
    }
    encode(&resp, version)
}

pub fn encode(resp: &R, version: i16) -> Result<BytesMut, String> {
    let mut buf = BytesMut::new();
    resp.encode(&mut buf, version).map_err(|e| e.to_string())?;
    Ok(buf)
}

/// A request with topics removed, encoded for the broker: only if it decodes back to exactly
/// what was judged. The codec does not round-trip every input it accepts (fuzzing found
/// DescribeConfigs v4 requests whose re-encoding no longer decodes), and the broker must act on
/// what the rules saw, so such a request is refused, never forwarded as bytes nobody judged.
pub fn reencode(api_key: ApiKey, version: i16, req: &Q) -> Result<BytesMut, String> {
    let mut buf = BytesMut::new();
    req.encode(&mut buf, version).map_err(|e| e.to_string())?;
    match Q::decode(api_key, &mut buf.clone().freeze(), version) {
        Ok(back) if &back == req => Ok(buf),
        Ok(_) => Err(format!("{api_key:?} v{version}: the rewritten request does not encode as judged")),
        Err(e) => Err(format!("{api_key:?} v{version}: the rewritten request does not decode: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn topic(s: &str) -> TopicName {
        TopicName(StrBytes::from_string(s.to_string()))
    }

    fn empty_request(api_key: ApiKey) -> Q {
        match api_key {
            ApiKey::Produce => Q::Produce(ProduceRequest::default()),
            ApiKey::Fetch => Q::Fetch(FetchRequest::default()),
            ApiKey::ListOffsets => Q::ListOffsets(ListOffsetsRequest::default()),
            ApiKey::Metadata => Q::Metadata(MetadataRequest::default()),
            ApiKey::OffsetCommit => Q::OffsetCommit(OffsetCommitRequest::default()),
            ApiKey::OffsetFetch => Q::OffsetFetch(OffsetFetchRequest::default()),
            ApiKey::FindCoordinator => Q::FindCoordinator(FindCoordinatorRequest::default()),
            ApiKey::JoinGroup => Q::JoinGroup(JoinGroupRequest::default()),
            ApiKey::Heartbeat => Q::Heartbeat(HeartbeatRequest::default()),
            ApiKey::LeaveGroup => Q::LeaveGroup(LeaveGroupRequest::default()),
            ApiKey::SyncGroup => Q::SyncGroup(SyncGroupRequest::default()),
            ApiKey::DescribeGroups => Q::DescribeGroups(DescribeGroupsRequest::default()),
            ApiKey::ListGroups => Q::ListGroups(ListGroupsRequest::default()),
            ApiKey::SaslHandshake => Q::SaslHandshake(SaslHandshakeRequest::default()),
            ApiKey::ApiVersions => Q::ApiVersions(ApiVersionsRequest::default()),
            ApiKey::CreateTopics => Q::CreateTopics(CreateTopicsRequest::default()),
            ApiKey::DeleteTopics => Q::DeleteTopics(DeleteTopicsRequest::default()),
            ApiKey::DeleteRecords => Q::DeleteRecords(DeleteRecordsRequest::default()),
            ApiKey::InitProducerId => Q::InitProducerId(InitProducerIdRequest::default()),
            ApiKey::OffsetForLeaderEpoch => Q::OffsetForLeaderEpoch(OffsetForLeaderEpochRequest::default()),
            ApiKey::AddPartitionsToTxn => Q::AddPartitionsToTxn(AddPartitionsToTxnRequest::default()),
            ApiKey::AddOffsetsToTxn => Q::AddOffsetsToTxn(AddOffsetsToTxnRequest::default()),
            ApiKey::EndTxn => Q::EndTxn(EndTxnRequest::default()),
            ApiKey::WriteTxnMarkers => Q::WriteTxnMarkers(WriteTxnMarkersRequest::default()),
            ApiKey::TxnOffsetCommit => Q::TxnOffsetCommit(TxnOffsetCommitRequest::default()),
            ApiKey::DescribeAcls => Q::DescribeAcls(DescribeAclsRequest::default()),
            ApiKey::CreateAcls => Q::CreateAcls(CreateAclsRequest::default()),
            ApiKey::DeleteAcls => Q::DeleteAcls(DeleteAclsRequest::default()),
            ApiKey::DescribeConfigs => Q::DescribeConfigs(DescribeConfigsRequest::default()),
            ApiKey::AlterConfigs => Q::AlterConfigs(AlterConfigsRequest::default()),
            ApiKey::AlterReplicaLogDirs => Q::AlterReplicaLogDirs(AlterReplicaLogDirsRequest::default()),
            ApiKey::DescribeLogDirs => Q::DescribeLogDirs(DescribeLogDirsRequest::default()),
            ApiKey::SaslAuthenticate => Q::SaslAuthenticate(SaslAuthenticateRequest::default()),
            ApiKey::CreatePartitions => Q::CreatePartitions(CreatePartitionsRequest::default()),
            ApiKey::CreateDelegationToken => Q::CreateDelegationToken(CreateDelegationTokenRequest::default()),
            ApiKey::RenewDelegationToken => Q::RenewDelegationToken(RenewDelegationTokenRequest::default()),
            ApiKey::ExpireDelegationToken => Q::ExpireDelegationToken(ExpireDelegationTokenRequest::default()),
            ApiKey::DescribeDelegationToken => Q::DescribeDelegationToken(DescribeDelegationTokenRequest::default()),
            ApiKey::DeleteGroups => Q::DeleteGroups(DeleteGroupsRequest::default()),
            ApiKey::ElectLeaders => Q::ElectLeaders(ElectLeadersRequest::default()),
            ApiKey::IncrementalAlterConfigs => Q::IncrementalAlterConfigs(IncrementalAlterConfigsRequest::default()),
            ApiKey::AlterPartitionReassignments => {
                Q::AlterPartitionReassignments(AlterPartitionReassignmentsRequest::default())
            }
            ApiKey::ListPartitionReassignments => {
                Q::ListPartitionReassignments(ListPartitionReassignmentsRequest::default())
            }
            ApiKey::OffsetDelete => Q::OffsetDelete(OffsetDeleteRequest::default()),
            ApiKey::DescribeClientQuotas => Q::DescribeClientQuotas(DescribeClientQuotasRequest::default()),
            ApiKey::AlterClientQuotas => Q::AlterClientQuotas(AlterClientQuotasRequest::default()),
            ApiKey::DescribeUserScramCredentials => {
                Q::DescribeUserScramCredentials(DescribeUserScramCredentialsRequest::default())
            }
            ApiKey::AlterUserScramCredentials => {
                Q::AlterUserScramCredentials(AlterUserScramCredentialsRequest::default())
            }
            ApiKey::Vote => Q::Vote(VoteRequest::default()),
            ApiKey::BeginQuorumEpoch => Q::BeginQuorumEpoch(BeginQuorumEpochRequest::default()),
            ApiKey::EndQuorumEpoch => Q::EndQuorumEpoch(EndQuorumEpochRequest::default()),
            ApiKey::DescribeQuorum => Q::DescribeQuorum(DescribeQuorumRequest::default()),
            ApiKey::AlterPartition => Q::AlterPartition(AlterPartitionRequest::default()),
            ApiKey::UpdateFeatures => Q::UpdateFeatures(UpdateFeaturesRequest::default()),
            ApiKey::Envelope => Q::Envelope(EnvelopeRequest::default()),
            ApiKey::FetchSnapshot => Q::FetchSnapshot(FetchSnapshotRequest::default()),
            ApiKey::DescribeCluster => Q::DescribeCluster(DescribeClusterRequest::default()),
            ApiKey::DescribeProducers => Q::DescribeProducers(DescribeProducersRequest::default()),
            ApiKey::BrokerRegistration => Q::BrokerRegistration(BrokerRegistrationRequest::default()),
            ApiKey::BrokerHeartbeat => Q::BrokerHeartbeat(BrokerHeartbeatRequest::default()),
            ApiKey::UnregisterBroker => Q::UnregisterBroker(UnregisterBrokerRequest::default()),
            ApiKey::DescribeTransactions => Q::DescribeTransactions(DescribeTransactionsRequest::default()),
            ApiKey::ListTransactions => Q::ListTransactions(ListTransactionsRequest::default()),
            ApiKey::AllocateProducerIds => Q::AllocateProducerIds(AllocateProducerIdsRequest::default()),
            ApiKey::ConsumerGroupHeartbeat => Q::ConsumerGroupHeartbeat(ConsumerGroupHeartbeatRequest::default()),
            ApiKey::ConsumerGroupDescribe => Q::ConsumerGroupDescribe(ConsumerGroupDescribeRequest::default()),
            ApiKey::ControllerRegistration => Q::ControllerRegistration(ControllerRegistrationRequest::default()),
            ApiKey::GetTelemetrySubscriptions => {
                Q::GetTelemetrySubscriptions(GetTelemetrySubscriptionsRequest::default())
            }
            ApiKey::PushTelemetry => Q::PushTelemetry(PushTelemetryRequest::default()),
            ApiKey::AssignReplicasToDirs => Q::AssignReplicasToDirs(AssignReplicasToDirsRequest::default()),
            ApiKey::ListConfigResources => Q::ListConfigResources(ListConfigResourcesRequest::default()),
            ApiKey::DescribeTopicPartitions => Q::DescribeTopicPartitions(DescribeTopicPartitionsRequest::default()),
            ApiKey::ShareGroupHeartbeat => Q::ShareGroupHeartbeat(ShareGroupHeartbeatRequest::default()),
            ApiKey::ShareGroupDescribe => Q::ShareGroupDescribe(ShareGroupDescribeRequest::default()),
            ApiKey::ShareFetch => Q::ShareFetch(ShareFetchRequest::default()),
            ApiKey::ShareAcknowledge => Q::ShareAcknowledge(ShareAcknowledgeRequest::default()),
            ApiKey::AddRaftVoter => Q::AddRaftVoter(AddRaftVoterRequest::default()),
            ApiKey::RemoveRaftVoter => Q::RemoveRaftVoter(RemoveRaftVoterRequest::default()),
            ApiKey::UpdateRaftVoter => Q::UpdateRaftVoter(UpdateRaftVoterRequest::default()),
            ApiKey::InitializeShareGroupState => {
                Q::InitializeShareGroupState(InitializeShareGroupStateRequest::default())
            }
            ApiKey::ReadShareGroupState => Q::ReadShareGroupState(ReadShareGroupStateRequest::default()),
            ApiKey::WriteShareGroupState => Q::WriteShareGroupState(WriteShareGroupStateRequest::default()),
            ApiKey::DeleteShareGroupState => Q::DeleteShareGroupState(DeleteShareGroupStateRequest::default()),
            ApiKey::ReadShareGroupStateSummary => {
                Q::ReadShareGroupStateSummary(ReadShareGroupStateSummaryRequest::default())
            }
            ApiKey::DescribeShareGroupOffsets => {
                Q::DescribeShareGroupOffsets(DescribeShareGroupOffsetsRequest::default())
            }
            ApiKey::AlterShareGroupOffsets => Q::AlterShareGroupOffsets(AlterShareGroupOffsetsRequest::default()),
            ApiKey::DeleteShareGroupOffsets => Q::DeleteShareGroupOffsets(DeleteShareGroupOffsetsRequest::default()),
        }
    }

    fn versions(api_key: ApiKey) -> std::ops::RangeInclusive<i16> {
        let v = api_key.valid_versions();
        v.min..=v.max
    }

    /// Encodes, decodes back, and says whether the response carries `code` somewhere.
    fn round_trip(api_key: ApiKey, version: i16, body: &BytesMut, code: i16) -> bool {
        let mut b = body.clone().freeze();
        let decoded = R::decode(api_key, &mut b, version)
            .unwrap_or_else(|e| panic!("{api_key:?} v{version}: denial does not decode: {e}"));
        assert!(b.is_empty(), "{api_key:?} v{version}: bytes left over");
        let text = format!("{decoded:?}");
        text.contains(&format!("error_code: {code}"))
    }

    /// Every API key, at every version the codec knows, has a denial of its own response type
    /// that decodes back; a request naming nothing still gets the error wherever its version
    /// has a field for it.
    #[test]
    fn every_api_key_at_every_version_has_a_denial() {
        let mut without_field = Vec::new();
        let mut count = 0;
        for api_key in ApiKey::iter() {
            let req = empty_request(api_key);
            for version in versions(api_key) {
                let code = whole_denial_code(&req, Judged::NoTopic);
                let body = whole_denial(api_key, version, &req, code)
                    .unwrap_or_else(|e| panic!("{api_key:?} v{version}: no denial: {e}"));
                count += 1;
                if !round_trip(api_key, version, &body, code) {
                    without_field.push(format!("{api_key:?}"));
                }
                let unnamed = whole_denial(api_key, version, &req, TOPIC_AUTHORIZATION_FAILED).unwrap();
                round_trip(api_key, version, &unnamed, TOPIC_AUTHORIZATION_FAILED);
                let all = all_topics_denied(api_key, version, &req).unwrap();
                round_trip(api_key, version, &all, TOPIC_AUTHORIZATION_FAILED);
            }
        }
        assert!(count > 280, "{count}");
        without_field.dedup();
        // The response types whose errors are per item only (per topic, group, ACL...): an empty
        // request has no item to carry the error. Each is answered per item in the tests below.
        let per_item = [
            "Produce",
            "Fetch",
            "ListOffsets",
            "Metadata",
            "OffsetCommit",
            "OffsetFetch",
            "FindCoordinator",
            "DescribeGroups",
            "CreateTopics",
            "DeleteTopics",
            "DeleteRecords",
            "OffsetForLeaderEpoch",
            "AddPartitionsToTxn",
            "WriteTxnMarkers",
            "TxnOffsetCommit",
            "CreateAcls",
            "DeleteAcls",
            "DescribeConfigs",
            "AlterConfigs",
            "AlterReplicaLogDirs",
            "DescribeLogDirs",
            "CreatePartitions",
            "DeleteGroups",
            "ElectLeaders",
            "IncrementalAlterConfigs",
            "AlterClientQuotas",
            "AlterUserScramCredentials",
            "DescribeProducers",
            "DescribeTransactions",
            "ConsumerGroupDescribe",
            "DescribeTopicPartitions",
            "ShareGroupDescribe",
            "InitializeShareGroupState",
            "ReadShareGroupState",
            "WriteShareGroupState",
            "DeleteShareGroupState",
            "ReadShareGroupStateSummary",
            "DescribeShareGroupOffsets",
        ];
        for name in &without_field {
            assert!(per_item.contains(&name.as_str()), "{name}: a denial without an error field");
        }
    }

    const NAMES: [&str; 3] = ["ok", "secret", "secret"];

    /// A request of each topic-bearing API naming `ok`, `secret` and `secret` again, as the
    /// client would send it at `version` (the fields that version carries).
    fn named_request(api_key: ApiKey, version: i16) -> Option<Q> {
        let names = || NAMES.iter().map(|n| topic(n));
        Some(match api_key {
            ApiKey::Produce => Q::Produce(
                ProduceRequest::default().with_acks(-1).with_topic_data(
                    names()
                        .map(|n| {
                            produce_request::TopicProduceData::default().with_name(n).with_partition_data(vec![
                                produce_request::PartitionProduceData::default().with_index(0),
                            ])
                        })
                        .collect(),
                ),
            ),
            ApiKey::Fetch => Q::Fetch(
                FetchRequest::default().with_topics(
                    names()
                        .map(|n| {
                            fetch_request::FetchTopic::default()
                                .with_topic(n)
                                .with_partitions(vec![fetch_request::FetchPartition::default().with_partition(0)])
                        })
                        .collect(),
                ),
            ),
            ApiKey::ListOffsets => Q::ListOffsets(
                ListOffsetsRequest::default().with_topics(
                    names()
                        .map(|n| {
                            list_offsets_request::ListOffsetsTopic::default().with_name(n).with_partitions(vec![
                                list_offsets_request::ListOffsetsPartition::default().with_partition_index(0),
                            ])
                        })
                        .collect(),
                ),
            ),
            ApiKey::OffsetCommit => Q::OffsetCommit(
                OffsetCommitRequest::default().with_topics(
                    names()
                        .map(|n| {
                            offset_commit_request::OffsetCommitRequestTopic::default()
                                .with_name(n)
                                .with_partitions(vec![offset_commit_request::OffsetCommitRequestPartition::default()])
                        })
                        .collect(),
                ),
            ),
            ApiKey::OffsetFetch if version < 8 => Q::OffsetFetch(
                OffsetFetchRequest::default().with_topics(Some(
                    names()
                        .map(|n| {
                            offset_fetch_request::OffsetFetchRequestTopic::default()
                                .with_name(n)
                                .with_partition_indexes(vec![0])
                        })
                        .collect(),
                )),
            ),
            ApiKey::OffsetFetch => Q::OffsetFetch(OffsetFetchRequest::default().with_groups(vec![
                    offset_fetch_request::OffsetFetchRequestGroup::default().with_topics(Some(
                        names()
                            .map(|n| {
                                offset_fetch_request::OffsetFetchRequestTopics::default()
                                    .with_name(n)
                                    .with_partition_indexes(vec![0])
                            })
                            .collect(),
                    )),
                ])),
            ApiKey::OffsetDelete => Q::OffsetDelete(
                OffsetDeleteRequest::default().with_topics(
                    names()
                        .map(|n| {
                            offset_delete_request::OffsetDeleteRequestTopic::default()
                                .with_name(n)
                                .with_partitions(vec![offset_delete_request::OffsetDeleteRequestPartition::default()])
                        })
                        .collect(),
                ),
            ),
            ApiKey::TxnOffsetCommit => Q::TxnOffsetCommit(
                TxnOffsetCommitRequest::default().with_topics(
                    names()
                        .map(|n| {
                            txn_offset_commit_request::TxnOffsetCommitRequestTopic::default()
                                .with_name(n)
                                .with_partitions(vec![
                                    txn_offset_commit_request::TxnOffsetCommitRequestPartition::default(),
                                ])
                        })
                        .collect(),
                ),
            ),
            ApiKey::AddPartitionsToTxn => {
                let topics: Vec<_> = names()
                    .map(|n| {
                        add_partitions_to_txn_request::AddPartitionsToTxnTopic::default()
                            .with_name(n)
                            .with_partitions(vec![0])
                    })
                    .collect();
                if version < 4 {
                    Q::AddPartitionsToTxn(AddPartitionsToTxnRequest::default().with_v3_and_below_topics(topics))
                } else {
                    Q::AddPartitionsToTxn(AddPartitionsToTxnRequest::default().with_transactions(vec![
                        add_partitions_to_txn_request::AddPartitionsToTxnTransaction::default().with_topics(topics),
                    ]))
                }
            }
            ApiKey::CreateTopics => {
                Q::CreateTopics(CreateTopicsRequest::default().with_topics(
                    names().map(|n| create_topics_request::CreatableTopic::default().with_name(n)).collect(),
                ))
            }
            ApiKey::DeleteTopics if version < 6 => {
                Q::DeleteTopics(DeleteTopicsRequest::default().with_topic_names(names().collect()))
            }
            ApiKey::DeleteTopics => Q::DeleteTopics(DeleteTopicsRequest::default().with_topics(
                names().map(|n| delete_topics_request::DeleteTopicState::default().with_name(Some(n))).collect(),
            )),
            ApiKey::CreatePartitions => Q::CreatePartitions(CreatePartitionsRequest::default().with_topics(
                names().map(|n| create_partitions_request::CreatePartitionsTopic::default().with_name(n)).collect(),
            )),
            ApiKey::DeleteRecords => Q::DeleteRecords(
                DeleteRecordsRequest::default().with_topics(
                    names()
                        .map(|n| {
                            delete_records_request::DeleteRecordsTopic::default()
                                .with_name(n)
                                .with_partitions(vec![delete_records_request::DeleteRecordsPartition::default()])
                        })
                        .collect(),
                ),
            ),
            ApiKey::DescribeConfigs => Q::DescribeConfigs(
                DescribeConfigsRequest::default().with_resources(
                    NAMES
                        .iter()
                        .map(|n| {
                            describe_configs_request::DescribeConfigsResource::default()
                                .with_resource_type(TOPIC_RESOURCE)
                                .with_resource_name(StrBytes::from_string(n.to_string()))
                        })
                        .collect(),
                ),
            ),
            ApiKey::AlterConfigs => Q::AlterConfigs(
                AlterConfigsRequest::default().with_resources(
                    NAMES
                        .iter()
                        .map(|n| {
                            alter_configs_request::AlterConfigsResource::default()
                                .with_resource_type(TOPIC_RESOURCE)
                                .with_resource_name(StrBytes::from_string(n.to_string()))
                        })
                        .collect(),
                ),
            ),
            ApiKey::IncrementalAlterConfigs => Q::IncrementalAlterConfigs(
                IncrementalAlterConfigsRequest::default().with_resources(
                    NAMES
                        .iter()
                        .map(|n| {
                            incremental_alter_configs_request::AlterConfigsResource::default()
                                .with_resource_type(TOPIC_RESOURCE)
                                .with_resource_name(StrBytes::from_string(n.to_string()))
                        })
                        .collect(),
                ),
            ),
            ApiKey::ElectLeaders => Q::ElectLeaders(
                ElectLeadersRequest::default().with_topic_partitions(Some(
                    names()
                        .map(|n| {
                            elect_leaders_request::TopicPartitions::default().with_topic(n).with_partitions(vec![0])
                        })
                        .collect(),
                )),
            ),
            ApiKey::AlterPartitionReassignments => Q::AlterPartitionReassignments(
                AlterPartitionReassignmentsRequest::default().with_topics(
                    names()
                        .map(|n| {
                            alter_partition_reassignments_request::ReassignableTopic::default()
                                .with_name(n)
                                .with_partitions(vec![
                                    alter_partition_reassignments_request::ReassignablePartition::default(),
                                ])
                        })
                        .collect(),
                ),
            ),
            ApiKey::ListPartitionReassignments => Q::ListPartitionReassignments(
                ListPartitionReassignmentsRequest::default().with_topics(Some(
                    names()
                        .map(|n| {
                            list_partition_reassignments_request::ListPartitionReassignmentsTopics::default()
                                .with_name(n)
                        })
                        .collect(),
                )),
            ),
            ApiKey::DescribeProducers => Q::DescribeProducers(
                DescribeProducersRequest::default().with_topics(
                    names()
                        .map(|n| {
                            describe_producers_request::TopicRequest::default()
                                .with_name(n)
                                .with_partition_indexes(vec![0])
                        })
                        .collect(),
                ),
            ),
            ApiKey::OffsetForLeaderEpoch => Q::OffsetForLeaderEpoch(
                OffsetForLeaderEpochRequest::default().with_topics(
                    names()
                        .map(|n| {
                            offset_for_leader_epoch_request::OffsetForLeaderTopic::default()
                                .with_topic(n)
                                .with_partitions(vec![
                                    offset_for_leader_epoch_request::OffsetForLeaderPartition::default(),
                                ])
                        })
                        .collect(),
                ),
            ),
            ApiKey::DescribeTopicPartitions => {
                Q::DescribeTopicPartitions(DescribeTopicPartitionsRequest::default().with_topics(
                    names().map(|n| describe_topic_partitions_request::TopicRequest::default().with_name(n)).collect(),
                ))
            }
            ApiKey::AlterReplicaLogDirs => {
                Q::AlterReplicaLogDirs(AlterReplicaLogDirsRequest::default().with_dirs(vec![
                    alter_replica_log_dirs_request::AlterReplicaLogDir::default().with_topics(
                        names()
                            .map(|n| {
                                alter_replica_log_dirs_request::AlterReplicaLogDirTopic::default()
                                    .with_name(n)
                                    .with_partitions(vec![0])
                            })
                            .collect(),
                    ),
                ]))
            }
            ApiKey::DescribeLogDirs => Q::DescribeLogDirs(
                DescribeLogDirsRequest::default().with_topics(Some(
                    names()
                        .map(|n| {
                            describe_log_dirs_request::DescribableLogDirTopic::default()
                                .with_topic(n)
                                .with_partitions(vec![0])
                        })
                        .collect(),
                )),
            ),
            ApiKey::WriteTxnMarkers => Q::WriteTxnMarkers(WriteTxnMarkersRequest::default().with_markers(vec![
                    write_txn_markers_request::WritableTxnMarker::default().with_topics(
                        names()
                            .map(|n| {
                                write_txn_markers_request::WritableTxnMarkerTopic::default()
                                    .with_name(n)
                                    .with_partition_indexes(vec![0])
                            })
                            .collect(),
                    ),
                ])),
            _ => return None,
        })
    }

    /// The wire: what a client sends at `version` is what the proxy decodes.
    fn wire(api_key: ApiKey, version: i16, req: &Q) -> Q {
        let mut b = BytesMut::new();
        req.encode(&mut b, version).unwrap_or_else(|e| panic!("{api_key:?} v{version}: {e}"));
        Q::decode(api_key, &mut b.freeze(), version).unwrap()
    }

    fn allow_ok(topic: Option<&str>) -> bool {
        topic.is_none_or(|t| t == "ok")
    }

    /// Every topic-bearing API, at every version: `ok` goes through, `secret` (named twice) is
    /// removed and answered twice with 29, in the API's own response type, merged into a
    /// response or answered alone when nothing is left.
    #[test]
    fn every_topic_bearing_api_is_judged_per_topic_at_every_version() {
        let mut judged_apis = 0;
        for api_key in ApiKey::iter() {
            let Some(_) = named_request(api_key, api_key.valid_versions().min) else { continue };
            judged_apis += 1;
            // The versions whose requests the codec carries (`valid_versions` also spans
            // response-only versions, e.g. OffsetCommit v10, which the proxy refuses to decode).
            let request_versions =
                versions(api_key).filter(|v| empty_request(api_key).encode(&mut BytesMut::new(), *v).is_ok());
            for version in request_versions {
                let original = wire(api_key, version, &named_request(api_key, version).unwrap());
                let mut req = original.clone();
                let mut seen = Vec::new();
                let judged = retain_topics(&mut req, version, &mut |t| {
                    seen.push(t.map(str::to_string));
                    allow_ok(t)
                });
                assert_eq!(seen.len(), 3, "{api_key:?} v{version}: every item judged: {seen:?}");
                if matches!(api_key, ApiKey::Produce | ApiKey::Fetch) && version >= 13 {
                    // These versions carry topic IDs, not names: every topic is unnamed.
                    assert_eq!(judged, Judged::Items { kept: 0, removed: 3 }, "{api_key:?} v{version}");
                    assert!(seen.iter().all(|t| t.as_deref() == Some(UNNAMED)));
                    continue;
                }
                assert_eq!(judged, Judged::Items { kept: 1, removed: 2 }, "{api_key:?} v{version}");
                let text = format!("{:?}", wire(api_key, version, &req));
                assert!(text.contains("\"ok\"") && !text.contains("secret"), "{api_key:?} v{version}: {text}");

                let mut resp = empty_response(api_key);
                let merged = add_denied(&mut resp, &original, &|t| !allow_ok(t));
                let body = encode(&resp, version).unwrap();
                if merged {
                    let mut b = body.clone().freeze();
                    let text = format!("{:?}", R::decode(api_key, &mut b, version).unwrap());
                    assert_eq!(text.matches("error_code: 29").count(), 2, "{api_key:?} v{version}: {text}");
                    assert!(!text.contains("\"ok\""), "{api_key:?} v{version}: {text}");
                }
                let alone = all_topics_denied(api_key, version, &original).unwrap();
                let has_error = round_trip(api_key, version, &alone, TOPIC_AUTHORIZATION_FAILED);
                // DescribeLogDirs v1-2 has no error field at all: the answer lists no log dir.
                let no_field = api_key == ApiKey::DescribeLogDirs && version < 3;
                assert!(has_error != no_field, "{api_key:?} v{version}");
            }
        }
        assert_eq!(judged_apis, 24);
    }

    /// A topic ID (no name) is judged as an unnamed topic, which only a rule without a topic
    /// allows; so is "every topic" and an empty name.
    #[test]
    fn topic_ids_empty_names_and_every_topic_are_unnamed() {
        let uuid = uuid::Uuid::from_u128(7);
        let produce = Q::Produce(ProduceRequest::default().with_acks(1).with_topic_data(vec![
            produce_request::TopicProduceData::default().with_topic_id(uuid),
            produce_request::TopicProduceData::default().with_name(topic("ok")),
        ]));
        let mut req = wire(ApiKey::Produce, 13, &produce);
        let mut seen = Vec::new();
        let judged = retain_topics(&mut req, 13, &mut |t| {
            seen.push(t.map(str::to_string));
            allow_ok(t)
        });
        // v13 carries no names: the named topic's name never reaches the wire either.
        assert_eq!(seen, [Some(UNNAMED.to_string()), Some(UNNAMED.to_string())]);
        assert_eq!(judged, Judged::Items { kept: 0, removed: 2 });
        let mut req = wire(ApiKey::Produce, 12, &produce);
        assert_eq!(retain_topics(&mut req, 12, &mut allow_ok), Judged::Items { kept: 1, removed: 1 });

        let delete = Q::DeleteTopics(DeleteTopicsRequest::default().with_topics(vec![
            delete_topics_request::DeleteTopicState::default().with_topic_id(uuid),
            delete_topics_request::DeleteTopicState::default().with_name(Some(topic(""))),
        ]));
        let mut req = wire(ApiKey::DeleteTopics, 6, &delete);
        assert_eq!(retain_topics(&mut req, 6, &mut allow_ok), Judged::Items { kept: 0, removed: 2 });
        let body = all_topics_denied(ApiKey::DeleteTopics, 6, &wire(ApiKey::DeleteTopics, 6, &delete)).unwrap();
        let text = format!("{:?}", R::decode(ApiKey::DeleteTopics, &mut body.freeze(), 6).unwrap());
        assert_eq!(text.matches("error_code: 29").count(), 2, "{text}");

        // Every topic: OffsetFetch with no topic list, ElectLeaders of every partition.
        for version in 1..=7 {
            let mut req = Q::OffsetFetch(OffsetFetchRequest::default().with_topics(None));
            assert_eq!(retain_topics(&mut req, version, &mut allow_ok), Judged::Whole { allowed: false });
            let body = whole_denial(ApiKey::OffsetFetch, version, &req, TOPIC_AUTHORIZATION_FAILED).unwrap();
            let mut b = body.freeze();
            R::decode(ApiKey::OffsetFetch, &mut b, version).unwrap();
        }
        let mut req = Q::ElectLeaders(ElectLeadersRequest::default().with_topic_partitions(None));
        assert_eq!(retain_topics(&mut req, 2, &mut allow_ok), Judged::Whole { allowed: false });
        assert_eq!(retain_topics(&mut req, 2, &mut |_| true), Judged::Whole { allowed: true });
        // ShareFetch names topics only by ID.
        let mut req = Q::ShareFetch(
            ShareFetchRequest::default()
                .with_topics(vec![share_fetch_request::FetchTopic::default().with_topic_id(uuid)]),
        );
        assert_eq!(retain_topics(&mut req, 1, &mut allow_ok), Judged::Whole { allowed: false });
    }

    /// Broker config resources name no topic: judged by API key (`None`), topics per topic.
    #[test]
    fn config_resources_of_brokers_are_not_topics() {
        let mut req = Q::DescribeConfigs(DescribeConfigsRequest::default().with_resources(vec![
            describe_configs_request::DescribeConfigsResource::default()
                .with_resource_type(4)
                .with_resource_name(StrBytes::from_static_str("1")),
            describe_configs_request::DescribeConfigsResource::default()
                .with_resource_type(TOPIC_RESOURCE)
                .with_resource_name(StrBytes::from_static_str("secret")),
        ]));
        let original = req.clone();
        let mut seen = Vec::new();
        let judged = retain_topics(&mut req, 4, &mut |t| {
            seen.push(t.map(str::to_string));
            allow_ok(t)
        });
        assert_eq!(seen, [None, Some("secret".to_string())]);
        assert_eq!(judged, Judged::Items { kept: 1, removed: 1 });
        // All denied (no rule allows the key): the broker resource gets 31, the topic 29.
        let body = all_topics_denied(ApiKey::DescribeConfigs, 4, &original).unwrap();
        let text = format!("{:?}", R::decode(ApiKey::DescribeConfigs, &mut body.freeze(), 4).unwrap());
        assert!(text.contains("error_code: 31") && text.contains("error_code: 29"), "{text}");
    }

    /// Whole denials carry the API's own authorization error: a group's, a transactional id's.
    #[test]
    fn whole_denials_use_the_apis_own_error() {
        let join = Q::JoinGroup(JoinGroupRequest::default());
        assert_eq!(whole_denial_code(&join, Judged::NoTopic), GROUP_AUTHORIZATION_FAILED);
        let txn = Q::InitProducerId(
            InitProducerIdRequest::default()
                .with_transactional_id(Some(TransactionalId(StrBytes::from_static_str("t")))),
        );
        assert_eq!(whole_denial_code(&txn, Judged::NoTopic), TRANSACTIONAL_ID_AUTHORIZATION_FAILED);
        let idempotent = Q::InitProducerId(InitProducerIdRequest::default().with_transactional_id(None));
        assert_eq!(whole_denial_code(&idempotent, Judged::NoTopic), CLUSTER_AUTHORIZATION_FAILED);
        let telemetry = Q::GetTelemetrySubscriptions(GetTelemetrySubscriptionsRequest::default());
        let body =
            whole_denial(ApiKey::GetTelemetrySubscriptions, 0, &telemetry, CLUSTER_AUTHORIZATION_FAILED).unwrap();
        assert!(round_trip(ApiKey::GetTelemetrySubscriptions, 0, &body, 31));
        let groups = Q::DescribeGroups(
            DescribeGroupsRequest::default().with_groups(vec![GroupId(StrBytes::from_static_str("g"))]),
        );
        for v in versions(ApiKey::DescribeGroups) {
            let body = whole_denial(ApiKey::DescribeGroups, v, &groups, GROUP_AUTHORIZATION_FAILED).unwrap();
            assert!(round_trip(ApiKey::DescribeGroups, v, &body, 30), "v{v}");
        }
        let coordinator = Q::FindCoordinator(
            FindCoordinatorRequest::default()
                .with_key_type(1)
                .with_coordinator_keys(vec![StrBytes::from_static_str("t")]),
        );
        for v in 4..=6 {
            let body = whole_denial(ApiKey::FindCoordinator, v, &coordinator, 53).unwrap();
            assert!(round_trip(ApiKey::FindCoordinator, v, &body, 53), "v{v}");
        }
    }

    /// The seeds of the Kafka fuzz targets (`fuzz/corpus/kafka_request`, `kafka_response`):
    /// every topic-bearing API at its first and last version, as the codec encodes them today.
    /// `L7MESH_WRITE_FUZZ_SEEDS=1` writes them; otherwise the committed ones must match, so a
    /// codec upgrade that changes the wire form says so here.
    #[test]
    fn fuzz_seeds_are_what_the_codec_encodes() {
        use kafka_protocol::protocol::Encodable;
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus");
        let write = std::env::var_os("L7MESH_WRITE_FUZZ_SEEDS").is_some();
        let mut seeds = 0;
        for api_key in ApiKey::iter() {
            let range = api_key.valid_versions();
            for version in [range.min, range.max] {
                let Some(req) = named_request(api_key, version) else { continue };
                let header = RequestHeader::default()
                    .with_request_api_key(api_key as i16)
                    .with_request_api_version(version)
                    .with_correlation_id(7)
                    .with_client_id(Some(StrBytes::from_static_str("fuzz")));
                let mut body = BytesMut::new();
                // A request of names at a version that only carries topic IDs does not encode.
                if req.encode(&mut body, version).is_err() {
                    continue;
                }
                let mut frame = BytesMut::new();
                header.encode(&mut frame, api_key.request_header_version(version)).unwrap();
                frame.extend_from_slice(&body);
                let response = whole_denial(api_key, version, &req, TOPIC_AUTHORIZATION_FAILED).unwrap();
                let name = format!("{api_key:?}-v{version}");
                // kafka_request: [salt][frame]; kafka_response: [key][version][request length][request][response].
                let request_seed = [&[0x5a][..], &frame].concat();
                let response_seed = [
                    &(api_key as i16).to_be_bytes()[..],
                    &version.to_be_bytes(),
                    &(body.len() as u16).to_be_bytes(),
                    &body,
                    &response,
                ]
                .concat();
                for (target, bytes) in [("kafka_request", request_seed), ("kafka_response", response_seed)] {
                    let path = root.join(target).join(&name);
                    if write {
                        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
                        std::fs::write(&path, &bytes).unwrap();
                    } else {
                        let committed = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                        assert_eq!(committed, bytes, "{}: regenerate with L7MESH_WRITE_FUZZ_SEEDS=1", path.display());
                    }
                    seeds += 1;
                }
            }
        }
        assert!(seeds > 60, "only {seeds} seeds");
        // Amplification shapes: many cheap items, around the fuzz targets' item bound (20,000).
        for (target, name, bytes) in amplification_seeds() {
            let path = root.join(target).join(name);
            if write {
                std::fs::write(&path, &bytes).unwrap();
            } else {
                let committed = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                assert!(committed == bytes, "{}: regenerate with L7MESH_WRITE_FUZZ_SEEDS=1", path.display());
            }
        }
    }

    /// Requests and responses of thousands of near-empty entries, encoded by the codec:
    /// `(target, name, bytes)`.
    fn amplification_seeds() -> Vec<(&'static str, String, Vec<u8>)> {
        use kafka_protocol::protocol::Encodable;
        let frame = |api_key: ApiKey, version: i16, req: &Q| {
            let mut b = BytesMut::new();
            RequestHeader::default()
                .with_request_api_key(api_key as i16)
                .with_request_api_version(version)
                .with_correlation_id(7)
                .encode(&mut b, api_key.request_header_version(version))
                .unwrap();
            req.encode(&mut b, version).unwrap();
            [&[0x5a][..], &b].concat()
        };
        let produce = |topics: usize, partitions: usize| {
            Q::Produce(
                ProduceRequest::default().with_acks(1).with_topic_data(
                    (0..topics)
                        .map(|t| {
                            produce_request::TopicProduceData::default()
                                .with_name(topic(&format!("t{t}")))
                                .with_partition_data(
                                    (0..partitions)
                                        .map(|p| produce_request::PartitionProduceData::default().with_index(p as i32))
                                        .collect(),
                                )
                        })
                        .collect(),
                ),
            )
        };
        let fetch = |topics: usize, partitions: usize| {
            Q::Fetch(
                FetchRequest::default().with_topics(
                    (0..topics)
                        .map(|t| {
                            fetch_request::FetchTopic::default().with_topic(topic(&format!("t{t}"))).with_partitions(
                                (0..partitions)
                                    .map(|p| fetch_request::FetchPartition::default().with_partition(p as i32))
                                    .collect(),
                            )
                        })
                        .collect(),
                ),
            )
        };
        let metadata = |topics: usize| {
            Q::Metadata(
                MetadataRequest::default().with_allow_auto_topic_creation(true).with_topics(Some(
                    (0..topics)
                        .map(|t| {
                            metadata_request::MetadataRequestTopic::default().with_name(Some(topic(&format!("t{t}"))))
                        })
                        .collect(),
                )),
            )
        };
        let mut out = vec![
            (
                "kafka_request",
                "amplify-Produce-v3-15000-empty".to_string(),
                frame(ApiKey::Produce, 3, &produce(15_000, 0)),
            ),
            (
                "kafka_request",
                "amplify-Produce-v3-25000-empty".to_string(),
                frame(ApiKey::Produce, 3, &produce(25_000, 0)),
            ),
            ("kafka_request", "amplify-Produce-v9-200x50".to_string(), frame(ApiKey::Produce, 9, &produce(200, 50))),
            ("kafka_request", "amplify-Fetch-v12-100x150".to_string(), frame(ApiKey::Fetch, 12, &fetch(100, 150))),
            ("kafka_request", "amplify-Fetch-v4-100x250".to_string(), frame(ApiKey::Fetch, 4, &fetch(100, 250))),
            ("kafka_request", "amplify-Metadata-v12-15000".to_string(), frame(ApiKey::Metadata, 12, &metadata(15_000))),
        ];
        // kafka_response: a request of many denied entries merged into the broker's (empty or
        // large) answer.
        let req = produce(1000, 5);
        let mut body = BytesMut::new();
        req.encode(&mut body, 7).unwrap();
        assert!(body.len() < 1 << 16, "{}", body.len());
        let answer = whole_denial(ApiKey::Produce, 7, &produce(1200, 5), TOPIC_AUTHORIZATION_FAILED).unwrap();
        for (name, resp) in [
            ("amplify-Produce-v7-merge-empty", encode(&empty_response(ApiKey::Produce), 7).unwrap()),
            ("amplify-Produce-v7-merge-6000", answer),
        ] {
            let seed = [
                &(ApiKey::Produce as i16).to_be_bytes()[..],
                &7i16.to_be_bytes(),
                &(body.len() as u16).to_be_bytes(),
                &body,
                &resp,
            ]
            .concat();
            out.push(("kafka_response", name.to_string(), seed));
        }
        out
    }

    /// A request that claims more elements or bytes than its frame holds is a decode error,
    /// never an allocation of what it claims (unpatched, the codec asked for tens of GiB here and
    /// the failed allocation aborted the proxy; vendor/kafka-protocol/L7MESH-PATCH.md).
    #[test]
    fn huge_claimed_lengths_are_errors() {
        let cases: [(ApiKey, i16, &[u8]); 4] = [
            // CreateTopics v2: a topics array of i32::MAX entries, then nothing.
            (ApiKey::CreateTopics, 2, &[0x7f, 0xff, 0xff, 0xff, 0, 0]),
            // Metadata v12 (flexible): a compact topics array of u32::MAX - 1 entries.
            (ApiKey::Metadata, 12, &[0xff, 0xff, 0xff, 0xff, 0x0f, 0]),
            // Produce v3: no transactional id, acks, timeout, then 0x0e0e0e0e topics.
            (ApiKey::Produce, 3, &[0xff, 0xff, 0, 1, 0, 0, 0x75, 0x30, 0x0e, 0x0e, 0x0e, 0x0e, 0, 0]),
            // SaslAuthenticate v0: auth bytes claiming 2 GiB.
            (ApiKey::SaslAuthenticate, 0, &[0x7f, 0xff, 0xff, 0xff, 1, 2, 3]),
        ];
        for (api_key, version, body) in cases {
            let decoded = Q::decode(api_key, &mut bytes::Bytes::from_static(body), version);
            assert!(decoded.is_err(), "{api_key:?} v{version} decoded");
        }
    }
}
