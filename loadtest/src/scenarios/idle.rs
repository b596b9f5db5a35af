//! `idle`: open N connections, hold them for T seconds while each sends a
//! protocol `ping` every few seconds, count how many stayed up. The
//! coordinator samples the server's memory once all are open (memory per
//! idle connection).

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use tokio::time::Instant;

use crate::cli::IdleArgs;
use crate::client::{close_all, Conn, IgnorePushes};
use crate::stats::{Counter, Lat};
use crate::workers::{Heads, WorkerCtx};

/// How often the pinger wakes to ping its next slice of connections.
const PING_TICK: Duration = Duration::from_millis(100);

pub async fn run(mut ctx: WorkerCtx, a: IdleArgs) -> anyhow::Result<()> {
    let users = a.users.unwrap_or(a.connections).max(1);
    let mut items = Vec::new();
    for i in (0..a.connections).filter(|i| ctx.mine(*i)) {
        let u = i % users;
        items.push((
            i,
            ctx.identity(u, &format!("{}-u{u}", ctx.run_id()))?,
            IgnorePushes,
        ));
    }
    let rate = ctx.share(a.rate);
    let conns: Vec<Arc<Conn>> = ctx
        .open_many(items, rate, None, false)
        .await
        .into_iter()
        .flatten()
        .collect();
    ctx.ready().await?;

    let end = Instant::now() + Duration::from_secs_f64(a.hold_secs);
    if a.ping_secs > 0.0 && !conns.is_empty() {
        ping_until(&ctx, &conns, Duration::from_secs_f64(a.ping_secs), end).await;
    } else {
        tokio::time::sleep_until(end).await;
    }
    let stayed = conns.iter().filter(|c| c.is_up()).count() as u64;
    ctx.stats.add(Counter::StayedUp, stayed);
    // Pings sent just before the end still get their answer before the close.
    let limit = ctx.client.request_timeout;
    futures_util::stream::iter(conns.iter())
        .for_each_concurrent(512, |c| async move {
            c.quiesce(limit).await;
        })
        .await;
    ctx.ran(Heads::new()).await?;
    close_all(conns).await;
    Ok(())
}

/// Pings every connection once per `every`, spread evenly over the interval
/// so the server sees a steady trickle rather than bursts.
async fn ping_until(ctx: &WorkerCtx, conns: &[Arc<Conn>], every: Duration, end: Instant) {
    let ticks_per_round = (every.as_secs_f64() / PING_TICK.as_secs_f64()).max(1.0);
    let per_tick = ((conns.len() as f64 / ticks_per_round).ceil() as usize).max(1);
    let mut tick = tokio::time::interval(PING_TICK);
    let mut next = 0usize;
    let args = serde_json::json!({});
    loop {
        tokio::select! {
            _ = tokio::time::sleep_until(end) => return,
            _ = tick.tick() => {}
        }
        for _ in 0..per_tick {
            let c = &conns[next % conns.len()];
            next += 1;
            if c.is_up() {
                ctx.stats.incr(Counter::Pings);
                // A failed send is counted by the connection; the hold goes on.
                let _ = c.send_timed("ping", &args, Lat::Ping, Counter::Pongs).await;
            }
        }
    }
}
