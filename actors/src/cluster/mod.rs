//! The cluster: membership (gossip), the member view placement reads, and
//! the peer links that carry everything between nodes.
//!
//! - [`config`]: the `[cluster]` section.
//! - [`gossip`]: chitchat's gossip over UDP, signed with the cluster secret.
//! - [`membership`]: chitchat: who is in, in which state, with what load.
//! - [`transport`]: the [`PeerTransport`] seam, and libp2p (TCP, pnet
//!   keyed by the secret, noise, yamux) behind it.
//! - [`memory`]: an in-memory transport that can partition nodes (tests).
//! - [`link`]: one ordered, acknowledged, flow-controlled stream per peer.
//!
//! A node without seeds or secret is a cluster of one ([`Cluster::single`]):
//! no port is opened, every key is owned here.

pub mod config;
pub mod gossip;
pub mod link;
pub mod membership;
pub mod memory;
pub mod metrics;
pub mod transport;

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use chorus_protocol::ErrorCode;
use futures::StreamExt;
use parking_lot::Mutex;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

pub use config::ClusterConfig;
pub use gossip::Faults;
pub use membership::{Load, Member, MemberState, Members};
pub use memory::MemoryNetwork;
pub use metrics::ClusterMetrics;
pub use transport::PeerTransport;

use crate::placement::{NodeId, View};
use crate::Fail;
use link::{Connect, Delivered, Link, LinkConfig};
use membership::{Membership, SelfInfo};
use transport::{Incoming, Transport};

/// This node's place in the cluster.
pub struct Cluster {
    me: NodeId,
    generation: u64,
    config: ClusterConfig,
    clustered: bool,
    gossip_addr: Option<SocketAddr>,
    view: watch::Receiver<Arc<View>>,
    members: watch::Receiver<Members>,
    membership: tokio::sync::Mutex<Option<Membership>>,
    transport: Option<Arc<dyn PeerTransport>>,
    incoming: Mutex<Option<Incoming>>,
    links: Mutex<HashMap<NodeId, Arc<Link>>>,
    /// Numbers this process's links: a start time in microseconds, then +1.
    next_link: std::sync::atomic::AtomicU64,
    delivered: Delivered,
    pub metrics: ClusterMetrics,
    stop: CancellationToken,
}

fn generation_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(1)
}

impl Cluster {
    /// A cluster of one: every key is owned here.
    pub fn single(me: NodeId, metrics: ClusterMetrics) -> Arc<Cluster> {
        let (_, view) = watch::channel(Arc::new(View::new([me.clone()])));
        let (_, members) = watch::channel(Arc::new(Vec::new()));
        Arc::new(Cluster {
            me,
            generation: generation_now(),
            config: ClusterConfig::default(),
            clustered: false,
            gossip_addr: None,
            view,
            members,
            membership: tokio::sync::Mutex::new(None),
            transport: None,
            incoming: Mutex::new(None),
            links: Mutex::new(HashMap::new()),
            next_link: std::sync::atomic::AtomicU64::new(generation_now()),
            delivered: Delivered::default(),
            metrics,
            stop: CancellationToken::new(),
        })
    }

    /// Binds the gossip port, starts the transport (libp2p on
    /// `cluster.transport_listen`, unless one is given) and starts gossiping
    /// (state `joining`; see [`Cluster::set_state`]). `http` is this node's
    /// HTTP address as clients reach it.
    pub async fn start(
        config: &ClusterConfig,
        me: NodeId,
        http: String,
        faults: Faults,
        transport: Option<Arc<dyn PeerTransport>>,
        metrics: ClusterMetrics,
    ) -> anyhow::Result<Arc<Cluster>> {
        if let Some(problem) = config.problem() {
            anyhow::bail!(problem);
        }
        let generation = generation_now();
        let gossip_listen: SocketAddr = config
            .listen
            .parse()
            .map_err(|e| anyhow::anyhow!("cluster.listen {:?}: {e}", config.listen))?;
        let transport_listen: SocketAddr = config.transport_listen.parse().map_err(|e| {
            anyhow::anyhow!(
                "cluster.transport_listen {:?}: {e}",
                config.transport_listen
            )
        })?;
        let advertise_ip = match config.advertise_host.as_str() {
            "" if gossip_listen.ip().is_unspecified() => anyhow::bail!(
                "cluster.listen {gossip_listen} is a wildcard address: set cluster.advertise_host \
                 (CHORUS_CLUSTER_ADVERTISE_HOST) to the address other nodes reach this one at"
            ),
            "" => gossip_listen.ip(),
            host => host
                .parse()
                .map_err(|e| anyhow::anyhow!("cluster.advertise_host {host:?}: {e}"))?,
        };
        let (udp, bound) = gossip::SignedUdp::bind(
            gossip_listen,
            &config.secret,
            faults,
            metrics.gossip_rejected.clone(),
        )?;
        let transport = match transport {
            Some(t) => t,
            None => Arc::new(
                Transport::start(
                    transport_listen,
                    advertise_ip,
                    &config.secret,
                    metrics.connections_refused.clone(),
                )
                .await?,
            ),
        };
        let incoming = transport
            .take_incoming()
            .ok_or_else(|| anyhow::anyhow!("the transport's incoming streams were taken"))?;
        let advertised = transport.address();
        let membership = Membership::start(
            config,
            SelfInfo {
                id: me.clone(),
                generation,
                gossip: SocketAddr::new(advertise_ip, bound.port()),
                peer_id: transport.peer_id(),
                transport: advertised.clone(),
                http,
            },
            udp,
        )
        .await?;
        let members = membership.members();
        let (view_tx, view) = watch::channel(Arc::new(View::new([me.clone()])));
        let stop = CancellationToken::new();
        let cluster = Arc::new(Cluster {
            me,
            generation,
            config: config.clone(),
            clustered: true,
            gossip_addr: Some(SocketAddr::new(advertise_ip, bound.port())),
            view,
            members: members.clone(),
            membership: tokio::sync::Mutex::new(Some(membership)),
            transport: Some(transport),
            incoming: Mutex::new(Some(incoming)),
            links: Mutex::new(HashMap::new()),
            next_link: std::sync::atomic::AtomicU64::new(generation_now()),
            delivered: Delivered::default(),
            metrics,
            stop: stop.clone(),
        });
        tokio::spawn(follow_members(
            Arc::downgrade(&cluster),
            members,
            view_tx,
            stop,
        ));
        tracing::info!(
            node = %cluster.me,
            gossip = %SocketAddr::new(advertise_ip, bound.port()),
            transport = %advertised,
            "cluster transport and gossip started"
        );
        Ok(cluster)
    }

    pub fn me(&self) -> &NodeId {
        &self.me
    }

    /// Changes at every start of this node.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Whether other nodes may exist (false: a cluster of one).
    pub fn is_clustered(&self) -> bool {
        self.clustered
    }

    /// The gossip address other nodes use as a seed (`None`: a cluster of one).
    pub fn gossip_addr(&self) -> Option<SocketAddr> {
        self.gossip_addr
    }

    pub fn config(&self) -> &ClusterConfig {
        &self.config
    }

    /// The members that own keys now.
    pub fn view(&self) -> Arc<View> {
        self.view.borrow().clone()
    }

    pub fn view_watch(&self) -> watch::Receiver<Arc<View>> {
        self.view.clone()
    }

    /// Every member this node knows of (empty for a cluster of one).
    pub fn members(&self) -> Members {
        self.members.borrow().clone()
    }

    pub fn members_watch(&self) -> watch::Receiver<Members> {
        self.members.clone()
    }

    /// The node that owns `key` in this node's view.
    pub fn owner(&self, key: &str) -> NodeId {
        self.view
            .borrow()
            .owner(key)
            .cloned()
            .unwrap_or_else(|| self.me.clone())
    }

    pub fn is_me(&self, node: &NodeId) -> bool {
        *node == self.me
    }

    /// The owner of `key` in this node's view, with the generation it has
    /// now (an owner that restarted is another incarnation: its actors
    /// forgot everything).
    pub fn owner_incarnation(&self, key: &str) -> (NodeId, u64) {
        let owner = self.owner(key);
        let generation = if self.is_me(&owner) {
            self.generation
        } else {
            self.members
                .borrow()
                .iter()
                .find(|m| m.id == owner)
                .map_or(0, |m| m.generation)
        };
        (owner, generation)
    }

    pub async fn set_state(&self, state: MemberState) {
        if let Some(m) = self.membership.lock().await.as_ref() {
            m.set_state(state).await;
        }
    }

    pub async fn set_load(&self, load: Load) {
        if let Some(m) = self.membership.lock().await.as_ref() {
            m.set_load(load).await;
        }
    }

    /// Sends `payload` to `node` over its link, in order with everything
    /// sent to it before. Waits while the link is full, at most the request
    /// timeout; then the caller gets a retryable `overloaded` (5004).
    pub async fn send(&self, node: &NodeId, payload: Bytes) -> Result<(), Fail> {
        let Some(link) = self.link(node) else {
            return Err(Fail::new(
                ErrorCode::Overloaded,
                format!("node {node} is not reachable from here, retry"),
            ));
        };
        match tokio::time::timeout(self.config.request_timeout(), link.send(payload)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(Fail::new(
                ErrorCode::Overloaded,
                format!("the link to {node} closed, retry"),
            )),
            Err(_) => {
                self.metrics.request_timeouts.inc();
                Err(Fail::new(
                    ErrorCode::Overloaded,
                    format!("node {node} is not taking frames, retry"),
                ))
            }
        }
    }

    fn link(&self, node: &NodeId) -> Option<Arc<Link>> {
        let transport = self.transport.clone()?;
        let mut links = self.links.lock();
        if let Some(l) = links.get(node).filter(|l| !l.is_closed()) {
            return Some(l.clone());
        }
        let members = self.members.clone();
        let target = node.clone();
        let connect: Connect = Arc::new(move || {
            let transport = transport.clone();
            let address = peer_address(&members.borrow(), &target);
            match address {
                Ok((peer, addr)) => transport.open(&peer, &addr),
                Err(e) => Box::pin(async move { Err(e) }),
            }
        });
        let link = Arc::new(Link::start(
            LinkConfig {
                me: self.me.clone(),
                // Unique per link: a link made again (after the peer was
                // down) numbers from 1, and the peer must not take those
                // for frames it already has.
                generation: self
                    .next_link
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed),
                window: self.config.window,
                queue: self.config.send_queue,
                max_frame_bytes: self.config.max_frame_bytes,
            },
            connect,
            self.metrics.peer(node.as_str()),
        ));
        links.insert(node.clone(), link.clone());
        Some(link)
    }

    /// Serves incoming links: every payload of a peer is handed to
    /// `deliver`, in the order the peer sent it (each awaited before the next).
    pub fn serve<F, Fut>(self: &Arc<Self>, deliver: F)
    where
        F: Fn(NodeId, Bytes) -> Fut + Clone + Send + Sync + 'static,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        let Some(mut incoming) = self.incoming.lock().take() else {
            return;
        };
        let this = Arc::downgrade(self);
        let stop = self.stop.clone();
        tokio::spawn(async move {
            loop {
                let next = tokio::select! {
                    _ = stop.cancelled() => return,
                    n = incoming.next() => n,
                };
                let Some(stream) = next else { return };
                let Some(cluster) = this.upgrade() else {
                    return;
                };
                let deliver = deliver.clone();
                let (delivered, max) = (cluster.delivered.clone(), cluster.config.max_frame_bytes);
                let metrics = cluster.metrics.clone();
                drop(cluster);
                tokio::spawn(async move {
                    let r = link::serve_stream(
                        stream,
                        delivered,
                        max,
                        |node| metrics.peer(node.as_str()),
                        deliver,
                    )
                    .await;
                    if let Err(e) = r {
                        tracing::debug!(error = %e, "peer stream ended");
                    }
                });
            }
        });
    }

    /// Announces `leaving`, then stops gossip and the transport.
    pub async fn shutdown(&self) {
        self.stop.cancel();
        if let Some(m) = self.membership.lock().await.take() {
            m.shutdown().await;
        }
        self.links.lock().clear();
        if let Some(t) = &self.transport {
            t.shutdown();
        }
    }

    /// Waits until `pred` holds for the view, at most `timeout`.
    pub async fn wait_view(&self, timeout: Duration, pred: impl Fn(&View) -> bool) -> bool {
        let mut view = self.view.clone();
        tokio::time::timeout(timeout, view.wait_for(|v| pred(v)))
            .await
            .is_ok_and(|r| r.is_ok())
    }
}

fn peer_address(members: &Members, node: &NodeId) -> io::Result<(String, String)> {
    let m = members
        .iter()
        .find(|m| &m.id == node && m.state != MemberState::Down)
        .ok_or_else(|| {
            io::Error::new(io::ErrorKind::NotFound, format!("{node} is not a member"))
        })?;
    let bad =
        |what: &str| io::Error::new(io::ErrorKind::InvalidData, format!("{node}: bad {what}"));
    let peer = m.peer_id.clone().ok_or_else(|| bad("peer id"))?;
    let addr = m
        .transport
        .clone()
        .ok_or_else(|| bad("transport address"))?;
    Ok((peer, addr))
}

/// Keeps the view (the `up` members) in step with gossip, and drops the
/// links of members that are gone.
async fn follow_members(
    cluster: std::sync::Weak<Cluster>,
    mut members: watch::Receiver<Members>,
    view_tx: watch::Sender<Arc<View>>,
    stop: CancellationToken,
) {
    loop {
        let current = members.borrow_and_update().clone();
        let Some(c) = cluster.upgrade() else { return };
        c.metrics.set_members(&current);
        let up: Vec<NodeId> = current
            .iter()
            .filter(|m| m.state == MemberState::Up)
            .map(|m| m.id.clone())
            .collect();
        let view = if up.is_empty() {
            View::new([c.me.clone()])
        } else {
            View::new(up)
        };
        let changed = view_tx.send_if_modified(|v| {
            if **v == view {
                false
            } else {
                *v = Arc::new(view);
                true
            }
        });
        if changed {
            c.metrics.view_changes.inc();
            tracing::info!(view = ?c.view().members(), "cluster view changed");
        }
        {
            let mut links = c.links.lock();
            links.retain(|node, _| {
                current
                    .iter()
                    .any(|m| &m.id == node && m.state != MemberState::Down)
            });
        }
        for m in current.iter() {
            if m.state == MemberState::Down {
                c.delivered.forget(&m.id, None);
            } else if m.id != c.me && m.state == MemberState::Up {
                // Open the link now, so the first request does not pay for the handshake.
                let _ = c.link(&m.id);
            }
        }
        drop(c);
        tokio::select! {
            _ = stop.cancelled() => return,
            r = members.changed() => if r.is_err() { return },
        }
    }
}
