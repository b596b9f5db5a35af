//! Membership: who is in the cluster, in which state, with what load.
//!
//! A thin layer over chitchat (scuttlebutt anti-entropy gossip with
//! phi-accrual failure detection, from quickwit): each node publishes its
//! own keys (`state`, `peer_id`, `transport`, `http`, `load`) and reads
//! everyone's. A node the failure detector gives up on is `down`. The view
//! is republished every gossip interval as a [`Members`] watch.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use chitchat::{spawn_chitchat, ChitchatConfig, ChitchatHandle, ChitchatId, FailureDetectorConfig};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::config::ClusterConfig;
use super::gossip::SignedUdp;
use crate::placement::NodeId;

const KEY_STATE: &str = "state";
const KEY_PEER: &str = "peer_id";
const KEY_TRANSPORT: &str = "transport";
const KEY_HTTP: &str = "http";
const KEY_LOAD: &str = "load";

/// A member's lifecycle.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MemberState {
    /// Started, not serving keys yet.
    Joining,
    /// Owns keys.
    Up,
    /// Shutting down: owns no keys any more.
    Leaving,
    /// Silent beyond the failure detector's threshold.
    Down,
}

impl MemberState {
    fn parse(s: &str) -> MemberState {
        match s {
            "up" => MemberState::Up,
            "leaving" => MemberState::Leaving,
            _ => MemberState::Joining,
        }
    }

    fn as_str(self) -> &'static str {
        match self {
            MemberState::Joining => "joining",
            MemberState::Up => "up",
            MemberState::Leaving => "leaving",
            MemberState::Down => "down",
        }
    }
}

/// What a node reports of its load.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Load {
    pub connections: u64,
    pub rooms: u64,
    pub users: u64,
}

/// One member as this node sees it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Member {
    pub id: NodeId,
    /// Changes at every start of the node.
    pub generation: u64,
    pub state: MemberState,
    pub gossip: SocketAddr,
    /// The libp2p peer id and address of its transport.
    pub peer_id: Option<String>,
    pub transport: Option<String>,
    /// Its HTTP (WebSocket and server API) address.
    pub http: Option<String>,
    pub load: Load,
}

/// Every member this node knows of, sorted by id.
pub type Members = Arc<Vec<Member>>;

/// This node's membership: its chitchat instance and the published view.
pub struct Membership {
    handle: ChitchatHandle,
    members: watch::Receiver<Members>,
    stop: CancellationToken,
}

/// What this node announces about itself at start.
pub struct SelfInfo {
    pub id: NodeId,
    pub generation: u64,
    pub gossip: SocketAddr,
    pub peer_id: String,
    pub transport: String,
    pub http: String,
}

impl Membership {
    pub async fn start(
        config: &ClusterConfig,
        me: SelfInfo,
        udp: SignedUdp,
    ) -> anyhow::Result<Membership> {
        let interval = config.gossip_interval();
        let chitchat_config = ChitchatConfig {
            chitchat_id: ChitchatId::new(me.id.to_string(), me.generation, me.gossip),
            cluster_id: config.cluster_id.clone(),
            gossip_interval: interval,
            listen_addr: me.gossip,
            seed_nodes: config.seeds.clone(),
            failure_detector_config: FailureDetectorConfig {
                phi_threshold: config.phi_threshold,
                sampling_window_size: 1000,
                max_interval: Duration::from_millis(config.max_heartbeat_interval_ms.max(1)),
                initial_interval: interval,
                dead_node_grace_period: Duration::from_millis(config.dead_node_grace_ms),
            },
            marked_for_deletion_grace_period: Duration::from_millis(
                config.dead_node_grace_ms.max(1),
            ),
            catchup_callback: None,
            extra_liveness_predicate: None,
        };
        let initial = vec![
            (
                KEY_STATE.to_string(),
                MemberState::Joining.as_str().to_string(),
            ),
            (KEY_PEER.to_string(), me.peer_id),
            (KEY_TRANSPORT.to_string(), me.transport),
            (KEY_HTTP.to_string(), me.http),
            (KEY_LOAD.to_string(), encode_load(&Load::default())),
        ];
        let handle = spawn_chitchat(chitchat_config, initial, &udp).await?;
        let (tx, members) = watch::channel(Arc::new(Vec::new()));
        let stop = CancellationToken::new();
        tokio::spawn(publish_members(
            handle.chitchat(),
            tx,
            interval,
            stop.clone(),
        ));
        Ok(Membership {
            handle,
            members,
            stop,
        })
    }

    pub fn members(&self) -> watch::Receiver<Members> {
        self.members.clone()
    }

    pub async fn set_state(&self, state: MemberState) {
        self.set(KEY_STATE, state.as_str()).await;
    }

    pub async fn set_load(&self, load: Load) {
        self.set(KEY_LOAD, &encode_load(&load)).await;
    }

    async fn set(&self, key: &str, value: &str) {
        let chitchat = self.handle.chitchat();
        let mut c = chitchat.lock().await;
        c.self_node_state().set(key, value);
    }

    /// Stops gossiping (the others then see this node go `down`, or gone
    /// after `leaving`).
    pub async fn shutdown(self) {
        self.stop.cancel();
        if let Err(e) = self.handle.shutdown().await {
            tracing::debug!(error = %e, "gossip stopped with an error");
        }
    }
}

fn encode_load(load: &Load) -> String {
    serde_json::to_string(load).unwrap_or_default()
}

async fn publish_members(
    chitchat: Arc<tokio::sync::Mutex<chitchat::Chitchat>>,
    tx: watch::Sender<Members>,
    every: Duration,
    stop: CancellationToken,
) {
    let mut tick = tokio::time::interval(every);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let members = {
            let c = chitchat.lock().await;
            read_members(&c)
        };
        tx.send_if_modified(|current| {
            if **current == members {
                false
            } else {
                *current = Arc::new(members);
                true
            }
        });
    }
}

fn read_members(c: &chitchat::Chitchat) -> Vec<Member> {
    // One member per node id: a live incarnation over a dead one, then the
    // newest generation (a restarted node's old incarnation is not a second
    // member, and a dead one never hides a live one, even one whose start
    // time is earlier because the clock stepped back).
    let mut by_id: BTreeMap<String, Member> = BTreeMap::new();
    let live: Vec<&ChitchatId> = c.live_nodes().collect();
    let dead: Vec<&ChitchatId> = c.dead_nodes().collect();
    for (id, alive) in live
        .into_iter()
        .map(|id| (id, true))
        .chain(dead.into_iter().map(|id| (id, false)))
    {
        let Some(state) = c.node_state(id) else {
            continue;
        };
        let get = |k: &str| state.get(k).map(str::to_string);
        let member = Member {
            id: NodeId::new(&id.node_id),
            generation: id.generation_id,
            state: if alive {
                MemberState::parse(state.get(KEY_STATE).unwrap_or_default())
            } else {
                MemberState::Down
            },
            gossip: id.gossip_advertise_addr,
            peer_id: get(KEY_PEER),
            transport: get(KEY_TRANSPORT),
            http: get(KEY_HTTP),
            load: state
                .get(KEY_LOAD)
                .and_then(|l| serde_json::from_str(l).ok())
                .unwrap_or_default(),
        };
        match by_id.get(&id.node_id) {
            Some(m)
                if (m.state != MemberState::Down, m.generation) >= (alive, member.generation) => {}
            _ => {
                by_id.insert(id.node_id.clone(), member);
            }
        }
    }
    by_id.into_values().collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::gossip::Faults;
    use prometheus_client::metrics::counter::Counter;
    use std::time::Instant;

    const SECRET: &str = "0123456789abcdef0123";

    async fn member(
        id: &str,
        generation: u64,
        listen: SocketAddr,
        seed: Option<SocketAddr>,
    ) -> (Membership, SocketAddr) {
        let config = ClusterConfig {
            seeds: seed.map(|s| vec![s.to_string()]).unwrap_or_default(),
            secret: SECRET.into(),
            gossip_interval_ms: 100,
            ..ClusterConfig::default()
        };
        let (udp, bound) =
            SignedUdp::bind(listen, SECRET, Faults::default(), Counter::default()).unwrap();
        let m = Membership::start(
            &config,
            SelfInfo {
                id: NodeId::new(id),
                generation,
                gossip: bound,
                peer_id: format!("peer-{id}"),
                transport: String::new(),
                http: String::new(),
            },
            udp,
        )
        .await
        .unwrap();
        m.set_state(MemberState::Up).await;
        (m, bound)
    }

    async fn wait(m: &Membership, what: &str, ok: impl Fn(&[Member]) -> bool) -> Duration {
        let start = Instant::now();
        let mut rx = m.members();
        let seen = tokio::time::timeout(Duration::from_secs(30), rx.wait_for(|v| ok(v)))
            .await
            .is_ok();
        assert!(
            seen,
            "{what}: not within 30 s; members {:?}",
            *m.members().borrow()
        );
        start.elapsed()
    }

    fn up(v: &[Member], id: &str, generation: u64) -> bool {
        v.iter().any(|m| {
            m.id == NodeId::new(id) && m.generation == generation && m.state == MemberState::Up
        })
    }

    /// A restarted member (same id and address, a new generation) is seen
    /// `up` again well before its dead incarnation is forgotten (60 s), also
    /// restarted before it was seen down, and also with an earlier start
    /// time than its last incarnation (a clock stepped back): a dead
    /// incarnation never hides a live one.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_restarted_member_is_seen_up_again() {
        let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
        let (a, a_addr) = member("a", 10, any, None).await;
        let (b, _) = member("b", 10, any, Some(a_addr)).await;
        let (mut c, c_addr) = member("c", 10, any, Some(a_addr)).await;
        for m in [&a, &b] {
            wait(m, "c up", |v| up(v, "c", 10)).await;
        }
        for (generation, before_down) in [(20, true), (30, false), (25, true)] {
            c.shutdown().await;
            if !before_down {
                wait(&a, "c down", |v| {
                    v.iter()
                        .any(|m| m.id == NodeId::new("c") && m.state == MemberState::Down)
                })
                .await;
            }
            let (c2, _) = member("c", generation, c_addr, Some(a_addr)).await;
            for m in [&a, &b] {
                let t = wait(m, "c back", |v| up(v, "c", generation)).await;
                eprintln!("generation {generation}: seen up after {t:?}");
            }
            c = c2;
        }
    }

    /// Each member in turn leaves and comes back on a new gossip port with a
    /// new generation, seeded by a survivor (a rolling restart): the others
    /// see every new incarnation `up` well before the old ones are forgotten.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_rolling_restart_on_new_ports_is_seen_by_all() {
        let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
        let ids = ["a", "b", "c"];
        let (a, a_addr) = member("a", 10, any, None).await;
        let (b, b_addr) = member("b", 10, any, Some(a_addr)).await;
        let (c, c_addr) = member("c", 10, any, Some(a_addr)).await;
        let mut nodes = vec![(a, a_addr, 10), (b, b_addr, 10), (c, c_addr, 10)];
        for (m, _, _) in &nodes {
            wait(m, "all up", |v| ids.iter().all(|id| up(v, id, 10))).await;
        }
        for round in 1..=2u64 {
            for victim in 0..3 {
                let (old, _, _) = nodes.remove(victim);
                old.set_state(MemberState::Leaving).await;
                old.shutdown().await;
                let seed = nodes[0].1;
                let generation = 10 + round * 10 + victim as u64;
                let (m, addr) = member(ids[victim], generation, any, Some(seed)).await;
                nodes.insert(victim, (m, addr, generation));
                for (i, (m, _, _)) in nodes.iter().enumerate() {
                    let all_up =
                        |v: &[Member]| ids.iter().zip(&nodes).all(|(id, (_, _, g))| up(v, id, *g));
                    let t = wait(
                        m,
                        &format!("{} sees all after restarting {}", ids[i], ids[victim]),
                        all_up,
                    )
                    .await;
                    eprintln!(
                        "round {round}: {} restarted, {} saw all up after {t:?}",
                        ids[victim], ids[i]
                    );
                }
            }
        }
    }
}
