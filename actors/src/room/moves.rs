//! A room's subscribers across owner changes: taking over the subscribers
//! another owner had ([`Resubscribe`]), forgetting those of a node that is
//! gone ([`NodeGone`]), and telling the subscribed nodes when this actor
//! stops, so their hubs register them again at the owner.

use super::*;
use crate::hub::{ConnId, Position};
use crate::placement::moves::NodeGone;
use crate::placement::NodeId;
use crate::remote::PeerMsg;

/// `node`'s hub registers its subscribers of this channel here, the owner
/// now; their stream stands at `after` (the last stored entry they got).
#[derive(serde::Serialize, serde::Deserialize)]
pub struct Resubscribe {
    pub node: NodeId,
    /// Each connection on `node` with its user.
    pub conns: Vec<(ConnId, String)>,
    pub after: Option<Position>,
}

impl Message<Resubscribe> for RoomActor {
    type Reply = ();
    async fn handle(&mut self, m: Resubscribe, _: &mut Context<Self, ()>) {
        self.last_used = Instant::now();
        // Access is checked again: a member removed meanwhile stops receiving
        // the room, as a kicked one does.
        let (allowed, refused): (Vec<_>, Vec<_>) = m
            .conns
            .into_iter()
            .partition(|(_, user)| self.check_read(Some(user)).is_ok());
        for (conn, _) in refused {
            let addr = ConnAddr {
                node: m.node.clone(),
                conn,
            };
            self.svc.hub_unsubscribe(&self.key, &addr).await;
        }
        if allowed.is_empty() {
            return;
        }
        let conns: Vec<ConnId> = allowed.iter().map(|(c, _)| *c).collect();
        let before = self.log.head().map(|h| h.offset);
        let resubscribed = self.log.resubscribe(&m.node, allowed, m.after).await;
        if self.log.head().map(|h| h.offset) != before {
            self.reload_members().await;
        }
        let reason = match resubscribed {
            Ok(Ok(())) => return,
            Ok(Err(reason)) => reason,
            Err(f) => {
                tracing::warn!(channel = %self.key, error = %f, "taking over subscribers failed");
                "unavailable"
            }
        };
        // They cannot resume without a gap: end their subscriptions and say
        // so; the client subscribes again with its (offset, epoch).
        let frame = Arc::new(SharedFrame::new(ServerFrame::Push(Push::ephemeral(
            "resubscribe",
            Some(self.key.clone()),
            json!({ "reason": reason }),
        ))));
        for conn in conns {
            let addr = ConnAddr {
                node: m.node.clone(),
                conn,
            };
            self.svc.hub_unsubscribe(&self.key, &addr).await;
            self.svc.send_to(&addr, frame.clone()).await;
        }
    }
}

impl Message<NodeGone> for RoomActor {
    type Reply = ();
    async fn handle(&mut self, m: NodeGone, _: &mut Context<Self, ()>) {
        self.log.drop_gone(&m);
    }
}

/// Owners changed: another node may have written here meanwhile (views
/// disagreed, or a partition healed). Reload the head and the membership.
/// Sent by this node on every change of owners, and by a previous owner
/// when its actor stops after handing the key over: the new owner may have
/// activated while the old one still wrote (views disagree for a while
/// after a restart or a join), and nothing else tells it.
#[derive(serde::Serialize, serde::Deserialize)]
pub struct Refresh;

impl Message<Refresh> for RoomActor {
    type Reply = ();
    async fn handle(&mut self, _: Refresh, _: &mut Context<Self, ()>) {
        if self.log.is_writing() {
            // The write's result reloads the head if someone else wrote.
            return;
        }
        let head = match self.svc.store.channel_head(&self.key).await {
            Ok(Some(h)) => h,
            Ok(None) => return,
            Err(e) => {
                tracing::warn!(channel = %self.key, error = %e, "reloading the head failed");
                return;
            }
        };
        if self.log.adopt(head).await {
            self.reload_members().await;
        }
    }
}

impl RoomActor {
    /// Entries another writer stored may have changed the membership:
    /// reloads it after the head moved to what they stored.
    pub(super) async fn reload_members(&mut self) {
        if self.channel.kind != ChannelKind::Room {
            return;
        }
        let name = self.channel.name.clone();
        match self.svc.store.members(&name).await {
            Ok(members) => {
                self.members = members.into_iter().map(|m| (m.user.clone(), m)).collect();
            }
            Err(e) => tracing::warn!(channel = %self.key, error = %e, "reloading members failed"),
        }
    }

    /// Tells the key's owner, when it is another node, to reload what this
    /// actor wrote (if its actor is already running there).
    pub(super) async fn refresh_new_owner(&self) {
        let owner = self
            .svc
            .cluster
            .owner(&ActorKind::Room.placement_key(&self.key));
        if self.svc.cluster.is_me(&owner) {
            return;
        }
        if let Err(f) = self
            .svc
            .tell_if_active::<RoomActor, _>(&self.key, Refresh)
            .await
        {
            tracing::debug!(channel = %self.key, %owner, error = %f, "telling the new owner to refresh failed");
        }
    }

    /// Tells every node with subscribers here that this actor stopped.
    pub(super) async fn release_subscribers(&self) {
        let msg = PeerMsg::OwnerStopped {
            channel: self.key.clone(),
        };
        for node in self.log.subscribed_nodes() {
            if self.svc.cluster.is_me(node) {
                self.svc
                    .owner_stopped(self.svc.cluster.me().clone(), self.key.clone());
            } else {
                self.svc.send_peer(node, &msg).await;
            }
        }
    }
}
