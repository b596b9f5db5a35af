//! `chat`: many small rooms (direct rooms for 2 members, group rooms above),
//! each member sending messages at a steady rate, sometimes typing first,
//! sometimes marking what it received as read.
//!
//! A room and all its members live in one worker (room `r` in worker
//! `r mod W`; member `m` is connection `r*K + m`), so typing and read
//! receipts are timed on one clock. Measured: message delivery to the other
//! members, typing indicator latency, read receipt latency; entries are
//! tracked per offset for loss, duplicates and order as in fanout.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chorus_protocol::ops::{Published, SendMessage, Subscribed};
use chorus_protocol::RoomInfo;
use futures_util::StreamExt;
use parking_lot::Mutex;
use serde_json::json;
use tokio::sync::mpsc;

use super::delivery::{self, Drain, SubState};
use crate::auth::Identity;
use crate::cli::ChatArgs;
use crate::client::{close_all, Conn, PushHandler};
use crate::stats::{Counter, Lat, Stats};
use crate::sys;
use crate::tracker::Completion;
use crate::wire::Incoming;
use crate::workers::{Faults, Heads, WorkerCtx};

/// Read markers a member has yet to send, at most.
const READ_QUEUE: usize = 64;

/// What the members of one room share: when each typed and read, so the
/// others can time what they see.
#[derive(Default)]
struct RoomShared {
    /// User → when each of its `room.typing` requests was sent.
    typing: Mutex<HashMap<String, Vec<Instant>>>,
    /// (reader, offset) → when the read marker was sent.
    reads: Mutex<HashMap<(String, u64), Instant>>,
}

struct Member {
    me: String,
    state: Arc<SubState>,
    drain: Arc<Drain>,
    stats: Arc<Stats>,
    faults: Arc<Faults>,
    room: Arc<RoomShared>,
    receipts: Arc<Completion>,
    read_prob: f64,
    reads: mpsc::Sender<u64>,
    /// Who this member currently sees typing (the last `typing` push).
    shown: HashSet<String>,
    /// When each user last disappeared from the typing list, as seen here.
    gone_at: HashMap<String, Instant>,
}

impl Member {
    /// The server pushes `typing` when the set of typers changes, so a
    /// sighting is a user appearing in it; it was caused by that user's first
    /// `room.typing` after it last disappeared.
    fn on_typing(&mut self, users: &[String]) {
        let now = Instant::now();
        let current: HashSet<String> = users.iter().filter(|u| **u != self.me).cloned().collect();
        for gone in self.shown.difference(&current) {
            self.gone_at.insert(gone.clone(), now);
        }
        for u in current.difference(&self.shown) {
            let since = self.gone_at.get(u).copied();
            let cause = self
                .room
                .typing
                .lock()
                .get(u)
                .and_then(|times| times.iter().copied().find(|t| since.is_none_or(|g| *t > g)));
            if let Some(at) = cause {
                self.stats
                    .record(Lat::Typing, now.saturating_duration_since(at));
                self.stats.incr(Counter::TypingSeen);
            }
        }
        self.shown = current;
    }
}

impl PushHandler for Member {
    fn on_push(&mut self, push: &Incoming) {
        match push.push.as_deref() {
            Some("entry") => {
                let new = delivery::on_entry(
                    push,
                    &self.me,
                    &self.state,
                    &self.drain,
                    &self.stats,
                    &self.faults,
                );
                let from_other = push
                    .data
                    .as_ref()
                    .and_then(|d| d.sender.as_deref())
                    .is_some_and(|s| s != self.me);
                if let (Some(offset), true) = (new, from_other) {
                    if self.read_prob > 0.0 && rand::random::<f64>() < self.read_prob {
                        // A full queue means the member is behind on reads; it skips this one.
                        let _ = self.reads.try_send(offset);
                    }
                }
            }
            Some("typing") => {
                if let Some(users) = push.data.as_ref().and_then(|d| d.users.as_ref()) {
                    self.on_typing(users);
                }
            }
            Some("receipt") => {
                let Some(d) = push.data.as_ref() else { return };
                let (Some(user), Some(offset)) = (d.user.as_ref(), d.offset) else {
                    return;
                };
                if *user == self.me {
                    return;
                }
                let sent = self.room.reads.lock().get(&(user.clone(), offset)).copied();
                if let Some(at) = sent {
                    self.stats.record(Lat::Receipt, at.elapsed());
                    self.stats.incr(Counter::ReceiptsSeen);
                    self.receipts.done();
                }
            }
            _ => {}
        }
    }

    fn on_close(&mut self) {
        delivery::on_closed(&self.state, &self.drain);
    }
}

/// One member, set up.
struct Seat {
    conn: Arc<Conn>,
    /// Handed to the member's loop when the load starts.
    reads: Option<mpsc::Receiver<u64>>,
}

/// One room, set up.
struct Room {
    id: String,
    shared: Arc<RoomShared>,
    seats: Vec<Seat>,
}

pub async fn run(mut ctx: WorkerCtx, a: ChatArgs) -> anyhow::Result<()> {
    let my_rooms: Vec<u64> = (0..a.rooms).filter(|r| ctx.mine(*r)).collect();
    let drain = Arc::new(Drain::new(my_rooms.len() as u64 * a.room_size));
    let receipts = Arc::new(Completion::new(0));
    let mut wanted = Vec::new();
    for &r in &my_rooms {
        let mut members = Vec::new();
        for m in 0..a.room_size {
            let index = r * a.room_size + m;
            members.push((
                index,
                ctx.identity(index, &format!("{}-r{r}m{m}", ctx.run_id()))?,
            ));
        }
        wanted.push((r, members));
    }
    let states: Vec<Vec<Arc<SubState>>> = wanted
        .iter()
        .map(|(_, m)| m.iter().map(|_| Arc::new(SubState::default())).collect())
        .collect();
    let conc = (ctx.spec().common.concurrency / a.room_size as usize).max(1);
    let rooms: Vec<Room> = {
        let (ctx, drain, receipts, a) = (&ctx, &drain, &receipts, &a);
        let jobs: Vec<_> = wanted.into_iter().zip(states.iter().cloned()).collect();
        futures_util::stream::iter(jobs)
            .map(|((r, members), states)| async move {
                let room = setup_room(ctx, a, r, members, &states, drain, receipts).await;
                if room.is_none() {
                    for s in &states {
                        delivery::on_closed(s, drain);
                    }
                }
                room
            })
            .buffer_unordered(conc)
            .filter_map(|r| async move { r })
            .collect()
            .await
    };

    ctx.ready().await?;

    let start = Instant::now();
    let end = start + Duration::from_secs_f64(a.duration_secs);
    let mut rooms = rooms;
    let mut tasks = Vec::new();
    for room in &mut rooms {
        let peers = room.seats.len() as u64 - 1;
        for seat in &mut room.seats {
            let Some(reads) = seat.reads.take() else {
                continue;
            };
            let member = MemberLoop {
                conn: seat.conn.clone(),
                room_id: room.id.clone(),
                shared: room.shared.clone(),
                receipts: receipts.clone(),
                peers,
                stats: ctx.stats.clone(),
            };
            tasks.push(member.run(a.clone(), start, end, reads));
        }
    }
    let finished = futures_util::future::join_all(tasks).await;
    let mut heads = Heads::new();
    let mut leftovers = Vec::new();
    for (head, member, reads) in finished {
        if let Some((channel, offset)) = head {
            let h = heads.entry(channel).or_default();
            *h = (*h).max(offset);
        }
        leftovers.push((member, reads));
    }

    let heads = ctx.ran(heads).await?;
    let all_states: Vec<Arc<SubState>> = states.into_iter().flatten().collect();
    let drain_limit = ctx.drain_limit();
    let drain_start = Instant::now();
    drain.finish(&all_states, &heads, drain_limit).await;
    // Deliveries are over, so no new reads will be asked for: send the queued ones.
    futures_util::future::join_all(leftovers.iter_mut().map(|(member, reads)| async move {
        while let Ok(offset) = reads.try_recv() {
            member.send_read(offset).await;
        }
    }))
    .await;
    receipts
        .wait(drain_limit.saturating_sub(drain_start.elapsed()))
        .await;
    delivery::settle(&all_states, &ctx.stats);
    let conns: Vec<Arc<Conn>> = rooms
        .iter()
        .flat_map(|r| r.seats.iter().map(|s| s.conn.clone()))
        .collect();
    close_all(conns).await;
    Ok(())
}

/// Connects a room's members, creates the room, subscribes everyone.
async fn setup_room(
    ctx: &WorkerCtx,
    a: &ChatArgs,
    r: u64,
    members: Vec<(u64, Identity)>,
    states: &[Arc<SubState>],
    drain: &Arc<Drain>,
    receipts: &Arc<Completion>,
) -> Option<Room> {
    let shared = Arc::new(RoomShared::default());
    let mut seats = Vec::new();
    let users: Vec<String> = members.iter().map(|(_, who)| who.user.clone()).collect();
    for ((index, who), state) in members.iter().zip(states) {
        let (tx, rx) = mpsc::channel(READ_QUEUE);
        let handler = Member {
            me: who.user.clone(),
            state: state.clone(),
            drain: drain.clone(),
            stats: ctx.stats.clone(),
            faults: ctx.faults.clone(),
            room: shared.clone(),
            receipts: receipts.clone(),
            read_prob: a.read,
            reads: tx,
            shown: HashSet::new(),
            gone_at: HashMap::new(),
        };
        match ctx.connect(*index, who, handler).await {
            Ok(conn) => seats.push(Seat {
                conn,
                reads: Some(rx),
            }),
            Err(_) => {
                close_all(seats.into_iter().map(|s| s.conn)).await;
                return None;
            }
        }
    }
    let owner = &seats[0].conn;
    let info: Result<RoomInfo, _> = if a.room_size == 2 {
        owner
            .request("room.direct", &json!({ "user": users[1] }))
            .await
    } else {
        let room = format!("{}-g{r}", ctx.run_id());
        owner
            .request(
                "room.create",
                &json!({ "kind": "group", "room": room, "members": &users[1..] }),
            )
            .await
    };
    let Ok(info) = info else {
        close_all(seats.into_iter().map(|s| s.conn)).await;
        return None;
    };
    let channel = format!("room:{}", info.id);
    for (seat, state) in seats.iter().zip(states) {
        let sub: Result<Subscribed, _> = seat
            .conn
            .request("subscribe", &json!({ "channel": channel }))
            .await;
        match sub {
            Ok(s) => state.tracker.lock().channel(&s.channel).set_start(s.offset),
            Err(_) => {
                close_all(seats.into_iter().map(|s| s.conn)).await;
                return None;
            }
        }
    }
    Some(Room {
        id: info.id,
        shared,
        seats,
    })
}

struct MemberLoop {
    conn: Arc<Conn>,
    room_id: String,
    shared: Arc<RoomShared>,
    receipts: Arc<Completion>,
    peers: u64,
    stats: Arc<Stats>,
}

impl MemberLoop {
    /// Sends this member's messages on schedule, answering reads meanwhile.
    /// Returns the highest offset it wrote, itself, and its read queue.
    async fn run(
        self,
        a: ChatArgs,
        start: Instant,
        end: Instant,
        mut reads: mpsc::Receiver<u64>,
    ) -> (Option<(String, u64)>, MemberLoop, mpsc::Receiver<u64>) {
        let interval = 1.0 / a.rate;
        let phase = rand::random::<f64>() * interval;
        let mut head: Option<(String, u64)> = None;
        for k in 0..a.messages {
            let due = start + Duration::from_secs_f64(phase + k as f64 * interval);
            if due >= end || !self.conn.is_up() {
                break;
            }
            loop {
                tokio::select! {
                    biased;
                    _ = tokio::time::sleep_until(due.into()) => break,
                    Some(offset) = reads.recv() => self.send_read(offset).await,
                }
            }
            if a.typing > 0.0 && rand::random::<f64>() < a.typing {
                self.shared
                    .typing
                    .lock()
                    .entry(self.conn.user.clone())
                    .or_default()
                    .push(Instant::now());
                self.stats.incr(Counter::TypingSent);
                // A refused typing indicator is counted; the message still goes.
                let _ = self
                    .conn
                    .request_value("room.typing", &json!({ "room": self.room_id }))
                    .await;
            }
            let args = SendMessage {
                room: self.room_id.clone(),
                text: format!("message {k}"),
                attachments: Some(json!({ "t_ns": sys::now_ns() })),
                reply_to: None,
                client_id: None,
            };
            self.stats.incr(Counter::Sent);
            let sent = Instant::now();
            let r: Result<Published, _> = self.conn.request("room.send", &args).await;
            if let Ok(p) = r {
                self.stats.record(Lat::PublishAck, sent.elapsed());
                self.stats.incr(Counter::Acked);
                match &mut head {
                    Some((_, h)) => *h = (*h).max(p.offset),
                    None => head = Some((p.channel, p.offset)),
                }
            }
        }
        (head, self, reads)
    }

    async fn send_read(&self, offset: u64) {
        if !self.conn.is_up() {
            return;
        }
        // Announce the receipts before they can arrive.
        for _ in 0..self.peers {
            self.receipts.add();
        }
        self.shared
            .reads
            .lock()
            .insert((self.conn.user.clone(), offset), Instant::now());
        self.stats.incr(Counter::ReadsSent);
        let reply = self
            .conn
            .request_value(
                "room.read",
                &json!({ "room": self.room_id, "offset": offset }),
            )
            .await;
        // The marker only moves forward, and only a move is pushed as a receipt:
        // after a refused read, or one behind the marker (the member's own
        // later message moved it), none will come.
        let moved = reply.is_ok_and(|v| v.get("offset").and_then(|o| o.as_u64()) == Some(offset));
        if moved {
            self.stats.add(Counter::ReceiptsExpected, self.peers);
        } else {
            for _ in 0..self.peers {
                self.receipts.done();
            }
        }
    }
}
