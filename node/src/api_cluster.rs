//! `GET /api/v1/cluster`: the members as this node sees them, the owner of
//! a key, and this node's actor counts (what `chorus status` prints).

use actix_web::{web, HttpRequest, HttpResponse};
use chorus_actors::cluster::{Load, Member, MemberState};
use serde::{Deserialize, Serialize};

use crate::api::{check_key, ApiResult};
use crate::AppState;

pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.route("/api/v1/cluster", web::get().to(cluster_status));
}

#[derive(Deserialize)]
struct StatusQuery {
    /// A placement key: `room:lobby`, `topic:news`, `feed:alice`, `user:alice`.
    key: Option<String>,
}

/// The body of `GET /api/v1/cluster` (and `chorus status --json`).
#[derive(Debug, Serialize, Deserialize)]
pub struct ClusterStatus {
    /// The node that answered.
    pub node: String,
    pub generation: u64,
    /// Every member it knows of, with its state and load.
    pub members: Vec<Member>,
    /// The members that own keys (`up`), sorted.
    pub view: Vec<String>,
    /// The owner of `?key=`, when asked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<KeyOwner>,
    /// This node's own counts.
    pub local: Load,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct KeyOwner {
    pub key: String,
    pub node: String,
}

async fn cluster_status(
    req: HttpRequest,
    state: web::Data<AppState>,
    query: web::Query<StatusQuery>,
) -> ApiResult {
    check_key(&req, &state)?;
    let svc = &state.services;
    let cluster = &svc.cluster;
    let (rooms, users) = svc.active_counts();
    let local = Load {
        connections: svc.metrics.connections.get().max(0) as u64,
        rooms: rooms as u64,
        users: users as u64,
    };
    let mut members = cluster.members().as_ref().clone();
    if members.is_empty() {
        // A cluster of one: this node, serving.
        members.push(Member {
            id: cluster.me().clone(),
            generation: cluster.generation(),
            state: MemberState::Up,
            gossip: ([0, 0, 0, 0], 0).into(),
            peer_id: None,
            transport: None,
            http: Some(req.app_config().local_addr().to_string()),
            load: local,
        });
    }
    let owner = query.key.as_ref().map(|key| KeyOwner {
        key: key.clone(),
        node: cluster.owner(key).to_string(),
    });
    Ok(HttpResponse::Ok().json(ClusterStatus {
        node: cluster.me().to_string(),
        generation: cluster.generation(),
        members,
        view: cluster
            .view()
            .members()
            .iter()
            .map(|n| n.to_string())
            .collect(),
        owner,
        local,
    }))
}
