//! This node's life in the cluster: joining, reporting its load, following
//! owner changes, and leaving.

use std::sync::Arc;
use std::time::Duration;

use chorus_actors::cluster::{Load, MemberState};
use chorus_actors::Services;

/// Waits (at most `cluster.join_timeout_ms`) to hear from another member,
/// then serves as `up`, and from then on gossips this node's load.
pub async fn join_and_report(svc: Arc<Services>) {
    let cluster = svc.cluster.clone();
    let config = cluster.config().clone();
    if !config.seeds.is_empty() {
        let mut members = cluster.members_watch();
        let me = cluster.me().clone();
        let joined = tokio::time::timeout(
            config.join_timeout(),
            members.wait_for(|m| m.iter().any(|m| m.id != me)),
        )
        .await
        .is_ok();
        if !joined {
            tracing::warn!(
                seeds = ?config.seeds,
                "no seed answered within cluster.join_timeout_ms; serving alone until one does"
            );
        }
    }
    cluster.set_state(MemberState::Up).await;
    tracing::info!(node = %cluster.me(), "cluster member up");
    let mut tick = tokio::time::interval(Duration::from_secs(1).max(config.gossip_interval()));
    loop {
        tick.tick().await;
        if svc.is_stopping() {
            return;
        }
        let (rooms, users) = svc.active_counts();
        cluster
            .set_load(Load {
                connections: svc.metrics.connections.get().max(0) as u64,
                rooms: rooms as u64,
                users: users as u64,
            })
            .await;
    }
}

/// Whenever owners change, hands over, forgets the connections of members
/// that are gone and re-registers subscribers and presence at the new
/// owners (see `chorus_actors::placement::moves`).
pub async fn hand_over_moved_keys(svc: Arc<Services>) {
    svc.follow_cluster().await;
}

/// Announces `leaving` and waits (bounded) until this node's own view no
/// longer lists it as an owner; gossip spreads that to the others within
/// about the same time.
pub async fn leave(svc: &Arc<Services>, timeout: Duration) {
    let cluster = &svc.cluster;
    if !cluster.is_clustered() {
        return;
    }
    cluster.set_state(MemberState::Leaving).await;
    let me = cluster.me().clone();
    let others_up = cluster
        .members()
        .iter()
        .any(|m| m.id != me && m.state == MemberState::Up);
    if others_up {
        let left = cluster.wait_view(timeout, |v| !v.contains(&me)).await;
        // Let the others' gossip catch up with ours.
        tokio::time::sleep(cluster.config().gossip_interval() * 3).await;
        tracing::info!(left, "announced leaving the cluster");
    }
}
