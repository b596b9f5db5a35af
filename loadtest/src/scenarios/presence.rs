//! `presence`: users that connect, stay a while, disconnect, and come back,
//! each watched by several others (`presence.watch`).
//!
//! A user and its watchers form a group that lives in one worker (group `g`
//! in worker `g mod W`; watcher `k` is connection `g*K + k`, the user is
//! connection `U*K + g`), so a change and its sightings are timed on one
//! clock. Each change waits until every watcher saw it (or the change
//! timeout passed: a miss) before the next one, so every sighting is of a
//! known change. Online is timed from the start of the user's connection
//! attempt, offline from the start of its close.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use serde_json::json;
use tokio::sync::Notify;

use futures_util::StreamExt;

use crate::cli::PresenceArgs;
use crate::client::{close_all, Conn, IgnorePushes, PushHandler};
use crate::stats::{Counter, Lat, Stats};
use crate::wire::Incoming;
use crate::workers::{Heads, WorkerCtx};

/// The change watchers are waiting for.
struct Expect {
    status: &'static str,
    at: Instant,
    /// Numbers changes, so each watcher counts each change once.
    generation: u64,
    seen: u64,
}

struct Group {
    user: String,
    expect: Mutex<Expect>,
    changed: Notify,
}

impl Group {
    /// Announces a change; returns its generation.
    fn announce(&self, status: &'static str) -> u64 {
        let mut e = self.expect.lock();
        e.generation += 1;
        e.status = status;
        e.at = Instant::now();
        e.seen = 0;
        e.generation
    }

    /// Waits until `watchers` saw generation `generation`, at most `limit`; returns how many did.
    async fn wait_seen(&self, generation: u64, watchers: u64, limit: Duration) -> u64 {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let seen = {
                let e = self.expect.lock();
                if e.generation == generation {
                    e.seen
                } else {
                    0
                }
            };
            if seen >= watchers {
                return seen;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                let e = self.expect.lock();
                return if e.generation == generation {
                    e.seen
                } else {
                    0
                };
            }
        }
    }
}

struct Watcher {
    group: Arc<Group>,
    watchers: u64,
    last_generation: u64,
    stats: Arc<Stats>,
}

impl PushHandler for Watcher {
    fn on_push(&mut self, push: &Incoming) {
        if push.push.as_deref() != Some("presence") {
            return;
        }
        let Some(d) = push.data.as_ref() else { return };
        if d.user.as_deref() != Some(self.group.user.as_str()) {
            return;
        }
        let mut e = self.group.expect.lock();
        if d.status.as_deref() == Some(e.status) && self.last_generation < e.generation {
            self.last_generation = e.generation;
            let lat = if e.status == "online" {
                Lat::Online
            } else {
                Lat::Offline
            };
            self.stats.record(lat, e.at.elapsed());
            self.stats.incr(Counter::PresenceSeen);
            e.seen += 1;
            if e.seen >= self.watchers {
                self.group.changed.notify_waiters();
            }
        } else {
            self.stats.incr(Counter::PresenceOther);
        }
    }
}

pub async fn run(mut ctx: WorkerCtx, a: PresenceArgs) -> anyhow::Result<()> {
    let run_id = ctx.run_id().to_string();
    let my_groups: Vec<u64> = (0..a.users).filter(|g| ctx.mine(*g)).collect();
    let mut groups = Vec::new();
    let mut watcher_items = Vec::new();
    for &g in &my_groups {
        let user_index = a.users * a.watchers + g;
        let user = ctx.identity(user_index, &format!("{run_id}-p{g}"))?;
        let group = Arc::new(Group {
            user: user.user.clone(),
            expect: Mutex::new(Expect {
                status: "offline",
                at: Instant::now(),
                generation: 0,
                seen: 0,
            }),
            changed: Notify::new(),
        });
        for k in 0..a.watchers {
            let index = g * a.watchers + k;
            watcher_items.push((
                index,
                ctx.identity(index, &format!("{run_id}-p{g}w{k}"))?,
                group.clone(),
            ));
        }
        groups.push((user_index, user, group));
    }

    // Watchers connect and watch their user.
    let watched: HashMap<u64, String> = watcher_items
        .iter()
        .map(|(i, _, group)| (*i, group.user.clone()))
        .collect();
    let items = watcher_items
        .into_iter()
        .map(|(i, who, group)| {
            let handler = Watcher {
                group,
                watchers: a.watchers,
                last_generation: 0,
                stats: ctx.stats.clone(),
            };
            (i, who, handler)
        })
        .collect();
    let watchers: Vec<Arc<Conn>> = ctx
        .open_many(items, 0.0, None, false)
        .await
        .into_iter()
        .flatten()
        .collect();
    let conc = ctx.spec().common.concurrency.max(1);
    futures_util::stream::iter(watchers.iter())
        .for_each_concurrent(conc, |w| {
            let user = watched.get(&w.index).cloned().unwrap_or_default();
            async move {
                // A refused watch shows up as errors and missed changes.
                let _ = w
                    .request_value("presence.watch", &json!({ "users": [user] }))
                    .await;
            }
        })
        .await;

    ctx.ready().await?;

    let timeout = Duration::from_secs_f64(a.change_timeout_secs);
    futures_util::future::join_all(
        groups
            .iter()
            .map(|(index, who, group)| churn(&ctx, *index, who, group, &a, timeout)),
    )
    .await;

    ctx.ran(Heads::new()).await?;
    close_all(watchers).await;
    Ok(())
}

/// One user's connect / disconnect cycles.
async fn churn(
    ctx: &WorkerCtx,
    index: u64,
    who: &crate::auth::Identity,
    group: &Group,
    a: &PresenceArgs,
    timeout: Duration,
) {
    let stats = &ctx.stats;
    let account = |seen: u64| {
        stats.add(Counter::PresenceExpected, a.watchers);
        stats.add(Counter::PresenceMissed, a.watchers.saturating_sub(seen));
    };
    for _ in 0..a.cycles {
        let generation = group.announce("online");
        let Ok(conn) = ctx.connect(index, who, IgnorePushes).await else {
            account(0);
            continue;
        };
        account(group.wait_seen(generation, a.watchers, timeout).await);
        tokio::time::sleep(Duration::from_millis(a.online_ms)).await;

        let generation = group.announce("offline");
        conn.close().await;
        account(group.wait_seen(generation, a.watchers, timeout).await);
        tokio::time::sleep(Duration::from_millis(a.offline_ms)).await;
    }
}
