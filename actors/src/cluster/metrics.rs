//! The cluster's metrics (`chorus_cluster_*` in `GET /metrics`).

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use super::link::PeerMetrics;
use super::membership::{MemberState, Members};

type PeerLabel = Vec<(&'static str, String)>;
type StateLabel = Vec<(&'static str, &'static str)>;

#[derive(Clone, Default)]
pub struct ClusterMetrics {
    members: Family<StateLabel, Gauge>,
    frames_out: Family<PeerLabel, Counter>,
    bytes_out: Family<PeerLabel, Counter>,
    frames_in: Family<PeerLabel, Counter>,
    bytes_in: Family<PeerLabel, Counter>,
    queue_depth: Family<PeerLabel, Gauge>,
    reconnects: Family<PeerLabel, Counter>,
    /// Requests sent to the owner of a key on another node.
    pub forwarded: Counter,
    /// Batches of pushes sent to another node's hub (one per node per message).
    pub remote_deliveries: Counter,
    /// Changes of the set of `up` members.
    pub view_changes: Counter,
    /// Active actors stopped here because their key moved to another node.
    pub ownership_changes: Counter,
    /// Channels whose local subscribers this node re-registered at a new owner.
    pub resubscriptions: Counter,
    /// Stored entries a hub had already delivered (a new owner's replay, or
    /// two owners at once), dropped instead of delivered twice.
    pub duplicates_dropped: Counter,
    /// Members whose connections this node's actors forgot (down, or restarted).
    pub nodes_gone: Counter,
    /// Requests to another node that got no answer within the deadline.
    pub request_timeouts: Counter,
    /// Gossip datagrams dropped for a missing or wrong signature.
    pub gossip_rejected: Counter,
    /// Inbound transport connections that failed the handshake (no secret).
    pub connections_refused: Counter,
}

impl ClusterMetrics {
    pub fn register(&self, registry: &mut Registry) {
        let r = registry.sub_registry_with_prefix("cluster");
        r.register(
            "members",
            "Members by state, as this node sees them",
            self.members.clone(),
        );
        r.register(
            "peer_frames_out",
            "Frames sent to each peer",
            self.frames_out.clone(),
        );
        r.register(
            "peer_bytes_out",
            "Payload bytes sent to each peer",
            self.bytes_out.clone(),
        );
        r.register(
            "peer_frames_in",
            "Frames received from each peer",
            self.frames_in.clone(),
        );
        r.register(
            "peer_bytes_in",
            "Payload bytes received from each peer",
            self.bytes_in.clone(),
        );
        r.register(
            "peer_send_queue",
            "Frames queued for each peer, not yet sent",
            self.queue_depth.clone(),
        );
        r.register(
            "peer_reconnects",
            "Times a peer link broke and was reopened",
            self.reconnects.clone(),
        );
        r.register(
            "forwarded_requests",
            "Requests sent to a key's owner on another node",
            self.forwarded.clone(),
        );
        r.register(
            "remote_deliveries",
            "Pushes sent once to another node's hub for its subscribers",
            self.remote_deliveries.clone(),
        );
        r.register(
            "view_changes",
            "Changes of the set of up members",
            self.view_changes.clone(),
        );
        r.register(
            "ownership_changes",
            "Actors stopped here because their key moved to another node",
            self.ownership_changes.clone(),
        );
        r.register(
            "resubscriptions",
            "Channels whose local subscribers were re-registered at a new owner",
            self.resubscriptions.clone(),
        );
        r.register(
            "duplicates_dropped",
            "Stored entries a hub had already delivered, dropped instead of delivered twice",
            self.duplicates_dropped.clone(),
        );
        r.register(
            "nodes_gone",
            "Members (down or restarted) whose connections this node's actors forgot",
            self.nodes_gone.clone(),
        );
        r.register(
            "request_timeouts",
            "Requests to another node unanswered within cluster.request_timeout_ms",
            self.request_timeouts.clone(),
        );
        r.register(
            "gossip_rejected",
            "Gossip datagrams dropped: no valid signature",
            self.gossip_rejected.clone(),
        );
        r.register(
            "connections_refused",
            "Inbound inter-node connections refused: handshake failed (wrong or no secret)",
            self.connections_refused.clone(),
        );
    }

    pub fn peer(&self, peer: &str) -> PeerMetrics {
        let label = vec![("peer", peer.to_string())];
        PeerMetrics {
            frames_out: self.frames_out.get_or_create(&label).clone(),
            bytes_out: self.bytes_out.get_or_create(&label).clone(),
            frames_in: self.frames_in.get_or_create(&label).clone(),
            bytes_in: self.bytes_in.get_or_create(&label).clone(),
            queue_depth: self.queue_depth.get_or_create(&label).clone(),
            reconnects: self.reconnects.get_or_create(&label).clone(),
        }
    }

    pub fn set_members(&self, members: &Members) {
        for state in [
            MemberState::Joining,
            MemberState::Up,
            MemberState::Leaving,
            MemberState::Down,
        ] {
            let n = members.iter().filter(|m| m.state == state).count();
            self.members
                .get_or_create(&vec![("state", state_label(state))])
                .set(n as i64);
        }
    }
}

fn state_label(s: MemberState) -> &'static str {
    match s {
        MemberState::Joining => "joining",
        MemberState::Up => "up",
        MemberState::Leaving => "leaving",
        MemberState::Down => "down",
    }
}
