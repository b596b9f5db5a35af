//! Chaos (issue 9): three real `chorus` processes on the shared store, one
//! publisher and WebSocket subscribers spread over them, while nodes go
//! down and come back one at a time: SIGKILLed at random, or SIGTERMed each
//! in turn (a rolling restart). Nothing acknowledged may be lost or stored
//! twice, every subscriber must see every entry of every room once, in
//! offset order, and presence must converge.
//!
//! `CHORUS_CHAOS_KILLS` kills (default 3, as CI runs it; the full run is
//! 20), `CHORUS_ROLLING_ROUNDS` rounds of the rolling restart (default 1),
//! `CHORUS_CHAOS_SEED` replays a run's choice of victims (the seed is
//! printed), `CHORUS_CHAOS_LOG` sets the nodes' `[log] level` (default
//! warn), `CHORUS_TEST_NODE_LOGS=<dir>` writes each node's log to a file.
//!
//! Needs `CHORUS_CQL=host:port` (`scripts/cassandra.sh start`):
//! `CHORUS_CQL=127.0.0.1:9042 CHORUS_CHAOS_KILLS=20 cargo test -p chorus-node --test chaos -- --nocapture`

#[path = "chaos/clients.rs"]
mod clients;
mod procs;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clients::*;
use procs::*;
use serde_json::{json, Value};
use tokio::sync::watch;

/// Bound of the final waits (subscribers caught up, failover, presence).
const LONG_WAIT: Duration = Duration::from_secs(60);
/// Acknowledged publishes between a restart's convergence and the next kill
/// (at most 20/s: at least 2 s of traffic).
const TRAFFIC_BETWEEN_KILLS: usize = 40;

/// `chorus status --json`, off the runtime's threads.
async fn status_of(config: &Path, addr: &str, key: Option<&str>) -> Result<Value, String> {
    let (c, a, k) = (
        config.to_path_buf(),
        addr.to_string(),
        key.map(str::to_string),
    );
    tokio::task::spawn_blocking(move || try_status(&c, &a, k.as_deref()))
        .await
        .unwrap()
}

/// Wait (bounded) until every node sees the three members up.
async fn converge(config: &Path, cluster: &Cluster) {
    let deadline = Instant::now() + LONG_WAIT;
    loop {
        let mut ok = true;
        let mut seen = Vec::new();
        for addr in cluster.all() {
            match status_of(config, &addr, None).await {
                Ok(s) if up_members(&s) == IDS => {}
                Ok(s) => {
                    ok = false;
                    seen.push(format!("{addr}: {:?}", up_members(&s)));
                }
                Err(e) => {
                    ok = false;
                    seen.push(format!("{addr}: {e}"));
                }
            }
        }
        if ok {
            return;
        }
        if std::env::var_os("CHORUS_CHAOS_VERBOSE").is_some() {
            eprintln!("converging: {seen:?}");
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for every node to see three up members: {seen:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Poll `f` every 20 ms until it is true; false after `within`.
async fn wait_until(within: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + within;
    loop {
        if f() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Poll a user's presence at `addr` every 50 ms until `ok`; when it held
/// (`None` after [`LONG_WAIT`]). A node that does not answer counts as not yet.
async fn wait_presence(
    addr: impl AsRef<str>,
    user: impl AsRef<str>,
    ok: impl Fn(&Value) -> bool,
) -> Option<Instant> {
    let path = format!("/api/v1/users/{}/presence", user.as_ref());
    let deadline = Instant::now() + LONG_WAIT;
    loop {
        let (st, p) = api(addr.as_ref(), "GET", &path, None).await;
        if st == 200 && ok(&p) {
            return Some(Instant::now());
        }
        if Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// xorshift64*, seeded from the clock or `CHORUS_CHAOS_SEED`.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

fn percentile(sorted: &[Duration], p: usize) -> Duration {
    let rank = (sorted.len() * p).div_ceil(100).max(1);
    sorted[rank - 1]
}

/// Every entry of a room, oldest first, through the server API's pages.
async fn room_history(addr: &str, room: &str) -> Vec<Value> {
    let mut all = Vec::new();
    let mut after = 0u64;
    loop {
        let (st, page) = api(
            addr,
            "GET",
            &format!("/api/v1/rooms/{room}/messages?after={after}&limit=200"),
            None,
        )
        .await;
        assert_eq!(st, 200, "history of {room}: {page}");
        let entries = page["entries"].as_array().cloned().unwrap_or_default();
        if let Some(last) = entries.last() {
            after = last["offset"].as_u64().unwrap();
        }
        let empty = entries.is_empty();
        all.extend(entries);
        if page["more"] != true || empty {
            return all;
        }
    }
}

/// How nodes go down.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// SIGKILL a random node, `CHORUS_CHAOS_KILLS` times.
    Kill,
    /// SIGTERM each node in turn (a rolling restart), `CHORUS_ROLLING_ROUNDS`
    /// times around the cluster.
    Rolling,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_killed_and_restarted_lose_nothing_and_subscribers_stay_gap_free() {
    run(Mode::Kill).await;
}

/// Each node in turn gets SIGTERM and is restarted (`CHORUS_ROLLING_ROUNDS`
/// rounds, default 1).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_restart_loses_nothing_and_subscribers_stay_gap_free() {
    run(Mode::Rolling).await;
}

fn env_count(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .map(|k| k.parse().unwrap_or_else(|_| panic!("{name} is a number")))
        .unwrap_or(default)
}

/// One harness at a time: each runs three nodes under load on a small machine.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

async fn run(mode: Mode) {
    let Some(cql) = cql() else { return };
    let _one = ONE_AT_A_TIME.lock().await;
    let kills = match mode {
        Mode::Kill => env_count("CHORUS_CHAOS_KILLS", 3),
        Mode::Rolling => IDS.len() * env_count("CHORUS_ROLLING_ROUNDS", 1),
    };
    let seed: u64 = std::env::var("CHORUS_CHAOS_SEED")
        .ok()
        .map(|s| s.parse().expect("CHORUS_CHAOS_SEED is a number"))
        .unwrap_or_else(|| {
            let t = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap();
            (t.as_nanos() as u64) | 1
        });
    let what = if mode == Mode::Kill {
        "kills"
    } else {
        "graceful restarts, each node in turn"
    };
    eprintln!("chaos: {kills} {what}, CHORUS_CHAOS_SEED={seed}");
    let mut rng = Rng(seed | 1);
    let level = std::env::var("CHORUS_CHAOS_LOG").unwrap_or_else(|_| "warn".into());
    let dir = tempfile::tempdir().unwrap();
    let config: PathBuf = write_config_with_log(dir.path(), &cql, &keyspace(), &level);

    // 1. Three nodes.
    let first = Node::start(&config, IDS[0], None);
    let s = status(&config, &first.addr, None);
    let gossip = s["members"][0]["gossip"].as_str().unwrap().to_string();
    let second = Node::start(&config, IDS[1], Some(&gossip));
    let third = Node::start(&config, IDS[2], Some(&gossip));
    let mut nodes: Vec<Option<Node>> = vec![Some(first), Some(second), Some(third)];
    let cluster = Cluster(Arc::new(Mutex::new(
        nodes
            .iter()
            .map(|n| n.as_ref().unwrap().addr.clone())
            .collect(),
    )));
    converge(&config, &cluster).await;

    // 2. Four public rooms.
    for room in ROOMS {
        let (st, v) = api(
            &cluster.addr(0),
            "POST",
            "/api/v1/rooms",
            Some(json!({"room": room, "kind": "public", "created_by": "pub"})),
        )
        .await;
        assert_eq!(st, 200, "create {room}: {v}");
    }

    // 3. Six subscribers, two per node, and one client per node that never
    // reconnects.
    let (stop_subs, stop_rx) = watch::channel(false);
    let mut subs: Vec<Shared<SubState>> = Vec::new();
    let mut sub_tasks = Vec::new();
    for i in 0..6 {
        let user = format!("sub-{i}");
        let st = Arc::new(Mutex::new(SubState {
            user: user.clone(),
            slot: i % IDS.len(),
            rooms: (0..ROOMS.len()).map(|_| RoomSeen::default()).collect(),
            ..SubState::default()
        }));
        subs.push(st.clone());
        sub_tasks.push(tokio::spawn(subscriber(
            token(&config, &user),
            cluster.clone(),
            st,
            stop_rx.clone(),
        )));
    }
    let mut lonely_gone = Vec::new();
    let mut lonely_tasks = Vec::new();
    for slot in 0..IDS.len() {
        let gone = Arc::new(Mutex::new(false));
        lonely_gone.push(gone.clone());
        lonely_tasks.push(tokio::spawn(lonely(
            cluster.addr(slot),
            token(&config, &format!("lonely-{slot}")),
            gone,
        )));
    }
    let all_joined = wait_until(WAIT, || {
        subs.iter()
            .all(|s| s.lock().unwrap().rooms.iter().all(|r| r.joined))
    })
    .await;
    assert!(all_joined, "every subscriber joined every room");
    // Each lonely client counts as a device of its user.
    for slot in 0..IDS.len() {
        let user = format!("lonely-{slot}");
        let online = wait_presence(cluster.addr(0), &user, |p| {
            p["devices"].as_u64().unwrap_or(0) >= 1
        })
        .await;
        assert!(online.is_some(), "{user} online");
    }

    // 4. The publisher.
    let acks: Shared<Vec<Ack>> = Arc::new(Mutex::new(Vec::new()));
    let (stop_pub, stop_pub_rx) = watch::channel(false);
    let publisher = tokio::spawn(publisher(cluster.clone(), acks.clone(), stop_pub_rx));
    let warm = wait_until(LONG_WAIT, || acks.lock().unwrap().len() >= 20).await;
    assert!(warm, "the publisher gets acknowledgements");

    // 5. Kills.
    let mut failovers: Vec<Duration> = Vec::new();
    let mut presence_times: Vec<Duration> = Vec::new();
    let mut killed = [0u32; 3];
    for k in 0..kills {
        assert!(!publisher.is_finished(), "the publisher gave up");
        let mut owners = Vec::new();
        for room in ROOMS {
            let s = status_of(&config, &cluster.addr(0), Some(&format!("room:{room}")))
                .await
                .expect("status");
            owners.push(s["owner"]["node"].as_str().unwrap_or("").to_string());
        }
        let victim = match mode {
            Mode::Kill => (rng.next() % IDS.len() as u64) as usize,
            Mode::Rolling => k % IDS.len(),
        };
        let its_rooms: Vec<usize> = (0..ROOMS.len())
            .filter(|&r| owners[r] == IDS[victim])
            .collect();
        // A probe device on the victim: how long until its user is offline
        // as seen from a survivor (presence convergence).
        let probe_user = format!("probe-{k}");
        let probe = connect_ws(&cluster.addr(victim), &token(&config, &probe_user), WAIT)
            .await
            .expect("probe connects");
        let online = wait_presence(&cluster.addr(victim), &probe_user, |p| {
            p["devices"].as_u64().unwrap_or(0) >= 1
        })
        .await;
        assert!(online.is_some(), "{probe_user} online on {}", IDS[victim]);
        let survivor = (victim + 1) % IDS.len();
        let node = nodes[victim].take().unwrap();
        let killed_at = Instant::now();
        match mode {
            Mode::Kill => {
                node.kill();
            }
            Mode::Rolling => {
                let (c, n) = (node, IDS[victim]);
                let st = tokio::task::spawn_blocking(move || c.terminate())
                    .await
                    .unwrap();
                assert!(st.success(), "{n} exits 0 on SIGTERM: {st:?}");
                eprintln!("{n} stopped {:?} after SIGTERM", killed_at.elapsed());
            }
        }
        killed[victim] += 1;
        let offline = tokio::spawn(wait_presence(
            cluster.addr(survivor),
            probe_user.clone(),
            |p| p["status"] == "offline" && p["devices"].as_u64() == Some(0),
        ));

        // Failover: the first acknowledged publish to one of its rooms that
        // was sent after the kill (none to wait for if it owned none).
        let mut failover = None;
        let found = its_rooms.is_empty()
            || wait_until(LONG_WAIT, || {
                failover = acks
                    .lock()
                    .unwrap()
                    .iter()
                    .filter(|a| a.attempt > killed_at && its_rooms.contains(&a.room))
                    .map(|a| a.at - killed_at)
                    .min();
                failover.is_some()
            })
            .await;
        assert!(
            found,
            "kill {k} of {}: no publish to its rooms {its_rooms:?} acknowledged within {LONG_WAIT:?}",
            IDS[victim]
        );
        if let Some(f) = failover {
            failovers.push(f);
        }
        let converged = offline.await.unwrap();
        drop(probe);
        let Some(converged) = converged else {
            panic!(
                "kill {k}: {probe_user} of {} still online after {LONG_WAIT:?}",
                IDS[victim]
            );
        };
        let converged = converged.saturating_duration_since(killed_at);
        presence_times.push(converged);
        eprintln!(
            "kill {k}: {} (owner of {:?}), failover {failover:?}, presence offline after {converged:?}",
            IDS[victim],
            its_rooms.iter().map(|&r| ROOMS[r]).collect::<Vec<_>>()
        );

        // Restart it with the same id, seeded with a survivor's gossip address.
        let s = status_of(&config, &cluster.addr(survivor), None)
            .await
            .expect("survivor status");
        let seed_addr = s["members"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["id"] == IDS[survivor] && m["state"] == "up")
            .and_then(|m| m["gossip"].as_str())
            .expect("the survivor's gossip address")
            .to_string();
        let (c, id) = (config.clone(), IDS[victim]);
        let node = tokio::task::spawn_blocking(move || Node::start(&c, id, Some(&seed_addr)))
            .await
            .unwrap();
        cluster.set(victim, node.addr.clone());
        nodes[victim] = Some(node);
        converge(&config, &cluster).await;
        eprintln!(
            "{} back and seen up by all {:?} after going down",
            IDS[victim],
            killed_at.elapsed()
        );
        // Traffic between kills.
        let mark = acks.lock().unwrap().len();
        let flowing = wait_until(LONG_WAIT, || {
            acks.lock().unwrap().len() >= mark + TRAFFIC_BETWEEN_KILLS || publisher.is_finished()
        })
        .await;
        assert!(flowing, "traffic flows after restarting {}", IDS[victim]);
    }

    // 6. Stop publishing; one final message per room.
    stop_pub.send(true).unwrap();
    let next = match publisher.await.unwrap() {
        Ok(n) => n,
        Err(e) => panic!("{e}"),
    };
    let client = reqwest::Client::builder()
        .timeout(PUBLISH_TIMEOUT)
        .build()
        .unwrap();
    let mut finals = Vec::new();
    for r in 0..ROOMS.len() {
        let ack = match publish(&client, &cluster, r, next + r as u64).await {
            Ok(a) => a,
            Err(e) => panic!("final publish: {e}"),
        };
        finals.push(ack.offset);
        acks.lock().unwrap().push(ack);
    }
    let caught_up = wait_until(LONG_WAIT, || {
        subs.iter().all(|s| {
            let s = s.lock().unwrap();
            s.rooms.iter().zip(&finals).all(|(r, f)| r.last >= *f)
        })
    })
    .await;
    if !caught_up {
        for s in &subs {
            let s = s.lock().unwrap();
            eprintln!(
                "{} on {} connected {} reconnects {} (last end: {}): last {:?} (finals {finals:?}), problems {:?}",
                s.user,
                IDS[s.slot],
                s.connected,
                s.reconnects,
                s.last_end,
                s.rooms.iter().map(|r| r.last).collect::<Vec<_>>(),
                s.problems
            );
        }
        panic!("subscribers did not all see every room's final offset within {LONG_WAIT:?}");
    }

    // (c) Presence: every subscriber is on a live node (online or idle);
    // a lonely client of a killed node is offline, of a never-killed one online.
    let mut presence_problems = Vec::new();
    for s in &subs {
        let user = s.lock().unwrap().user.clone();
        let live = wait_presence(cluster.addr(0), &user, |p| {
            p["status"] != "offline" && p["devices"].as_u64().unwrap_or(0) >= 1
        })
        .await;
        if live.is_none() {
            presence_problems.push(format!("{user} not shown on a live node"));
        }
    }
    for slot in 0..IDS.len() {
        let user = format!("lonely-{slot}");
        let gone = *lonely_gone[slot].lock().unwrap();
        if gone != (killed[slot] > 0) {
            presence_problems.push(format!(
                "{user}: socket closed {gone}, its node killed {} times",
                killed[slot]
            ));
        }
        let want_offline = killed[slot] > 0;
        let settled = wait_presence(cluster.addr((slot + 1) % IDS.len()), &user, |p| {
            let offline = p["status"] == "offline";
            let devices = p["devices"].as_u64().unwrap_or(0);
            (want_offline && offline && devices == 0) || (!want_offline && !offline && devices >= 1)
        })
        .await;
        if settled.is_none() {
            presence_problems.push(format!(
                "{user} (offline expected: {want_offline}) not settled"
            ));
        }
    }

    stop_subs.send(true).unwrap();
    for t in sub_tasks {
        let _ = tokio::time::timeout(WAIT, t).await;
    }
    for t in lonely_tasks {
        t.abort();
    }

    // (a) History: every acknowledged message exactly once, in offset order.
    let acks = acks.lock().unwrap().clone();
    let dup_acks = acks.iter().filter(|a| a.duplicate).count();
    let mut lost = 0usize;
    let mut duplicated = 0usize;
    let mut history_problems = Vec::new();
    for (r, room) in ROOMS.iter().enumerate() {
        // What was acknowledged, by offset (a retry acknowledged twice at the
        // same offset counts once; one text at two offsets is a duplicate).
        let mut by_offset: BTreeMap<u64, String> = BTreeMap::new();
        let mut text_offsets: HashMap<&str, u64> = HashMap::new();
        for a in acks.iter().filter(|a| a.room == r) {
            if let Some(prev) = by_offset.insert(a.offset, a.text.clone()) {
                if prev != a.text {
                    history_problems.push(format!(
                        "{room}: offset {} acknowledged for {prev} and {}",
                        a.offset, a.text
                    ));
                }
            }
            if let Some(o) = text_offsets.insert(&a.text, a.offset) {
                if o != a.offset {
                    duplicated += 1;
                    history_problems.push(format!(
                        "{room}: {} acknowledged at offsets {o} and {}",
                        a.text, a.offset
                    ));
                }
            }
        }
        let entries = room_history(&cluster.addr(r), room).await;
        let offsets: Vec<u64> = entries
            .iter()
            .map(|e| e["offset"].as_u64().unwrap())
            .collect();
        if let Some(w) = offsets.windows(2).find(|w| w[1] != w[0] + 1) {
            history_problems.push(format!("{room}: history offsets jump {} -> {}", w[0], w[1]));
        }
        let stored: Vec<(u64, String)> = entries
            .iter()
            .filter(|e| e["kind"] == "message" && e["sender"] == "pub")
            .map(|e| {
                (
                    e["offset"].as_u64().unwrap(),
                    e["text"].as_str().unwrap_or("").to_string(),
                )
            })
            .collect();
        let mut count: HashMap<&str, usize> = HashMap::new();
        for (_, t) in &stored {
            *count.entry(t).or_default() += 1;
        }
        for (t, c) in &count {
            if *c > 1 {
                duplicated += c - 1;
                history_problems.push(format!("{room}: {t} stored {c} times"));
            }
        }
        for (o, t) in &by_offset {
            if !stored.iter().any(|(so, st)| so == o && st == t) {
                lost += 1;
                history_problems.push(format!("{room}: acknowledged {t} at {o} not in history"));
            }
        }
        let expected: Vec<(u64, String)> = by_offset.into_iter().collect();
        if stored != expected && history_problems.is_empty() {
            history_problems.push(format!(
                "{room}: history has {} messages, {} acknowledged",
                stored.len(),
                expected.len()
            ));
        }
    }

    // (b) Subscribers: per room, from the join, every offset once, +1 each.
    let mut sub_problems = Vec::new();
    let (mut reconnects, mut resub_pushes, mut missed) = (0, 0, 0);
    for s in &subs {
        let s = s.lock().unwrap();
        reconnects += s.reconnects;
        resub_pushes += s.resubscribe_pushes;
        missed += s.missed_recovered;
        sub_problems.extend(s.problems.iter().cloned());
        for (r, seen) in s.rooms.iter().enumerate() {
            if let Some(&first) = seen.offsets.first() {
                if first != seen.join_head + 1 {
                    sub_problems.push(format!(
                        "{} {}: first entry {first} after a join at head {} (first ones: {:?})",
                        s.user,
                        ROOMS[r],
                        seen.join_head,
                        &seen.offsets[..seen.offsets.len().min(6)]
                    ));
                }
            }
            if let Some(i) = seen.offsets.windows(2).position(|w| w[1] != w[0] + 1) {
                let lo = i.saturating_sub(3);
                let hi = (i + 5).min(seen.offsets.len());
                sub_problems.push(format!(
                    "{} {}: {} after {} (around: {:?})",
                    s.user,
                    ROOMS[r],
                    seen.offsets[i + 1],
                    seen.offsets[i],
                    &seen.offsets[lo..hi]
                ));
            }
        }
    }

    // 7. The figures.
    failovers.sort();
    if failovers.is_empty() {
        eprintln!("failover: no measurement");
    } else {
        eprintln!(
            "failover (kill -> first acknowledged publish to a room it owned): count {} min {:?} p50 {:?} p99 {:?} max {:?}",
            failovers.len(),
            failovers[0],
            percentile(&failovers, 50),
            percentile(&failovers, 99),
            failovers[failovers.len() - 1]
        );
    }
    presence_times.sort();
    if let (Some(lo), Some(hi)) = (presence_times.first(), presence_times.last()) {
        eprintln!(
            "presence (kill -> its device offline at a survivor): count {} min {lo:?} p50 {:?} p99 {:?} max {hi:?}",
            presence_times.len(),
            percentile(&presence_times, 50),
            percentile(&presence_times, 99),
        );
    }
    let distinct: std::collections::HashSet<(usize, u64)> =
        acks.iter().map(|a| (a.room, a.offset)).collect();
    eprintln!(
        "acknowledged {} ({} distinct), duplicates-acknowledged {dup_acks}, lost {lost}, duplicated {duplicated}; \
         subscribers: {reconnects} reconnects, {resub_pushes} resubscribe pushes, {missed} missed entries recovered; \
         kills per node {killed:?}",
        acks.len(),
        distinct.len()
    );
    let problems: Vec<String> = history_problems
        .iter()
        .chain(&sub_problems)
        .chain(&presence_problems)
        .cloned()
        .collect();
    for p in &problems {
        eprintln!("problem: {p}");
    }
    assert_eq!(lost, 0, "lost acknowledged messages");
    assert_eq!(duplicated, 0, "duplicated messages");
    assert!(
        history_problems.is_empty(),
        "(a) history: {history_problems:#?}"
    );
    assert!(
        sub_problems.is_empty(),
        "(b) subscribers: {sub_problems:#?}"
    );
    assert!(
        presence_problems.is_empty(),
        "(c) presence: {presence_problems:#?}"
    );
    drop(nodes);
}
