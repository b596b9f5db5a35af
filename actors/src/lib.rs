//! Chorus actors and the placement layer they are addressed through.
//!
//! ```text
//!  WebSocket reader (actix worker)      writer task (actix worker)
//!        │ RawRequest                         ▲ Arc<SharedFrame> (bounded queue)
//!        ▼                                    │
//!   ConnActor ──tell──▶ RoomActor ──Deliver──▶ Hub ──▶ every local subscriber's queue
//!        │      (placement, by key)   │
//!        └──tell/ask──▶ UserActor ◀───┘ (DM / mention notifications)
//!                          └──SendTo──▶ Hub ──▶ the user's connections
//! ```
//!
//! - [`conn::ConnActor`]: one per socket. Checks, rate-limits and dispatches
//!   requests; owns the socket's subscriptions and outbound [`hub::ConnSink`].
//! - [`room::RoomActor`]: one per channel (`room:…`, `topic:…`, `feed:…`).
//!   The only writer of its channel: assigns offsets, group-commits appends
//!   (one store write in flight, later publishes batch behind it), then acks
//!   and fans out in offset order. Serves catch-up, membership, typing, receipts.
//! - [`user::UserActor`]: one per user. Presence merged across devices,
//!   watchers, notification inbox with coalesced pushes.
//! - [`doc::DocActor`]: one per collaborative document (`yrs`): applies,
//!   persists (group commit, snapshots) and broadcasts updates, relays
//!   awareness; reached from `/doc` (y-websocket) sockets through
//!   [`doc::session`] and from Chorus sockets through `doc.*` requests.
//! - [`hub::Hub`]: one per node. Knows the node's connections and which
//!   channels each is subscribed to; a room sends it one copy of each
//!   message, encoded once ([`chorus_protocol::SharedFrame`]).
//! - [`services::Services`]: what every actor shares (store, config, metrics,
//!   hub) and the placement layer: rooms and users are virtual actors,
//!   activated on first message, passivated when idle, always addressed by
//!   key, never by a kept `ActorRef`. Today the cluster has one member.

pub mod auth;
pub mod cluster;
pub mod config;
pub mod conn;
pub mod doc;
pub mod error;
pub mod hub;
pub mod log;
pub mod metrics;
pub mod placement;
pub mod remote;
pub mod room;
pub mod services;
pub mod timers;
pub mod user;

pub use auth::{Claims, TokenVerifier};
pub use config::{ActorConfig, DocsConfig};
pub use error::Fail;
pub use hub::{ConnAddr, ConnId, ConnSink};
pub use metrics::Metrics;
pub use services::{Replier, Services};
