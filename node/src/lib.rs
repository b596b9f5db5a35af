//! The Chorus node: configuration, the HTTP server and the node's lifecycle.
//!
//! - [`config`]: `cluster.toml` + environment + flags.
//! - [`auth`]: JWT verification (HS256, RS256, ES256), dev tokens, API key.
//! - [`ws`]: the WebSocket gateway (`GET /ws`).
//! - [`api`]: the server API (`/api/v1`), for the app's backend.
//! - [`start`] opens the store, starts the actor runtime (a dedicated tokio
//!   runtime: rooms, users, connections and the hub run there, never on the
//!   HTTP workers), binds the listener and serves `/ws`, `/api/v1`,
//!   `/healthz`, `/readyz` and `/metrics`. [`NodeHandle::shutdown`] stops in
//!   order, each phase bounded: readiness 503 and new sockets refused with
//!   503/5005 (the listener stays open), close every socket with 1001
//!   (reconnect elsewhere), drain, stop actors (in-flight appends finish and
//!   are acknowledged), flush the store, close the listener.

pub mod api;
pub mod api_cluster;
pub mod api_docs;
pub mod auth;
pub mod config;
pub mod doc_ws;
pub mod membership;
pub mod socket;
pub mod status;
pub mod ws;

use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix_web::{web, App, HttpResponse, HttpServer};
use anyhow::Context;
use chorus_actors::cluster::{Cluster, Faults, PeerTransport};
use chorus_actors::hub::CloseAll;
use chorus_actors::placement::NodeId;
use chorus_actors::{Metrics, Services};
use chorus_protocol::{close, now_ms};
use tokio_util::sync::CancellationToken;

pub use config::Config;

/// What HTTP handlers share.
pub struct AppState {
    pub services: Arc<Services>,
    pub api_key: String,
    pub limits: ws::GatewayLimits,
    pub ready: Arc<AtomicBool>,
}

/// A running node.
pub struct NodeHandle {
    addr: SocketAddr,
    node_id: String,
    services: Arc<Services>,
    server: actix_web::dev::ServerHandle,
    server_task: tokio::task::JoinHandle<std::io::Result<()>>,
    runtime: Option<tokio::runtime::Runtime>,
    ready: Arc<AtomicBool>,
    background: CancellationToken,
    timeout: Duration,
    readiness_grace: Duration,
}

/// What a node is started with besides its config, each in place of what
/// the config would make: tests hand several in-process nodes one store, an
/// in-memory transport that can partition them, and a gossip fault injector.
#[derive(Default)]
pub struct Deps {
    /// The HTTP listener, instead of binding `node.listen`.
    pub listener: Option<TcpListener>,
    /// The store, instead of opening `config.storage`.
    pub store: Option<Arc<dyn chorus_storage::Store>>,
    /// The inter-node transport, instead of libp2p on `cluster.transport_listen`.
    pub transport: Option<Arc<dyn PeerTransport>>,
    /// Gossip addresses this node pretends it cannot reach.
    pub faults: Faults,
}

/// Starts a node. Binds `config.node.listen` (port 0 picks a free port; see [`NodeHandle::http_addr`]).
pub async fn start(config: Config) -> anyhow::Result<NodeHandle> {
    config.validate_store()?;
    start_with(config, Deps::default()).await
}

/// [`start`] with its dependencies given.
pub async fn start_with(config: Config, deps: Deps) -> anyhow::Result<NodeHandle> {
    config.validate()?;
    let node_id = config.node_id();
    let store = match deps.store {
        Some(s) => s,
        None => chorus_storage::open(&config.storage)
            .await
            .context("opening the store")?,
    };
    let metrics = Arc::new(Metrics::new());
    let verifier = Arc::new(auth::JwtVerifier::from_config(&config.auth)?);
    let threads = match config.actors.threads {
        0 => std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(2),
        n => n,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .thread_name("chorus-actors")
        .enable_all()
        .build()
        .context("starting the actor runtime")?;
    let listener = match deps.listener {
        Some(l) => l,
        None => TcpListener::bind(config.listen_addr()?)
            .with_context(|| format!("binding {}", config.node.listen))?,
    };
    let addr = listener.local_addr()?;
    let me = NodeId::new(&node_id);
    let cluster = if config.cluster.enabled() {
        let (cfg, me, faults, transport, cm) = (
            config.cluster.clone(),
            me.clone(),
            deps.faults,
            deps.transport,
            metrics.cluster.clone(),
        );
        runtime
            .spawn(async move {
                Cluster::start(&cfg, me, addr.to_string(), faults, transport, cm).await
            })
            .await
            .context("starting the cluster")??
    } else {
        Cluster::single(me, metrics.cluster.clone())
    };
    let services = Services::new(
        config.actor_config(node_id.clone()),
        store,
        metrics,
        verifier,
        runtime.handle().clone(),
        cluster.clone(),
    );
    if cluster.is_clustered() {
        let _guard = runtime.enter();
        let weak = Arc::downgrade(&services);
        cluster.serve(move |from, bytes| {
            let weak = weak.clone();
            async move {
                if let Some(svc) = weak.upgrade() {
                    svc.on_peer_frame(from, bytes).await;
                }
            }
        });
        runtime.spawn(membership::join_and_report(services.clone()));
        runtime.spawn(membership::hand_over_moved_keys(services.clone()));
    }

    let ready = Arc::new(AtomicBool::new(true));
    let state = web::Data::new(AppState {
        services: services.clone(),
        api_key: config.auth.api_key.clone(),
        limits: ws::GatewayLimits {
            max_frame_bytes: config.limits.max_frame_bytes,
            hard_max_frame_bytes: config.limits.hard_max_frame_bytes,
            ping_interval: Duration::from_millis(config.limits.ping_interval_ms.max(1)),
            idle_timeout: Duration::from_millis(config.limits.idle_timeout_ms.max(1)),
        },
        ready: ready.clone(),
    });
    let timeout = Duration::from_millis(config.shutdown.timeout_ms);
    let workers = match config.node.http_workers {
        0 => threads,
        n => n,
    };
    let json_limit = config.limits.hard_max_frame_bytes;
    let server = HttpServer::new(move || {
        App::new()
            .app_data(state.clone())
            .app_data(
                web::JsonConfig::default()
                    .limit(json_limit)
                    .error_handler(api::json_error),
            )
            .app_data(web::QueryConfig::default().error_handler(api::query_error))
            .route("/ws", web::get().to(ws::handshake))
            .route("/doc/{doc}", web::get().to(doc_ws::handshake))
            .route("/healthz", web::get().to(healthz))
            .route("/readyz", web::get().to(readyz))
            .route("/metrics", web::get().to(metrics_route))
            .configure(api_cluster::routes)
            .configure(api::routes)
    })
    .workers(workers)
    // Small frames (pushes, replies) leave at once: with Nagle's algorithm a
    // push written while the previous one is unacknowledged waited for the
    // client's delayed ACK (a chat round trip's p50 was ~23 ms on loopback).
    .tcp_nodelay(true)
    .disable_signals()
    .shutdown_timeout(timeout.as_secs().max(1))
    .listen(listener)?
    .run();
    let server_handle = server.handle();
    let server_task = tokio::spawn(server);

    let background = CancellationToken::new();
    runtime.spawn(purge_expired(
        services.clone(),
        Duration::from_millis(config.notifications.purge_interval_ms.max(100)),
        background.clone(),
    ));

    tracing::info!(node = %node_id, %addr, backend = ?config.storage.backend, "node started");
    Ok(NodeHandle {
        addr,
        node_id,
        services,
        server: server_handle,
        server_task,
        runtime: Some(runtime),
        ready,
        background,
        timeout,
        readiness_grace: Duration::from_millis(config.shutdown.readiness_grace_ms),
    })
}

async fn purge_expired(svc: Arc<Services>, every: Duration, stop: CancellationToken) {
    let mut tick = tokio::time::interval(every);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {
                match svc.store.purge_expired(now_ms()).await {
                    Ok(0) => {}
                    Ok(n) => tracing::debug!(purged = n, "expired notifications deleted"),
                    Err(e) => tracing::warn!(error = %e, "purging expired notifications failed"),
                }
            }
        }
    }
}

async fn healthz() -> HttpResponse {
    HttpResponse::Ok().content_type("text/plain").body("ok\n")
}

async fn readyz(state: web::Data<AppState>) -> HttpResponse {
    if state.ready.load(Ordering::Relaxed) && !state.services.is_stopping() {
        HttpResponse::Ok()
            .content_type("text/plain")
            .body("ready\n")
    } else {
        HttpResponse::ServiceUnavailable()
            .content_type("text/plain")
            .body("shutting down\n")
    }
}

async fn metrics_route(state: web::Data<AppState>) -> HttpResponse {
    HttpResponse::Ok()
        .content_type("application/openmetrics-text; version=1.0.0; charset=utf-8")
        .body(state.services.metrics.render())
}

impl NodeHandle {
    pub fn http_addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn node_id(&self) -> &str {
        &self.node_id
    }

    pub fn services(&self) -> &Arc<Services> {
        &self.services
    }

    /// Ordered, bounded shutdown (see the crate docs). Returns what did not finish in time.
    pub async fn shutdown(mut self) -> anyhow::Result<()> {
        let started = Instant::now();
        let svc = self.services.clone();
        // 1. Readiness goes red so load balancers move away. The listener
        //    stays open until the end: new sockets get 503 (5005) and
        //    `/readyz` 503, never a refused connection.
        self.ready.store(false, Ordering::Relaxed);
        svc.begin_stopping();
        // The cluster stops routing keys here: `leaving` owns none.
        membership::leave(&svc, self.timeout).await;
        // 2. Tell every client to reconnect elsewhere, and wait for sockets to drain.
        let open = svc
            .hub
            .ask(CloseAll {
                code: close::GOING_AWAY,
                reason: "node shutting down, reconnect".into(),
            })
            .await
            .unwrap_or(0);
        let drained = wait_until(self.timeout, || svc.metrics.connections.get() == 0).await;
        tracing::info!(open, drained, "connections closed");
        // 3. Stop actors: each drains its mailbox, so in-flight appends are acknowledged.
        self.background.cancel();
        let stuck = svc.stop_actors(self.timeout).await;
        if stuck > 0 {
            tracing::warn!(stuck, "actors did not stop within the shutdown timeout");
        }
        // 4. Flush the store.
        let flushed = tokio::time::timeout(self.timeout, svc.store.flush()).await;
        svc.cluster.shutdown().await;
        // 5. Close the listener last, not before the readiness grace, so a
        //    balancer's probe has seen the 503 (remaining sockets are dropped
        //    at the bound).
        let grace = self.readiness_grace.min(self.timeout);
        if let Some(rest) = grace.checked_sub(started.elapsed()) {
            tokio::time::sleep(rest).await;
        }
        let server = self.server.clone();
        let _ = tokio::time::timeout(self.timeout, server.stop(true)).await;
        let _ = tokio::time::timeout(self.timeout, &mut self.server_task).await;
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
        tracing::info!(
            elapsed_ms = started.elapsed().as_millis() as u64,
            "node stopped"
        );
        match flushed {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(anyhow::anyhow!("flushing the store: {e}")),
            Err(_) => Err(anyhow::anyhow!("flushing the store timed out")),
        }
    }

    /// Stops abruptly, as a crash would: no close frames, no flush (tests of durability).
    pub fn abort(mut self) {
        self.background.cancel();
        self.server_task.abort();
        let server = self.server.clone();
        tokio::spawn(async move { server.stop(false).await });
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

impl Drop for NodeHandle {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

async fn wait_until(timeout: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if done() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    done()
}
