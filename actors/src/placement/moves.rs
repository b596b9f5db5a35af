//! What a node does when owners change under it: a member died, restarted,
//! joined or left.
//!
//! On every change of the `up` members (or of a member's generation: it
//! restarted) each node
//! - stops its actors whose key moved away ([`Services::hand_over`]), and
//!   has the rooms it keeps reload their head and membership (another node
//!   may have written while views disagreed: `room::Refresh`);
//! - makes its actors forget the connections of members that are gone
//!   (down, or a new generation): rooms stop sending to them, users drop
//!   those devices (offline, with `last_seen`, if it was their last);
//! - re-registers its hub's subscribers of every channel whose owner is not
//!   the one they were registered with, at the owner now, from the last
//!   stored entry the hub delivered (the owner replays the gap from the
//!   store: `room::Resubscribe`);
//! - has each of its connections announce itself again to its user's
//!   owner, and watch again the users it watches, where that owner is not
//!   the incarnation it announced itself to (`conn::Reannounce`).
//!
//! Views disagree for a while after a change: a re-registration may reach
//! a node that forwards it to the old owner, where it is lost. So both are
//! reconciled until they hold: the hub's registrations every
//! [`RECONCILE_EVERY`] (a channel at most once per [`RESEND_AFTER`]), a
//! connection's announcements by the connection itself, which retries
//! until its user's owner answered.
//!
//! A room that stops with subscribers (hand-over, shutdown) tells their
//! nodes ([`crate::remote::PeerMsg::OwnerStopped`]), which re-register them
//! the same way as soon as their view names another owner.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::NodeId;
use crate::cluster::{MemberState, Members};
use crate::conn::{Forgotten, Reannounce};
use crate::hub::{ConnAddr, ConnId, OwnerGone, Registration, Registrations};
use crate::remote::PeerMsg;
use crate::room::{self, RoomActor};
use crate::services::Services;

/// How often a node checks that its subscribers are registered at their owners.
pub const RECONCILE_EVERY: Duration = Duration::from_secs(1);

/// How long a re-registration may take before it is sent again.
pub const RESEND_AFTER: Duration = Duration::from_secs(3);

impl Services {
    /// Follows the cluster's members for as long as the node runs, handling
    /// each change as the module docs say.
    pub async fn follow_cluster(self: Arc<Self>) {
        let mut members = self.cluster.members_watch();
        let mut view = self.cluster.view();
        let mut known = generations(&members.borrow_and_update());
        let mut sent: HashMap<(String, ConnId), Instant> = HashMap::new();
        // Members last seen down, with the generation they had.
        let mut seen_down: HashMap<NodeId, u64> = HashMap::new();
        let mut tick = tokio::time::interval(RECONCILE_EVERY);
        loop {
            tokio::select! {
                r = members.changed() => if r.is_err() { return },
                _ = tick.tick() => {
                    if self.is_stopping() {
                        return;
                    }
                    self.reconcile(&mut sent, &HashMap::new()).await;
                    continue;
                }
                _ = self.reregister.notified() => {
                    if self.is_stopping() {
                        return;
                    }
                    self.reconcile(&mut sent, &HashMap::new()).await;
                    continue;
                }
            }
            if self.is_stopping() {
                return;
            }
            let now = generations(&members.borrow_and_update());
            // Back from `down` with the same generation (it was only
            // unreachable): it does not know we forgot its connections.
            let back: Vec<NodeId> = now
                .iter()
                .filter(|(id, g)| !known.contains_key(*id) && seen_down.get(*id) == Some(*g))
                .map(|(id, _)| id.clone())
                .collect();
            for node in &back {
                seen_down.remove(node);
                self.send_peer(node, &PeerMsg::Forgotten).await;
            }
            // A member that is down, or back with a new generation: its old
            // incarnation's connections (ids below the new generation) are gone.
            let gone: HashMap<NodeId, NodeGone> = known
                .iter()
                .filter(|(id, generation)| now.get(*id) != Some(*generation))
                .map(|(id, generation)| {
                    let gone = NodeGone {
                        node: id.clone(),
                        below: now.get(id).copied().unwrap_or(u64::MAX),
                        generation: *generation,
                    };
                    (id.clone(), gone)
                })
                .collect();
            for (id, g) in &known {
                if !now.contains_key(id) {
                    seen_down.insert(id.clone(), *g);
                }
            }
            known = now;
            let current = self.cluster.view();
            if *current == *view && gone.is_empty() {
                continue;
            }
            view = current;
            self.owners_changed(&gone).await;
            sent.clear();
            self.reconcile(&mut sent, &gone).await;
        }
    }

    async fn owners_changed(self: &Arc<Self>, gone: &HashMap<NodeId, NodeGone>) {
        let moved = self.hand_over_moved_keys();
        if moved > 0 {
            self.cluster.metrics.ownership_changes.inc_by(moved as u64);
            tracing::info!(moved, "actors handed over to their new owners");
        }
        for (node, gone) in gone {
            if self.cluster.is_me(node) {
                continue;
            }
            self.cluster.metrics.nodes_gone.inc();
            tracing::info!(%node, "forgetting the connections of a member that is gone");
            self.fail_requests_to(node).await;
            // Its rooms' registrations died with it, also if it came back
            // as a new incarnation that owns the same channels.
            let _ = self.hub.tell(OwnerGone { node: node.clone() }).await;
            for r in self.rooms.all() {
                let _ = r.tell(gone.clone()).await;
            }
            for u in self.users.all() {
                let _ = u.tell(gone.clone()).await;
            }
            for d in self.docs.all() {
                let _ = d.tell(crate::doc::DocNodeGone(gone.clone())).await;
            }
        }
        for r in self.rooms.all() {
            let _ = r.tell(room::Refresh).await;
        }
        for conn in self.local_conns() {
            let _ = conn.tell(Reannounce).await;
        }
    }

    /// Re-registers every subscriber registered with another node than its
    /// channel's owner now, with a member that is gone, or with none (the
    /// hub held back an entry that would have left it a gap).
    async fn reconcile(
        self: &Arc<Self>,
        sent: &mut HashMap<(String, ConnId), Instant>,
        gone: &HashMap<NodeId, NodeGone>,
    ) {
        let Ok(regs) = self.hub.ask(Registrations { channel: None }).await else {
            return;
        };
        sent.retain(|_, at| at.elapsed() < RESEND_AFTER);
        for mut reg in regs {
            let owner = self.cluster.owner(&reg.channel);
            reg.conns.retain(|c| {
                let stale = match &c.owner {
                    Some(o) => *o != owner || gone.contains_key(o),
                    None => true,
                };
                stale && !sent.contains_key(&(reg.channel.clone(), c.conn))
            });
            for c in &reg.conns {
                sent.insert((reg.channel.clone(), c.conn), Instant::now());
            }
            self.resubscribe(reg).await;
        }
    }

    /// `from` saw this node down and forgot its connections: register the
    /// subscribers registered there again, and announce the connections
    /// announced there again.
    pub(crate) fn forgotten_by(self: &Arc<Self>, from: NodeId) {
        let svc = self.clone();
        tokio::spawn(async move {
            tracing::info!(node = %from, "a member forgot this node's connections; registering them again");
            let regs = svc
                .hub
                .ask(Registrations { channel: None })
                .await
                .unwrap_or_default();
            for mut reg in regs {
                reg.conns.retain(|c| c.owner.as_ref() == Some(&from));
                svc.resubscribe(reg).await;
            }
            for conn in svc.local_conns() {
                let _ = conn.tell(Forgotten { node: from.clone() }).await;
            }
        });
    }

    /// `from`'s actor of `channel` stopped with subscribers here.
    pub(crate) fn owner_stopped(self: &Arc<Self>, from: NodeId, channel: String) {
        let svc = self.clone();
        tokio::spawn(async move {
            if svc.is_stopping() {
                return;
            }
            // If `from` is still the owner as this node sees it, reconciling
            // re-registers them once the view names another.
            if svc.cluster.owner(&channel) == from {
                return;
            }
            let regs = svc
                .hub
                .ask(Registrations {
                    channel: Some(channel.clone()),
                })
                .await
                .unwrap_or_default();
            for mut reg in regs {
                // Only those still registered there.
                reg.conns.retain(|c| c.owner.as_ref() == Some(&from));
                svc.resubscribe(reg).await;
            }
        });
    }

    /// Registers these local subscribers of a channel at its owner now, from
    /// the earliest position among them (the hub drops what each one has).
    async fn resubscribe(self: &Arc<Self>, reg: Registration) {
        if reg.conns.is_empty() {
            return;
        }
        self.cluster.metrics.resubscriptions.inc();
        let after = reg
            .epoch
            .clone()
            .zip(reg.conns.iter().filter_map(|c| c.last).min());
        tracing::debug!(channel = %reg.channel, to = %self.cluster.owner(&reg.channel), ?after, conns = reg.conns.len(), "re-registering subscribers");
        let msg = room::Resubscribe {
            node: self.cluster.me().clone(),
            conns: reg.conns.into_iter().map(|c| (c.conn, c.user)).collect(),
            after,
        };
        if let Err(f) = self.tell::<RoomActor, _>(&reg.channel, msg).await {
            tracing::warn!(channel = %reg.channel, error = %f, "re-registering subscribers failed");
        }
    }
}

/// A member is down or restarted: the connections it had are gone. They
/// are those of `node` with ids below `below`, the new incarnation's
/// generation (a node numbers its connections from its generation, a start
/// time, so a newer incarnation's are above). Should the clock have stepped
/// back across the restart (`below` under the gone incarnation's
/// `generation`), the gone one's ids from its generation up are covered too.
#[derive(Clone)]
pub struct NodeGone {
    pub node: NodeId,
    pub below: u64,
    pub generation: u64,
}

impl NodeGone {
    pub fn covers(&self, conn: &ConnAddr) -> bool {
        conn.node == self.node
            && (conn.conn < self.below
                || (self.below < self.generation && conn.conn >= self.generation))
    }
}

/// The generation of every member that is not down.
fn generations(members: &Members) -> HashMap<NodeId, u64> {
    members
        .iter()
        .filter(|m| m.state != MemberState::Down)
        .map(|m| (m.id.clone(), m.generation))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conn(node: &str, conn: u64) -> ConnAddr {
        ConnAddr {
            node: NodeId::new(node),
            conn,
        }
    }

    #[test]
    fn a_gone_incarnation_covers_its_own_connections_only() {
        // Restarted later: everything below the new generation.
        let later = NodeGone {
            node: NodeId::new("c"),
            below: 2_000,
            generation: 1_000,
        };
        assert!(later.covers(&conn("c", 1_000)) && later.covers(&conn("c", 1_999)));
        assert!(!later.covers(&conn("c", 2_000)) && !later.covers(&conn("b", 1_000)));
        // Down for good: all of them.
        let down = NodeGone {
            below: u64::MAX,
            ..later.clone()
        };
        assert!(down.covers(&conn("c", 5_000)));
        // Restarted with an earlier start time (the clock stepped back): the
        // old incarnation's ids from its generation up, and the new one's
        // below the old generation stay.
        let back = NodeGone {
            node: NodeId::new("c"),
            below: 900,
            generation: 1_000,
        };
        assert!(back.covers(&conn("c", 1_000)) && back.covers(&conn("c", 1_500)));
        assert!(back.covers(&conn("c", 899)));
        assert!(!back.covers(&conn("c", 900)) && !back.covers(&conn("c", 999)));
    }
}
