//! `connect`: open N connections as fast as allowed (or at a rate), hold
//! them for a while, close them. Figures: connect rate, handshake latency,
//! failures by cause.

use std::time::Duration;

use crate::cli::ConnectArgs;
use crate::client::{close_all, IgnorePushes};
use crate::workers::{Heads, WorkerCtx};

pub async fn run(mut ctx: WorkerCtx, a: ConnectArgs) -> anyhow::Result<()> {
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
    ctx.ready().await?;

    let until = tokio::time::Instant::now() + Duration::from_secs_f64(a.duration_secs);
    let rate = ctx.share(a.rate);
    let conns: Vec<_> = ctx
        .open_many(items, rate, Some(until), true)
        .await
        .into_iter()
        .flatten()
        .collect();
    if a.hold_secs > 0.0 {
        tokio::time::sleep(Duration::from_secs_f64(a.hold_secs)).await;
    }
    ctx.ran(Heads::new()).await?;
    close_all(conns).await;
    Ok(())
}
