//! A room's membership requests: create, join, leave, invite, kick, list.

use serde_json::{json, Value};

use super::*;

/// Create a group/public room, or the direct room of two users (idempotent for direct).
#[derive(serde::Serialize, serde::Deserialize)]
pub struct Create {
    pub info: RoomInfo,
    pub members: Vec<String>,
    pub replier: Replier,
}

/// Join (public rooms; for others, the caller must be a member already) and subscribe `conn`.
#[derive(serde::Serialize, serde::Deserialize)]
pub struct Join {
    pub user: String,
    pub conn: Option<ConnAddr>,
    pub replier: Replier,
    pub req_id: u64,
}

#[derive(serde::Serialize, serde::Deserialize)]
pub struct Leave {
    pub user: String,
    /// The connection that asked: it stops receiving the room if the leave succeeds.
    pub conn: Option<ConnAddr>,
    pub replier: Replier,
}

/// `by` adds `user` (group and public rooms); `by: None` is the server API.
#[derive(serde::Serialize, serde::Deserialize)]
pub struct Invite {
    pub by: Option<String>,
    pub user: String,
    pub replier: Replier,
}

/// `by` (an owner, or the server API when `None`) removes `user`.
#[derive(serde::Serialize, serde::Deserialize)]
pub struct Kick {
    pub by: Option<String>,
    pub user: String,
    pub replier: Replier,
}

#[derive(serde::Serialize, serde::Deserialize)]
pub struct Members {
    pub user: Option<String>,
}

impl Message<Create> for RoomActor {
    type Reply = ();
    async fn handle(&mut self, m: Create, _: &mut Context<Self, ()>) {
        self.last_used = Instant::now();
        let r = self.create(m.info, m.members).await;
        m.replier.send(&self.svc, r.map(|i| to_value(&i))).await;
    }
}

impl RoomActor {
    async fn create(&mut self, info: RoomInfo, members: Vec<String>) -> Result<RoomInfo, Fail> {
        if self.channel.kind != ChannelKind::Room {
            return Err(Fail::new(ErrorCode::WrongRoomKind, "not a chat room"));
        }
        if let Some(existing) = &self.room {
            if existing.kind == RoomKind::Direct && info.kind == RoomKind::Direct {
                return Ok(existing.clone());
            }
            return Err(Fail::new(
                ErrorCode::RoomExists,
                "a room with this id exists",
            ));
        }
        if !self.svc.store.create_room(&info).await? {
            // Created concurrently (another activation): reload and answer like above.
            self.room = self.svc.store.get_room(&self.channel.name).await?;
            return match &self.room {
                Some(r) if r.kind == RoomKind::Direct && info.kind == RoomKind::Direct => {
                    Ok(r.clone())
                }
                _ => Err(Fail::new(
                    ErrorCode::RoomExists,
                    "a room with this id exists",
                )),
            };
        }
        self.room = Some(info.clone());
        self.ensure_channel().await?;
        let owner_role = if info.kind == RoomKind::Direct {
            Role::Member
        } else {
            Role::Owner
        };
        self.add_member(&info.created_by, owner_role, None).await?;
        for user in members {
            if user != info.created_by && !self.is_member(&user) {
                self.add_member(&user, Role::Member, Some(&info.created_by))
                    .await?;
            }
        }
        Ok(info)
    }
}

impl Message<Join> for RoomActor {
    type Reply = ();
    async fn handle(&mut self, m: Join, _: &mut Context<Self, ()>) {
        self.last_used = Instant::now();
        let r = self.join(&m.user).await;
        match (r, m.conn) {
            (Ok(()), Some(conn)) => {
                if let Err(f) = self.subscribe_conn(m.user, conn, None, m.req_id).await {
                    m.replier.send(&self.svc, Err(f)).await;
                }
            }
            (Ok(()), None) => {
                let head = self.log.head().cloned();
                m.replier
                    .send(
                        &self.svc,
                        Ok(json!({"room": self.channel.name, "head": head})),
                    )
                    .await;
            }
            (Err(f), _) => m.replier.send(&self.svc, Err(f)).await,
        }
    }
}

impl RoomActor {
    async fn join(&mut self, user: &str) -> Result<(), Fail> {
        let room = self.require_room()?.clone();
        if self.is_member(user) {
            return Ok(());
        }
        if room.kind != RoomKind::Public {
            return Err(Fail::new(ErrorCode::NotMember, "this room is invite-only"));
        }
        self.add_member(user, Role::Member, None).await
    }
}

impl Message<Leave> for RoomActor {
    type Reply = ();
    async fn handle(&mut self, m: Leave, _: &mut Context<Self, ()>) {
        self.last_used = Instant::now();
        // A direct room has exactly two members: nobody can invite into it and
        // `room.direct` returns the same room, so leaving would lock the pair
        // out of their conversation for good.
        let r = match self.require_room() {
            Ok(room) if room.kind == RoomKind::Direct => Err(Fail::new(
                ErrorCode::WrongRoomKind,
                "nobody leaves a direct room",
            )),
            _ => self.removable(&m.user),
        };
        if let Err(f) = r {
            m.replier.send(&self.svc, Err(f)).await;
            return;
        }
        // Answered once the `left` entry is durable, so it is readable then.
        let removed = self
            .remove(&m.user, Removal::Left, m.replier, json!({"left": true}))
            .await;
        if let (true, Some(conn)) = (removed, m.conn) {
            // The user's other connections to a non-public room follow once the
            // `left` entry is delivered (`After::Removed`).
            self.log.unsubscribe(&conn).await;
        }
    }
}

/// How a member goes.
enum Removal<'a> {
    /// They left.
    Left,
    /// An owner (`by`), or the server API (`None`), removed them.
    Kicked { by: Option<&'a str> },
}

impl RoomActor {
    fn removable(&self, user: &str) -> Result<(), Fail> {
        self.require_room()?;
        if !self.is_member(user) {
            return Err(Fail::new(ErrorCode::NotMember, "not a member of this room"));
        }
        Ok(())
    }

    /// Removes a member (checked with [`Self::removable`]) and publishes the
    /// `left` entry (a leave in a room without membership entries has none);
    /// `replier` gets `answer` once that entry is durable. False when the
    /// store refused (the replier has the error).
    async fn remove(
        &mut self,
        user: &str,
        how: Removal<'_>,
        replier: Replier,
        answer: Value,
    ) -> bool {
        if let Err(e) = self.svc.store.remove_member(&self.channel.name, user).await {
            replier.send(&self.svc, Err(e.into())).await;
            return false;
        }
        self.members.remove(user);
        let room_is_public = self
            .room
            .as_ref()
            .is_some_and(|r| r.kind == RoomKind::Public);
        if matches!(how, Removal::Left) && !self.records_membership() {
            // A leave in a room without membership entries: nothing to push.
            if !room_is_public {
                self.log.unsubscribe_user(user).await;
            }
            replier.send(&self.svc, Ok(answer)).await;
            return true;
        }
        let mut e = self.room_entry(EntryKind::Left, Some(user.to_string()));
        if let Removal::Kicked { by: Some(by) } = how {
            e.data = Some(json!({"by": by}));
        }
        // A removed user stops receiving a private room's traffic once the
        // `left` entry (which they do see) is delivered.
        let after = if room_is_public {
            After::Nothing
        } else {
            After::Removed(user.to_string())
        };
        self.enqueue(e, replier, Some(answer), None, after);
        true
    }
}

impl Message<Invite> for RoomActor {
    type Reply = ();
    async fn handle(&mut self, m: Invite, _: &mut Context<Self, ()>) {
        self.last_used = Instant::now();
        let r = self.invite(m.by.as_deref(), &m.user).await;
        m.replier
            .send(&self.svc, r.map(|_| json!({"invited": m.user})))
            .await;
    }
}

impl RoomActor {
    async fn invite(&mut self, by: Option<&str>, user: &str) -> Result<(), Fail> {
        let room = self.require_room()?.clone();
        if room.kind == RoomKind::Direct {
            return Err(Fail::new(
                ErrorCode::WrongRoomKind,
                "a direct room has exactly two members",
            ));
        }
        if let Some(by) = by {
            if !self.is_member(by) {
                return Err(Fail::new(ErrorCode::NotMember, "only members may invite"));
            }
        }
        if !chorus_protocol::valid_id(user) {
            return Err(Fail::new(ErrorCode::InvalidValue, "invalid user id"));
        }
        if self.is_member(user) {
            return Ok(());
        }
        self.add_member(user, Role::Member, by).await
    }
}

impl Message<Kick> for RoomActor {
    type Reply = ();
    async fn handle(&mut self, m: Kick, _: &mut Context<Self, ()>) {
        self.last_used = Instant::now();
        let r = match self.require_room() {
            Err(f) => Err(f),
            Ok(room) if room.kind == RoomKind::Direct => Err(Fail::new(
                ErrorCode::WrongRoomKind,
                "nobody can be removed from a direct room",
            )),
            Ok(_) => match &m.by {
                Some(by) if self.members.get(by).is_none_or(|mb| mb.role != Role::Owner) => {
                    Err(Fail::new(
                        ErrorCode::Forbidden,
                        "only the room's owner may remove members",
                    ))
                }
                _ => self.removable(&m.user),
            },
        };
        match r {
            Err(f) => m.replier.send(&self.svc, Err(f)).await,
            Ok(()) => {
                let by = m.by.as_deref().or(Some("server"));
                let answer = json!({"removed": m.user});
                self.remove(&m.user, Removal::Kicked { by }, m.replier, answer)
                    .await;
            }
        }
    }
}

impl Message<Members> for RoomActor {
    type Reply = Result<Vec<Member>, Fail>;
    async fn handle(&mut self, m: Members, _: &mut Context<Self, Self::Reply>) -> Self::Reply {
        self.last_used = Instant::now();
        self.check_read(m.user.as_deref())?;
        let mut v: Vec<Member> = self.members.values().cloned().collect();
        v.sort_by(|a, b| a.user.cmp(&b.user));
        Ok(v)
    }
}
