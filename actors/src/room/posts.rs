//! A room's traffic: publish, edit or delete, history access, subscribe,
//! typing, read receipts and the per-user summary.

use super::*;

/// Append a chat message (`kind: Message`) or a publication (`kind: Publish`).
#[derive(serde::Serialize, serde::Deserialize)]
pub struct Publish {
    /// The author; `None` for the server API publishing on its own behalf.
    pub sender: Option<String>,
    /// Whether the sender's membership is checked (clients: yes; server API: no).
    pub as_client: bool,
    pub kind: EntryKind,
    pub text: Option<String>,
    pub attachments: Option<Value>,
    pub reply_to: Option<u64>,
    pub data: Option<Value>,
    pub client_id: Option<String>,
    pub replier: Replier,
}

#[derive(serde::Serialize, serde::Deserialize)]
pub struct Edit {
    pub user: String,
    pub offset: u64,
    /// `None` deletes.
    pub text: Option<String>,
    pub replier: Replier,
}

/// Check read access; returns the committed head (history is then read by the caller).
#[derive(serde::Serialize, serde::Deserialize)]
pub struct Authorize {
    pub user: Option<String>,
}

#[derive(serde::Serialize, serde::Deserialize)]
pub struct Subscribe {
    pub user: String,
    pub conn: ConnAddr,
    pub from: Option<(u64, Option<String>)>,
    pub req_id: u64,
}

#[derive(serde::Serialize, serde::Deserialize)]
pub struct Unsubscribe {
    pub conn: ConnAddr,
}

#[derive(serde::Serialize, serde::Deserialize)]
pub struct Typing {
    pub user: String,
}

#[derive(serde::Serialize, serde::Deserialize)]
pub struct Read {
    pub user: String,
    pub offset: u64,
    pub replier: Replier,
}

/// This user's view of the room: head, read marker, unread count.
#[derive(serde::Serialize, serde::Deserialize)]
pub struct Summary {
    pub user: String,
}

pub(super) struct TypingExpire;

impl Message<Publish> for RoomActor {
    type Reply = ();
    async fn handle(&mut self, m: Publish, _: &mut Context<Self, ()>) {
        self.last_used = Instant::now();
        // `publish` has replied itself, on failure as on success.
        let _ = self.publish(m).await;
    }
}

impl RoomActor {
    async fn publish(&mut self, m: Publish) -> Result<(), ()> {
        let Publish {
            sender,
            as_client,
            kind,
            text,
            attachments,
            reply_to,
            data,
            client_id,
            replier,
        } = m;
        // One rule for every path (socket sends, topic publishes, the server API).
        if client_id
            .as_ref()
            .is_some_and(|c| c.is_empty() || c.len() > MAX_CLIENT_ID)
        {
            let f = Fail::new(ErrorCode::InvalidValue, "client_id must be 1..=128 bytes");
            replier.send(&self.svc, Err(f)).await;
            return Err(());
        }
        let check = if as_client {
            self.check_post(sender.as_deref())
        } else {
            self.require_room_or_any()
        };
        if let Err(f) = check {
            replier.send(&self.svc, Err(f)).await;
            return Err(());
        }
        let head = match self.ensure_channel().await {
            Ok(h) => h,
            Err(f) => {
                replier.send(&self.svc, Err(f)).await;
                return Err(());
            }
        };
        if let Some(r) = reply_to {
            // A thread hangs off a chat message, not off a join, an edit or a publication.
            let target = if r == 0 || r > head.offset {
                Ok(None)
            } else {
                self.svc
                    .store
                    .get_entry(&self.key, r)
                    .await
                    .map_err(Fail::from)
            };
            match target {
                Ok(Some(e)) if e.kind == EntryKind::Message => {}
                Ok(_) => {
                    replier
                        .send(
                            &self.svc,
                            Err(Fail::new(
                                ErrorCode::MessageNotFound,
                                "reply_to: no such message",
                            )),
                        )
                        .await;
                    return Err(());
                }
                Err(f) => {
                    replier.send(&self.svc, Err(f)).await;
                    return Err(());
                }
            }
        }
        let replier = match &client_id {
            Some(cid) => match self.log.dedupe(sender.as_deref(), cid, replier).await {
                Some(r) => r,
                None => return Ok(()),
            },
            None => replier,
        };
        let mut e = self.room_entry(kind, sender);
        e.text = text;
        e.attachments = attachments;
        e.reply_to = reply_to;
        e.data = data;
        e.client_id = client_id;
        self.enqueue(e, replier, None, None, After::Nothing);
        Ok(())
    }

    /// The server API may publish to a room (if it exists), a topic or a feed.
    fn require_room_or_any(&self) -> Result<(), Fail> {
        if self.channel.kind == ChannelKind::Room {
            self.require_room().map(|_| ())
        } else {
            Ok(())
        }
    }
}

impl Message<Edit> for RoomActor {
    type Reply = ();
    async fn handle(&mut self, m: Edit, _: &mut Context<Self, ()>) {
        self.last_used = Instant::now();
        match self.prepare_edit(&m.user, m.offset, m.text).await {
            Ok((log_entry, rewritten)) => {
                self.enqueue(log_entry, m.replier, None, Some(rewritten), After::Nothing)
            }
            Err(f) => m.replier.send(&self.svc, Err(f)).await,
        }
    }
}

impl RoomActor {
    async fn prepare_edit(
        &mut self,
        user: &str,
        offset: u64,
        text: Option<String>,
    ) -> Result<(Entry, Entry), Fail> {
        self.check_post(Some(user))?;
        let head = self.ensure_channel().await?;
        if offset == 0 || offset > head.offset {
            return Err(Fail::new(
                ErrorCode::MessageNotFound,
                "no message at that offset",
            ));
        }
        let mut original = self
            .svc
            .store
            .get_entry(&self.key, offset)
            .await?
            .filter(|e| e.kind == EntryKind::Message && !e.deleted)
            .ok_or_else(|| Fail::new(ErrorCode::MessageNotFound, "no message at that offset"))?;
        if original.sender.as_deref() != Some(user) {
            return Err(Fail::new(
                ErrorCode::NotAuthor,
                "only the author may change a message",
            ));
        }
        let now = now_ms();
        let kind = if text.is_some() {
            EntryKind::Edit
        } else {
            EntryKind::Delete
        };
        let mut log_entry = self.room_entry(kind, Some(user.to_string()));
        log_entry.target = Some(offset);
        log_entry.text = text.clone();
        match text {
            Some(t) => {
                original.text = Some(t);
                original.edited_at = Some(now);
            }
            None => {
                original.text = None;
                original.attachments = None;
                original.deleted = true;
                original.edited_at = Some(now);
            }
        }
        Ok((log_entry, original))
    }
}

impl Message<Authorize> for RoomActor {
    type Reply = Result<ChannelHead, Fail>;
    async fn handle(&mut self, m: Authorize, _: &mut Context<Self, Self::Reply>) -> Self::Reply {
        self.last_used = Instant::now();
        self.check_read(m.user.as_deref())?;
        match self.log.head() {
            Some(h) => Ok(h.clone()),
            None if self.channel.kind == ChannelKind::Room => self.ensure_channel().await,
            None => Ok(ChannelHead {
                epoch: String::new(),
                offset: 0,
                msg_seq: 0,
            }),
        }
    }
}

impl Message<Subscribe> for RoomActor {
    type Reply = ();
    async fn handle(&mut self, m: Subscribe, _: &mut Context<Self, ()>) {
        self.last_used = Instant::now();
        let r = match self.check_read(Some(&m.user)) {
            Ok(()) => {
                self.subscribe_conn(m.user, m.conn.clone(), m.from, m.req_id)
                    .await
            }
            Err(f) => Err(f),
        };
        if let Err(f) = r {
            Replier::Conn {
                conn: m.conn,
                id: m.req_id,
            }
            .send(&self.svc, Err(f))
            .await;
        }
    }
}

impl Message<Unsubscribe> for RoomActor {
    type Reply = ();
    async fn handle(&mut self, m: Unsubscribe, _: &mut Context<Self, ()>) {
        self.log.unsubscribe(&m.conn).await;
    }
}

impl Message<Typing> for RoomActor {
    /// Refused like a send: 3002 without the room, 3003 for a non-member.
    type Reply = Result<(), Fail>;
    async fn handle(&mut self, m: Typing, ctx: &mut Context<Self, Self::Reply>) -> Self::Reply {
        self.check_post(Some(&m.user))?;
        let expires = Instant::now() + self.svc.config.typing_ttl;
        let new = self.typing.insert(m.user, expires).is_none();
        if new {
            self.push_typing().await;
        }
        if !self.typing_timer {
            self.typing_timer = true;
            self.svc
                .timers
                .tell_after(ctx.actor_ref(), TypingExpire, self.svc.config.typing_ttl);
        }
        Ok(())
    }
}

impl RoomActor {
    async fn push_typing(&self) {
        let mut users: Vec<String> = self.typing.keys().cloned().collect();
        users.sort();
        let data = to_value(&TypingPush {
            room: self.channel.name.clone(),
            users,
        });
        self.log.push_ephemeral("typing", data).await;
    }
}

impl Message<TypingExpire> for RoomActor {
    type Reply = ();
    async fn handle(&mut self, _: TypingExpire, ctx: &mut Context<Self, ()>) {
        let now = Instant::now();
        let before = self.typing.len();
        self.typing.retain(|_, exp| *exp > now);
        if self.typing.len() != before {
            self.push_typing().await;
        }
        self.typing_timer = false;
        if let Some(next) = self.typing.values().min() {
            self.typing_timer = true;
            self.svc.timers.tell_after(
                ctx.actor_ref(),
                TypingExpire,
                next.saturating_duration_since(now),
            );
        }
    }
}

impl Message<Read> for RoomActor {
    type Reply = ();
    async fn handle(&mut self, m: Read, _: &mut Context<Self, ()>) {
        self.last_used = Instant::now();
        let r = self.mark_read(&m.user, m.offset).await;
        m.replier.send(&self.svc, r).await;
    }
}

impl RoomActor {
    async fn mark_read(&mut self, user: &str, offset: u64) -> Result<Value, Fail> {
        self.check_post(Some(user))?;
        let head = self.ensure_channel().await?;
        if offset > head.offset {
            return Err(Fail::new(
                ErrorCode::InvalidValue,
                "offset is past the room's head",
            ));
        }
        let cur = self.read_marker(user).await?;
        if offset > cur {
            self.svc
                .store
                .set_read_marker(&self.key, user, offset)
                .await?;
            self.markers.insert(user.to_string(), offset);
            let data = to_value(&ReceiptPush {
                room: self.channel.name.clone(),
                user: user.to_string(),
                offset,
            });
            self.log.push_ephemeral("receipt", data).await;
        }
        let (marker, unread) = self.unread(user, &head).await?;
        Ok(json!({"room": self.channel.name, "offset": marker, "unread": unread}))
    }
}

impl Message<Summary> for RoomActor {
    type Reply = Result<RoomSummary, Fail>;
    async fn handle(&mut self, m: Summary, _: &mut Context<Self, Self::Reply>) -> Self::Reply {
        self.check_read(Some(&m.user))?;
        let room = self.require_room()?.clone();
        let head = self.ensure_channel().await?;
        let (read_offset, unread) = self.unread(&m.user, &head).await?;
        Ok(RoomSummary {
            room,
            head,
            read_offset,
            unread,
        })
    }
}
