//! The scenarios: what each one's workers do, what the coordinator prepares
//! for them, what the report shows of them.
//!
//! Every scenario runs the same phases (see [`crate::workers`]): set up,
//! `ready`, load, `ran` with the heads written, drain, close. Each is bounded
//! by counts and by time, and stops by itself.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{ensure, Context as _};
use serde::{Deserialize, Serialize};

use crate::auth::Tokens;
use crate::cli::{
    ChatArgs, CommonArgs, ConnectArgs, FanoutArgs, IdleArgs, NotifyArgs, PresenceArgs, RunSpec,
};
use crate::client::{self, ClientConfig, IgnorePushes};
use crate::stats::{Counter, Merged, Stats};
use crate::target::Placement;
use crate::workers::WorkerCtx;

mod chat;
mod connect;
mod delivery;
mod fanout;
mod idle;
mod notify;
mod presence;

/// A scenario and its parameters.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "scenario", rename_all = "snake_case")]
pub enum Scenario {
    Connect(ConnectArgs),
    Idle(IdleArgs),
    Fanout(FanoutArgs),
    Chat(ChatArgs),
    Presence(PresenceArgs),
    Notify(NotifyArgs),
}

/// What the coordinator prepared before starting the workers.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct SetupData {
    /// Rooms created for the run (fanout), by room number.
    #[serde(default)]
    pub rooms: Vec<String>,
}

/// Time facts the throughput figures are computed from.
#[derive(Clone, Copy, Debug)]
pub struct Window {
    /// From `Go` to the last worker's `Ran`.
    pub run_secs: f64,
    /// From `Go` to the last event of the scenario's main kind (0 when none).
    pub to_last_event_secs: f64,
}

fn per_sec(n: u64, secs: f64) -> f64 {
    if secs > 0.0 {
        n as f64 / secs
    } else {
        0.0
    }
}

impl Scenario {
    pub fn name(&self) -> &'static str {
        match self {
            Scenario::Connect(_) => "connect",
            Scenario::Idle(_) => "idle",
            Scenario::Fanout(_) => "fanout",
            Scenario::Chat(_) => "chat",
            Scenario::Presence(_) => "presence",
            Scenario::Notify(_) => "notify",
        }
    }

    /// Connections the run opens at most at once.
    pub fn connections(&self) -> u64 {
        match self {
            Scenario::Connect(a) => a.connections,
            Scenario::Idle(a) => a.connections,
            Scenario::Fanout(a) => a.rooms * (a.subscribers + a.publishers),
            Scenario::Chat(a) => a.rooms * a.room_size,
            Scenario::Presence(a) => a.users * (a.watchers + 1),
            Scenario::Notify(a) => a.users,
        }
    }

    /// Distinct users the run needs (matters with a tokens file).
    pub fn distinct_users(&self) -> u64 {
        match self {
            Scenario::Connect(a) => a.users.unwrap_or(a.connections),
            Scenario::Idle(a) => a.users.unwrap_or(a.connections),
            Scenario::Fanout(_) => 1,
            other => other.connections(),
        }
    }

    pub fn supports_baseline(&self) -> bool {
        matches!(
            self,
            Scenario::Connect(_) | Scenario::Idle(_) | Scenario::Fanout(_)
        )
    }

    pub fn validate(&self) -> anyhow::Result<()> {
        let prob = |p: f64, what: &str| {
            ensure!(
                (0.0..=1.0).contains(&p),
                "{what} must be a probability in [0, 1]"
            );
            Ok(())
        };
        match self {
            Scenario::Connect(a) => {
                ensure!(a.connections > 0, "--connections must be positive");
                ensure!(a.users != Some(0), "--users must be positive");
            }
            Scenario::Idle(a) => {
                ensure!(a.connections > 0, "--connections must be positive");
                ensure!(a.users != Some(0), "--users must be positive");
            }
            Scenario::Fanout(a) => {
                ensure!(
                    a.rooms > 0 && a.subscribers > 0,
                    "--rooms and --subscribers must be positive"
                );
                ensure!(a.publishers > 0, "--publishers must be positive");
                ensure!(a.max_inflight > 0, "--max-inflight must be positive");
            }
            Scenario::Chat(a) => {
                ensure!(a.rooms > 0, "--rooms must be positive");
                ensure!(a.room_size >= 2, "--room-size must be at least 2");
                ensure!(a.rate > 0.0, "--rate must be positive");
                prob(a.typing, "--typing")?;
                prob(a.read, "--read")?;
            }
            Scenario::Presence(a) => {
                ensure!(
                    a.users > 0 && a.watchers > 0,
                    "--users and --watchers must be positive"
                );
            }
            Scenario::Notify(a) => {
                ensure!(
                    a.users > 0 && a.batch > 0,
                    "--users and --batch must be positive"
                );
                ensure!(a.api_concurrency > 0, "--api-concurrency must be positive");
                ensure!(
                    ["low", "normal", "high", "urgent"].contains(&a.priority.as_str()),
                    "--priority must be low, normal, high or urgent"
                );
            }
        }
        Ok(())
    }

    /// How long the load phase may take at most (beyond it the run is aborted).
    pub fn run_bound(&self, common: &CommonArgs) -> Duration {
        let slack = common.request_timeout_secs + common.connect_timeout_secs + 30.0;
        let secs = match self {
            Scenario::Connect(a) => a.duration_secs + a.hold_secs,
            Scenario::Idle(a) => a.hold_secs,
            Scenario::Fanout(a) => a.duration_secs,
            Scenario::Chat(a) => a.duration_secs,
            Scenario::Presence(a) => {
                a.cycles as f64
                    * ((a.online_ms + a.offline_ms) as f64 / 1000.0
                        + 2.0 * a.change_timeout_secs
                        + common.connect_timeout_secs)
            }
            Scenario::Notify(a) => {
                a.bursts as f64 * a.interval_ms as f64 / 1000.0
                    + a.bursts as f64 * common.request_timeout_secs
            }
        };
        Duration::from_secs_f64((secs + slack).min(common.max_seconds))
    }

    /// Counters always shown in the report for this scenario, even at zero.
    pub fn key_counters(&self) -> &'static [Counter] {
        use Counter::*;
        match self {
            Scenario::Connect(_) => &[ConnOpened, ConnFailed, ConnNotTried, ConnDropped, Errors],
            Scenario::Idle(_) => &[
                ConnOpened,
                ConnFailed,
                StayedUp,
                ConnDropped,
                Pings,
                Pongs,
                Errors,
            ],
            Scenario::Fanout(_) => &[
                ConnOpened,
                ConnFailed,
                ConnDropped,
                Sent,
                Acked,
                Deliveries,
                Expected,
                Delivered,
                Lost,
                Duplicates,
                OutOfOrder,
                Errors,
            ],
            Scenario::Chat(_) => &[
                ConnOpened,
                ConnFailed,
                ConnDropped,
                Sent,
                Acked,
                Deliveries,
                Expected,
                Delivered,
                Lost,
                Duplicates,
                OutOfOrder,
                TypingSent,
                TypingSeen,
                ReadsSent,
                ReceiptsExpected,
                ReceiptsSeen,
                Errors,
            ],
            Scenario::Presence(_) => &[
                ConnOpened,
                ConnFailed,
                ConnDropped,
                PresenceExpected,
                PresenceSeen,
                PresenceMissed,
                Errors,
            ],
            Scenario::Notify(_) => &[
                ConnOpened,
                ConnFailed,
                ConnDropped,
                NotifCreated,
                NotifExpected,
                NotifDelivered,
                NotifLost,
                NotifDuplicates,
                ApiErrors,
                Errors,
            ],
        }
    }

    /// Counters shown on the progress line.
    pub fn progress_counters(&self) -> &'static [Counter] {
        use Counter::*;
        match self {
            Scenario::Connect(_) => &[ConnOpened, ConnFailed],
            Scenario::Idle(_) => &[ConnOpened, ConnFailed, ConnDropped, Pongs],
            Scenario::Fanout(_) => &[Acked, Deliveries],
            Scenario::Chat(_) => &[Acked, Deliveries, TypingSeen, ReceiptsSeen],
            Scenario::Presence(_) => &[PresenceSeen, PresenceMissed],
            Scenario::Notify(_) => &[NotifCreated, NotifDelivered],
        }
    }

    /// Rates per second the report gives.
    pub fn throughput(&self, m: &Merged, w: Window) -> BTreeMap<String, f64> {
        let mut out = BTreeMap::new();
        let mut put = |k: &str, v: f64| {
            out.insert(k.to_string(), v);
        };
        match self {
            Scenario::Connect(_) => put(
                "connects_per_sec",
                per_sec(m.count(Counter::ConnOpened), w.to_last_event_secs),
            ),
            Scenario::Idle(_) => put(
                "pings_per_sec",
                per_sec(m.count(Counter::Pongs), w.run_secs),
            ),
            Scenario::Fanout(_) | Scenario::Chat(_) => {
                put(
                    "messages_per_sec",
                    per_sec(m.count(Counter::Acked), w.run_secs),
                );
                put(
                    "deliveries_per_sec",
                    per_sec(m.count(Counter::Deliveries), w.to_last_event_secs),
                );
            }
            Scenario::Presence(_) => put(
                "presence_changes_seen_per_sec",
                per_sec(m.count(Counter::PresenceSeen), w.run_secs),
            ),
            Scenario::Notify(_) => {
                put(
                    "notifications_created_per_sec",
                    per_sec(m.count(Counter::NotifCreated), w.run_secs),
                );
                put(
                    "notifications_delivered_per_sec",
                    per_sec(m.count(Counter::NotifDelivered), w.to_last_event_secs),
                );
            }
        }
        out
    }
}

/// The coordinator's part before workers start: creates what the run shares.
pub async fn prepare(
    spec: &RunSpec,
    run_id: &str,
    placement: &Placement,
    tokens: &Tokens,
    client: &ClientConfig,
) -> anyhow::Result<SetupData> {
    match &spec.scenario {
        Scenario::Fanout(a) => {
            let stats = std::sync::Arc::new(Stats::new());
            let who = tokens.identity(0, &format!("{run_id}-admin"))?;
            let conn = client::connect(
                client,
                placement.target(0),
                placement.source(0),
                0,
                &who,
                &stats,
                IgnorePushes,
            )
            .await
            .context("connecting to create the rooms")?;
            let mut rooms = Vec::new();
            for r in 0..a.rooms {
                let room = format!("{run_id}-r{r}");
                let args = serde_json::json!({"kind": "public", "room": room, "name": room});
                let info: chorus_protocol::RoomInfo = conn
                    .request("room.create", &args)
                    .await
                    .with_context(|| format!("creating room {room}"))?;
                rooms.push(info.id);
            }
            conn.close().await;
            Ok(SetupData { rooms })
        }
        _ => Ok(SetupData::default()),
    }
}

/// A worker's part.
pub async fn run_worker(ctx: WorkerCtx) -> anyhow::Result<()> {
    match ctx.spec().scenario.clone() {
        Scenario::Connect(a) => connect::run(ctx, a).await,
        Scenario::Idle(a) => idle::run(ctx, a).await,
        Scenario::Fanout(a) => fanout::run(ctx, a).await,
        Scenario::Chat(a) => chat::run(ctx, a).await,
        Scenario::Presence(a) => presence::run(ctx, a).await,
        Scenario::Notify(a) => notify::run(ctx, a).await,
    }
}
