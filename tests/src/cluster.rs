//! A cluster in one test process: several real nodes on loopback (HTTP,
//! gossip and transport on port 0), one shared store, membership timings
//! in milliseconds. With `CHORUS_CQL` set the nodes share a fresh keyspace
//! on that CQL server (as a production cluster shares ScyllaDB); without it
//! they share one embedded store (the same `Store` object: what the tests
//! check is placement, transport and fan-out, not the backend).

use std::sync::Arc;

use chorus_actors::cluster::{Faults, MemoryNetwork};
use chorus_actors::placement::NodeId;
use chorus_node::{Config, Deps};
use chorus_storage::{Backend, Store};

use crate::store::HeldStore;
use crate::{eventually, test_config, test_dir, TestNode};

/// The secret the sandbox's nodes share.
pub const CLUSTER_SECRET: &str = "sandbox-cluster-secret-0123456789";

pub struct Sandbox {
    pub nodes: Vec<TestNode>,
    /// The in-memory transport of a partitionable sandbox.
    net: Option<MemoryNetwork>,
    faults: Vec<Faults>,
    /// Each node's way to the store, which a partitionable sandbox can cut.
    stores: Vec<Arc<HeldStore>>,
    /// The CQL keyspace the nodes share, or the embedded store they share.
    cql: Option<(String, String)>,
    shared: Option<Arc<dyn Store>>,
}

/// A fresh keyspace name the storage tests sweep up later.
pub fn keyspace() -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap();
    format!(
        "chorus_t{}_{:012x}",
        now.as_secs(),
        now.subsec_nanos() as u64 ^ (std::process::id() as u64) << 20
    )
}

/// `CHORUS_TEST_NODES` when it asks for more than one node.
pub fn spread_nodes() -> Option<usize> {
    let n: usize = std::env::var("CHORUS_TEST_NODES").ok()?.parse().ok()?;
    (n > 1).then_some(n)
}

/// A [`TestNode`] that is a cluster of `n` in-process nodes sharing the
/// embedded store of `config` (see [`TestNode::start_with`]).
pub async fn spread(
    n: usize,
    dir: Arc<tempfile::TempDir>,
    config: Config,
    tweak: &dyn Fn(&mut Config),
) -> TestNode {
    let store = chorus_storage::open(&config.storage).await.expect("store");
    let mut first_config = config;
    clusterize(&mut first_config, 0, None);
    let deps = || Deps {
        store: Some(store.clone()),
        ..Deps::default()
    };
    let mut node = TestNode::start_deps(dir.clone(), first_config, deps()).await;
    let seed = node.handle().services().cluster.gossip_addr();
    for i in 1..n {
        let mut c = test_config(dir.path());
        tweak(&mut c);
        clusterize(&mut c, i, seed);
        let peer = chorus_node::start_with(c, deps())
            .await
            .expect("node starts");
        node.peers.push(peer);
    }
    eventually("the spread cluster to converge", || async {
        let all = std::iter::once(node.handle()).chain(node.peers.iter());
        all.map(|h| h.services().cluster.view().members().len())
            .all(|len| len == n)
            .then_some(())
    })
    .await;
    node
}

/// Makes `c` the config of cluster node `i`; `seed` is the first node's gossip address.
pub fn clusterize(c: &mut Config, i: usize, seed: Option<std::net::SocketAddr>) {
    c.node.id = format!("node-{i}");
    c.cluster.secret = CLUSTER_SECRET.into();
    c.cluster.listen = "127.0.0.1:0".into();
    c.cluster.transport_listen = "127.0.0.1:0".into();
    c.cluster.seeds = seed.map(|s| vec![s.to_string()]).unwrap_or_default();
    c.cluster.gossip_interval_ms = 50;
    c.cluster.max_heartbeat_interval_ms = 500;
    c.cluster.join_timeout_ms = 5_000;
    c.cluster.request_timeout_ms = 5_000;
}

/// The config of sandbox node `i`; `seed` is the first node's gossip address.
pub fn node_config(
    i: usize,
    seed: Option<std::net::SocketAddr>,
    cql: Option<(&str, &str)>,
) -> (Config, Arc<tempfile::TempDir>) {
    let dir = test_dir();
    let mut c = test_config(dir.path());
    clusterize(&mut c, i, seed);
    if let Some((addr, ks)) = cql {
        c.storage.backend = Backend::Scylla;
        c.storage.scylla.contact_points = vec![addr.to_string()];
        c.storage.scylla.keyspace = ks.to_string();
        c.storage.scylla.request_timeout_ms = 20_000;
    }
    (c, dir)
}

impl Sandbox {
    /// Starts `n` nodes linked by libp2p on loopback and waits until every
    /// node sees all of them `up`.
    pub async fn start(n: usize) -> Sandbox {
        Sandbox::start_on(n, None).await
    }

    /// Starts `n` nodes linked by an in-memory transport, which
    /// [`Sandbox::partition`] can cut.
    pub async fn partitionable(n: usize) -> Sandbox {
        Sandbox::start_on(n, Some(MemoryNetwork::new())).await
    }

    async fn start_on(n: usize, net: Option<MemoryNetwork>) -> Sandbox {
        let cql = std::env::var("CHORUS_CQL").ok();
        let ks = keyspace();
        let cql = cql.as_deref().map(|a| (a, ks.as_str()));
        let mut shared: Option<Arc<dyn Store>> = None;
        let mut nodes: Vec<TestNode> = Vec::with_capacity(n);
        let mut faults = Vec::with_capacity(n);
        let mut stores = Vec::new();
        let mut seed = None;
        for i in 0..n {
            let (config, dir) = node_config(i, seed, cql);
            let mut store = match (&cql, &shared) {
                (Some(_), _) => None,
                (None, Some(s)) => Some(s.clone()),
                (None, None) => {
                    let s = chorus_storage::open(&config.storage).await.expect("store");
                    shared = Some(s.clone());
                    Some(s)
                }
            };
            if net.is_some() {
                // Its own way to the store, which `cut_from_store` can cut.
                let inner = match store {
                    Some(s) => s,
                    None => chorus_storage::open(&config.storage).await.expect("store"),
                };
                let held = HeldStore::new(inner);
                stores.push(held.clone());
                store = Some(held);
            }
            let deps = Deps {
                store,
                transport: net.as_ref().map(|net| net.transport(&config.node.id)),
                faults: Faults::default(),
                ..Deps::default()
            };
            faults.push(deps.faults.clone());
            let node = TestNode::start_deps(dir, config, deps).await;
            if seed.is_none() {
                seed = node.handle().services().cluster.gossip_addr();
            }
            nodes.push(node);
        }
        let sandbox = Sandbox {
            nodes,
            net,
            faults,
            stores,
            cql: cql.map(|(a, k)| (a.to_string(), k.to_string())),
            shared,
        };
        sandbox.wait_converged().await;
        sandbox
    }

    /// Starts one more node (`node-{n}`), seeded by node 0, on the same
    /// store, and waits until every node sees every node `up`.
    pub async fn join(&mut self) {
        let i = self.nodes.len();
        let seed = self.nodes[0].handle().services().cluster.gossip_addr();
        let cql = self.cql.as_ref().map(|(a, k)| (a.as_str(), k.as_str()));
        let (config, dir) = node_config(i, seed, cql);
        let deps = Deps {
            store: self.shared.clone(),
            transport: self.net.as_ref().map(|net| net.transport(&config.node.id)),
            faults: Faults::default(),
            ..Deps::default()
        };
        self.faults.push(deps.faults.clone());
        self.nodes
            .push(TestNode::start_deps(dir, config, deps).await);
        self.wait_converged().await;
    }

    /// Nodes `a` and `b` can no longer reach each other: neither gossip nor
    /// links (open ones break). Only for a [`Sandbox::partitionable`] one.
    pub fn partition(&self, a: usize, b: usize) {
        let net = self.net.as_ref().expect("a partitionable sandbox");
        let id = |i: usize| self.nodes[i].handle().node_id().to_string();
        let gossip = |i: usize| {
            self.nodes[i]
                .handle()
                .services()
                .cluster
                .gossip_addr()
                .expect("a clustered node")
        };
        self.faults[a].block(gossip(b));
        self.faults[b].block(gossip(a));
        net.cut(&id(a), &id(b));
    }

    /// Cuts node `i` off from every other node and waits until both sides
    /// see the split: `i` alone, the others without it.
    pub async fn split_off(&self, i: usize) {
        let n = self.nodes.len();
        for other in (0..n).filter(|o| *o != i) {
            self.partition(i, other);
        }
        let view_len = |j: usize| {
            self.nodes[j]
                .handle()
                .services()
                .cluster
                .view()
                .members()
                .len()
        };
        eventually("both sides to see the split", || async {
            (0..n)
                .all(|j| view_len(j) == if j == i { 1 } else { n - 1 })
                .then_some(())
        })
        .await;
    }

    /// Node `i` can no longer reach the store: every store call it makes
    /// fails as unavailable (it is on the side of a partition without the
    /// store's quorum). Only for a [`Sandbox::partitionable`] one.
    pub fn cut_from_store(&self, i: usize) {
        self.stores[i].cut();
    }

    /// Ends every partition, also from the store.
    pub fn heal(&self) {
        for f in &self.faults {
            f.heal();
        }
        for s in &self.stores {
            s.reconnect();
        }
        if let Some(net) = &self.net {
            net.heal();
        }
    }

    /// Waits until every node's view holds every node.
    pub async fn wait_converged(&self) {
        let n = self.nodes.len();
        eventually("every node to see the whole cluster up", || async {
            self.nodes
                .iter()
                .all(|node| node.handle().services().cluster.view().members().len() == n)
                .then_some(())
        })
        .await;
    }

    pub fn node(&self, i: usize) -> &TestNode {
        &self.nodes[i]
    }

    /// The index of the node that owns `key` (all nodes agree once converged).
    pub fn owner_of(&self, key: &str) -> usize {
        let owner: NodeId = self.nodes[0].handle().services().cluster.owner(key);
        self.nodes
            .iter()
            .position(|n| n.handle().node_id() == owner.as_str())
            .expect("the owner is a sandbox node")
    }

    /// A key of the form `{prefix}{i}` that node `node` owns.
    pub fn key_owned_by(&self, node: usize, prefix: &str) -> String {
        (0..10_000)
            .map(|i| format!("{prefix}{i}"))
            .find(|k| self.owner_of(k) == node)
            .expect("some key hashes to every node")
    }
}
