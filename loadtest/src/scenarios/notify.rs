//! `notify`: bursts of notifications sent through the server API
//! (`POST /api/v1/notifications`, `x-api-key`) to many connected users.
//!
//! User `u` is connection `u` and belongs to worker `u mod W`, which also
//! sends its users' notifications, `--batch` users per request. Each
//! notification carries its send time in `data.t_ns` and this run's type, so
//! a user counts exactly the notifications meant for it: distinct ids
//! delivered, duplicates, and at the end the ones that never came.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use parking_lot::Mutex;
use serde::Deserialize;
use serde_json::json;

use crate::cli::NotifyArgs;
use crate::client::{close_all, Conn, PushHandler};
use crate::http::ApiClient;
use crate::stats::{Counter, Lat, Stats};
use crate::sys;
use crate::tracker::Completion;
use crate::wire::Incoming;
use crate::workers::{Heads, WorkerCtx};

const API_PATH: &str = "/api/v1/notifications";

/// One user's inbox as the harness sees it.
struct Inbox {
    ids: Mutex<HashSet<u64>>,
    received: AtomicU64,
    counted: AtomicBool,
}

impl Inbox {
    fn count_done(&self, done: &Completion) {
        if !self.counted.swap(true, Ordering::AcqRel) {
            done.done();
        }
    }
}

struct Recipient {
    inbox: Arc<Inbox>,
    /// This run's notification type: anything else is someone else's.
    kind: String,
    expected: u64,
    done: Arc<Completion>,
    stats: Arc<Stats>,
}

impl PushHandler for Recipient {
    fn on_push(&mut self, push: &Incoming) {
        if push.push.as_deref() != Some("notifications") {
            return;
        }
        self.stats.incr(Counter::NotifPushes);
        let Some(items) = push.data.as_ref().and_then(|d| d.items.as_ref()) else {
            return;
        };
        for n in items.iter().filter(|n| n.kind == self.kind) {
            if !self.inbox.ids.lock().insert(n.id) {
                self.stats.incr(Counter::NotifDuplicates);
                continue;
            }
            self.stats.incr(Counter::NotifDelivered);
            self.stats.mark_event();
            match n.data.and_then(|d| d.t_ns) {
                Some(t_ns) => self.stats.record_us(
                    Lat::NotifyDelivery,
                    sys::now_ns().saturating_sub(t_ns) / 1000,
                ),
                None => self
                    .stats
                    .error("notification without the harness's data.t_ns"),
            }
            if self.inbox.received.fetch_add(1, Ordering::AcqRel) + 1 >= self.expected {
                self.inbox.count_done(&self.done);
            }
        }
    }

    fn on_close(&mut self) {
        self.inbox.count_done(&self.done);
    }
}

#[derive(Deserialize)]
struct Created {
    #[serde(default)]
    ids: Vec<serde_json::Value>,
}

pub async fn run(mut ctx: WorkerCtx, a: NotifyArgs) -> anyhow::Result<()> {
    let kind = format!("loadtest.{}", ctx.run_id());
    let expected = a.bursts * a.per_user;
    let my_users: Vec<u64> = (0..a.users).filter(|u| ctx.mine(*u)).collect();
    let done = Arc::new(Completion::new(my_users.len() as u64));
    let mut items = Vec::new();
    let mut inboxes = Vec::new();
    for &u in &my_users {
        let who = ctx.identity(u, &format!("{}-n{u}", ctx.run_id()))?;
        let inbox = Arc::new(Inbox {
            ids: Mutex::new(HashSet::new()),
            received: AtomicU64::new(0),
            counted: AtomicBool::new(expected == 0),
        });
        if expected == 0 {
            done.done();
        }
        let handler = Recipient {
            inbox: inbox.clone(),
            kind: kind.clone(),
            expected,
            done: done.clone(),
            stats: ctx.stats.clone(),
        };
        inboxes.push(inbox);
        items.push((u, who, handler));
    }
    let opened = ctx.open_many(items, 0.0, None, false).await;
    let mut conns: Vec<Arc<Conn>> = Vec::new();
    let mut reachable: Vec<String> = Vec::new();
    let mut live_inboxes = Vec::new();
    for (conn, inbox) in opened.into_iter().zip(inboxes) {
        match conn {
            Some(c) => {
                reachable.push(c.user.clone());
                conns.push(c);
                live_inboxes.push(inbox);
            }
            // Nobody will receive this user's notifications.
            None => inbox.count_done(&done),
        }
    }

    ctx.ready().await?;

    let api_timeout = Duration::from_secs_f64(ctx.spec().common.request_timeout_secs);
    let mut clients: Vec<ApiClient> = (0..a.api_concurrency)
        .map(|i| {
            ApiClient::new(
                ctx.placement.target(i as u64),
                &ctx.spec().common.api_key,
                api_timeout,
            )
        })
        .collect();
    let start = Instant::now();
    for b in 0..a.bursts {
        tokio::time::sleep_until((start + Duration::from_millis(b * a.interval_ms)).into()).await;
        let mut bodies = Vec::new();
        for k in 0..a.per_user {
            for chunk in reachable.chunks(a.batch as usize) {
                bodies.push(json!({
                    "users": chunk,
                    "type": kind,
                    "title": format!("burst {b} #{k}"),
                    "priority": a.priority,
                    "data": { "t_ns": 0 },
                }));
            }
        }
        send_burst(&mut clients, bodies, &ctx.stats).await;
    }

    ctx.ran(Heads::new()).await?;
    done.wait(ctx.drain_limit()).await;
    for inbox in &live_inboxes {
        let got = inbox.received.load(Ordering::Acquire).min(expected);
        ctx.stats.add(Counter::NotifExpected, expected);
        ctx.stats.add(Counter::NotifLost, expected - got);
    }
    close_all(conns).await;
    Ok(())
}

/// Sends one burst's requests over the API clients, each client taking every
/// `clients.len()`-th request in turn.
async fn send_burst(clients: &mut [ApiClient], bodies: Vec<serde_json::Value>, stats: &Stats) {
    let n = clients.len().max(1);
    let mut queues: Vec<Vec<serde_json::Value>> = vec![Vec::new(); n];
    for (i, b) in bodies.into_iter().enumerate() {
        queues[i % n].push(b);
    }
    futures_util::stream::iter(clients.iter_mut().zip(queues))
        .for_each_concurrent(None, |(client, queue)| async move {
            for mut body in queue {
                // Stamped when it leaves, not when the burst was planned.
                body["data"]["t_ns"] = json!(sys::now_ns());
                let sent = Instant::now();
                match client.post_json(API_PATH, &body).await {
                    Ok(resp) => {
                        stats.record(Lat::NotifyApi, sent.elapsed());
                        match serde_json::from_slice::<Created>(&resp) {
                            Ok(c) => stats.add(Counter::NotifCreated, c.ids.len() as u64),
                            Err(_) => stats.error("notify api: unexpected response body"),
                        }
                    }
                    Err(e) => {
                        stats.incr(Counter::ApiErrors);
                        stats.error(e.cause("notify api"));
                    }
                }
            }
        })
        .await;
}
