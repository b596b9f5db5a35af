//! `fanout`: S subscribers in each of R public rooms, P publishers per room.
//!
//! Connection numbers: subscribers `0 .. R*S` (room `i mod R`), then
//! publishers `R*S .. R*S + R*P`. Publishers join their room and then
//! unsubscribe, so they do not receive the load they make. Each message
//! carries its send time (`attachments.t_ns`); with `--rate` that is its
//! scheduled time, so a server (or harness) falling behind shows in the
//! latency instead of hiding it. Subscribers track offsets per room: after
//! the run every worker learns each room's last offset and waits until its
//! subscribers reached it, then counts what was lost or duplicated.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::ensure;
use chorus_protocol::ops::{Published, SendMessage, Subscribed};
use futures_util::stream::FuturesUnordered;
use futures_util::StreamExt;
use serde_json::json;

use super::delivery::{self, Drain, SubState};
use crate::cli::FanoutArgs;
use crate::client::{close_all, Conn, IgnorePushes, PushHandler, RequestError};
use crate::stats::{Counter, Lat, Stats};
use crate::sys;
use crate::wire::Incoming;
use crate::workers::{Faults, Heads, WorkerCtx};

struct Subscriber {
    me: String,
    state: Arc<SubState>,
    drain: Arc<Drain>,
    stats: Arc<Stats>,
    faults: Arc<Faults>,
}

impl PushHandler for Subscriber {
    fn on_push(&mut self, push: &Incoming) {
        if push.push.as_deref() == Some("entry") {
            delivery::on_entry(
                push,
                &self.me,
                &self.state,
                &self.drain,
                &self.stats,
                &self.faults,
            );
        }
    }

    fn on_close(&mut self) {
        delivery::on_closed(&self.state, &self.drain);
    }
}

pub async fn run(mut ctx: WorkerCtx, a: FanoutArgs) -> anyhow::Result<()> {
    let rooms = ctx.plan.setup.rooms.clone();
    ensure!(
        rooms.len() as u64 == a.rooms,
        "the coordinator prepared {} rooms, not {}",
        rooms.len(),
        a.rooms
    );
    let run_id = ctx.run_id().to_string();
    let subs_total = a.rooms * a.subscribers;
    let pubs_total = a.rooms * a.publishers;

    // Subscribers.
    let my_subs: Vec<u64> = (0..subs_total).filter(|i| ctx.mine(*i)).collect();
    let drain = Arc::new(Drain::new(my_subs.len() as u64));
    let mut sub_items = Vec::new();
    for &i in &my_subs {
        sub_items.push((i, ctx.identity(i, &format!("{run_id}-s{i}"))?));
    }
    let states: Vec<Arc<SubState>> = my_subs
        .iter()
        .map(|_| Arc::new(SubState::default()))
        .collect();
    let conc = ctx.spec().common.concurrency.max(1);
    let sub_conns: Vec<Option<Arc<Conn>>> = {
        let ctx = &ctx;
        let drain = &drain;
        let rooms = &rooms;
        futures_util::stream::iter(sub_items.into_iter().zip(states.iter().cloned()))
            .map(|((i, who), state)| async move {
                let room = &rooms[(i % a.rooms) as usize];
                let handler = Subscriber {
                    me: who.user.clone(),
                    state: state.clone(),
                    drain: drain.clone(),
                    stats: ctx.stats.clone(),
                    faults: ctx.faults.clone(),
                };
                let Ok(conn) = ctx.connect(i, &who, handler).await else {
                    delivery::on_closed(&state, drain);
                    return None;
                };
                let channel = format!("room:{room}");
                let sub: Result<Subscribed, RequestError> = if a.join {
                    conn.request("room.join", &json!({ "room": room })).await
                } else {
                    conn.request("subscribe", &json!({ "channel": channel }))
                        .await
                };
                match sub {
                    Ok(s) => {
                        state.tracker.lock().channel(&s.channel).set_start(s.offset);
                        Some(conn)
                    }
                    Err(_) => {
                        conn.close().await;
                        delivery::on_closed(&state, drain);
                        None
                    }
                }
            })
            .buffered(conc)
            .collect()
            .await
    };

    // Publishers.
    let my_pubs: Vec<u64> = (0..pubs_total)
        .filter(|j| ctx.mine(subs_total + *j))
        .collect();
    let mut publishers: Vec<(u64, Arc<Conn>, String)> = Vec::new();
    for &j in &my_pubs {
        let index = subs_total + j;
        let who = ctx.identity(index, &format!("{run_id}-p{j}"))?;
        let Ok(conn) = ctx.connect(index, &who, IgnorePushes).await else {
            continue;
        };
        let room = rooms[(j % a.rooms) as usize].clone();
        if conn
            .request_value("room.join", &json!({ "room": room }))
            .await
            .is_err()
        {
            conn.close().await;
            continue;
        }
        // Still a member, no longer a receiver. If refused, it only costs the harness.
        let _ = conn
            .request_value("unsubscribe", &json!({ "channel": format!("room:{room}") }))
            .await;
        publishers.push((j, conn, room));
    }

    ctx.ready().await?;

    // The load.
    let start = Instant::now();
    let start_ns = sys::now_ns();
    let end = start + Duration::from_secs_f64(a.duration_secs);
    let per_pub_rate = if a.rate > 0.0 {
        a.rate / pubs_total as f64
    } else {
        0.0
    };
    let text = "x".repeat(a.payload_bytes);
    let results = futures_util::future::join_all(publishers.iter().map(|(j, conn, room)| {
        let plan = Plan {
            messages: a.messages,
            rate: per_pub_rate,
            // Stagger publishers evenly within one period.
            phase: if per_pub_rate > 0.0 {
                *j as f64 / a.rate
            } else {
                0.0
            },
            max_inflight: a.max_inflight,
            start,
            start_ns,
            end,
        };
        publish(conn, room, &text, plan, &ctx.stats)
    }))
    .await;
    let mut heads = Heads::new();
    for (channel, head) in results.into_iter().flatten() {
        let h = heads.entry(channel).or_default();
        *h = (*h).max(head);
    }

    let heads = ctx.ran(heads).await?;
    let states_ref = &states;
    drain.finish(states_ref, &heads, ctx.drain_limit()).await;
    delivery::settle(states_ref, &ctx.stats);
    close_all(
        sub_conns
            .into_iter()
            .flatten()
            .chain(publishers.into_iter().map(|(_, c, _)| c)),
    )
    .await;
    Ok(())
}

#[derive(Clone, Copy)]
struct Plan {
    messages: u64,
    /// Messages per second for this publisher; 0: as fast as the window allows.
    rate: f64,
    phase: f64,
    max_inflight: usize,
    start: Instant,
    start_ns: u64,
    end: Instant,
}

/// Sends one publisher's messages; returns its room's channel and the highest offset acknowledged.
async fn publish(
    conn: &Conn,
    room: &str,
    text: &str,
    plan: Plan,
    stats: &Stats,
) -> Option<(String, u64)> {
    let mut inflight = FuturesUnordered::new();
    let mut head: Option<(String, u64)> = None;
    for k in 0..plan.messages {
        let due = if plan.rate > 0.0 {
            plan.start + Duration::from_secs_f64(plan.phase + k as f64 / plan.rate)
        } else {
            Instant::now()
        };
        if due >= plan.end {
            break;
        }
        // Keep the requests in flight moving until this one is due: they
        // advance (and are even sent) only while polled here.
        loop {
            tokio::select! {
                biased;
                Some(r) = inflight.next(), if !inflight.is_empty() => note(r, &mut head),
                _ = tokio::time::sleep_until(due.into()) => break,
            }
        }
        while inflight.len() >= plan.max_inflight {
            let r = inflight.next().await.flatten();
            note(r, &mut head);
        }
        let t_ns = if plan.rate > 0.0 {
            if due.elapsed() > Duration::from_millis(10) {
                stats.incr(Counter::LateSends);
            }
            plan.start_ns + (due - plan.start).as_nanos() as u64
        } else {
            sys::now_ns()
        };
        if !conn.is_up() {
            break;
        }
        let args = SendMessage {
            room: room.to_string(),
            text: text.to_string(),
            attachments: Some(json!({ "t_ns": t_ns })),
            reply_to: None,
            client_id: None,
        };
        stats.incr(Counter::Sent);
        inflight.push(async move {
            let sent = Instant::now();
            let r: Result<Published, _> = conn.request("room.send", &args).await;
            let p = r.ok()?;
            stats.record(Lat::PublishAck, sent.elapsed());
            stats.incr(Counter::Acked);
            Some(p)
        });
    }
    while let Some(r) = inflight.next().await {
        note(r, &mut head);
    }
    head
}

fn note(acked: Option<Published>, head: &mut Option<(String, u64)>) {
    if let Some(p) = acked {
        match head {
            Some((_, h)) => *h = (*h).max(p.offset),
            None => *head = Some((p.channel, p.offset)),
        }
    }
}
