//! The document figures in docs/benchmarks.md. Ignored by default (they
//! measure, they do not check); run them with
//!
//! ```sh
//! cargo test --release -p chorus-tests --test docs_bench -- --ignored --nocapture --test-threads 1
//! ```

use std::sync::Arc;
use std::time::{Duration, Instant};

use chorus_actors::doc::state::DocState;
use chorus_protocol::Encoding;
use chorus_storage::embedded::{EmbeddedConfig, EmbeddedStore};
use chorus_storage::{DocUpdate, Store};
use chorus_tests::ydoc::{insert, local_edit, YClient};
use chorus_tests::{eventually, test_dir, TestNode};
use serde_json::json;
use yrs::sync::{Message, SyncMessage};
use yrs::{Doc, Text, WriteTxn};

fn pct(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// The baseline of the round trips, on the same kind of node: a chat
/// message from one member until it is pushed to every other member of a
/// room (the durable write and fan-out path documents share).
async fn chat_round_trip(members: usize, rounds: usize) -> (Duration, Duration) {
    let node = TestNode::start_with(test_dir(), |c| {
        c.limits.rate_per_sec = 100_000;
        c.limits.rate_burst = 100_000;
    })
    .await;
    let mut clients = Vec::new();
    for i in 0..members {
        let mut c = node.connect(&format!("m{i}"), Encoding::Json).await;
        if i == 0 {
            c.ok("room.create", json!({"room": "bench-rt", "kind": "public"}))
                .await;
        }
        c.ok("room.join", json!({"room": "bench-rt"})).await;
        c.ok("subscribe", json!({"channel": "room:bench-rt"})).await;
        clients.push(c);
    }
    let mut lat = Vec::with_capacity(rounds * (members - 1));
    for r in 0..rounds {
        let from = r % members;
        let text = format!("{r}");
        let sent = Instant::now();
        clients[from]
            .ok("room.send", json!({"room": "bench-rt", "text": text}))
            .await;
        for (i, c) in clients.iter_mut().enumerate() {
            if i == from {
                continue;
            }
            c.push_where(|p| p.push == "entry" && p.data["text"] == text.as_str())
                .await;
            lat.push(sent.elapsed());
        }
    }
    lat.sort_unstable();
    (pct(&lat, 0.5), pct(&lat, 0.99))
}

/// Round trip: one editor's update until it is applied at every other
/// editor, and the chat baseline in the same run.
async fn round_trip(editors: usize, rounds: usize) {
    let node = TestNode::start_with(test_dir(), |c| {
        c.docs.updates_per_sec = 100_000;
        c.docs.updates_burst = 100_000;
    })
    .await;
    let mut clients = Vec::new();
    for i in 0..editors {
        let mut c = YClient::connect(&node, "bench-rt", &node.token(&format!("u{i}"))).await;
        c.drain().await;
        clients.push(c);
    }
    let mut lat = Vec::with_capacity(rounds * (editors - 1));
    for r in 0..rounds {
        let from = r % editors;
        let marker = format!("{r},");
        let update = local_edit(&clients[from].doc, |txn| {
            let t = txn.get_or_insert_text("body");
            let len = t.len(txn);
            t.insert(txn, len, &marker);
        });
        let sent = Instant::now();
        clients[from]
            .send(Message::Sync(SyncMessage::Update(update)))
            .await;
        for (i, c) in clients.iter_mut().enumerate() {
            if i == from {
                continue;
            }
            let want = marker.clone();
            c.until("the update", move |c| c.text().contains(&want))
                .await;
            lat.push(sent.elapsed());
        }
    }
    lat.sort_unstable();
    let (p50, p99) = (pct(&lat, 0.5), pct(&lat, 0.99));
    drop(clients);
    drop(node);
    let (c50, c99) = chat_round_trip(editors, rounds).await;
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    println!(
        "round trip, {editors} editors, {rounds} updates: p50 {:.2} ms, p99 {:.2} ms ({} samples); \
         chat baseline p50 {:.2} ms, p99 {:.2} ms; ratio p50 {:.2}x, p99 {:.2}x",
        ms(p50),
        ms(p99),
        lat.len(),
        ms(c50),
        ms(c99),
        ms(p50) / ms(c50),
        ms(p99) / ms(c99)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn bench_round_trip_2_editors() {
    round_trip(2, 500).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn bench_round_trip_50_editors() {
    round_trip(50, 100).await;
}

/// Updates one document makes durable per second: 10 editors send as fast
/// as they can; timed until the server's seq reaches the total.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn bench_updates_per_second_one_doc() {
    let node = TestNode::start_with(test_dir(), |c| {
        c.docs.updates_per_sec = 1_000_000;
        c.docs.updates_burst = 1_000_000;
    })
    .await;
    let (editors, each) = (10, 2000);
    let mut clients = Vec::new();
    for i in 0..editors {
        let mut c = YClient::connect(&node, "bench-tp", &node.token(&format!("w{i}"))).await;
        c.drain().await;
        clients.push(c);
    }
    let updates: Vec<Vec<Vec<u8>>> = clients
        .iter()
        .map(|c| (0..each).map(|_| local_edit(&c.doc, insert("x"))).collect())
        .collect();
    let started = Instant::now();
    let mut tasks = Vec::new();
    for (mut c, ups) in clients.into_iter().zip(updates) {
        tasks.push(tokio::spawn(async move {
            for u in ups {
                c.send(Message::Sync(SyncMessage::Update(u))).await;
            }
            c
        }));
    }
    let mut clients = Vec::new();
    for t in tasks {
        clients.push(t.await.unwrap());
    }
    let total = (editors * each) as u64;
    // Keep reading so no socket backs up while we wait.
    let reader = tokio::spawn(async move {
        loop {
            for c in clients.iter_mut() {
                c.drain().await;
            }
        }
    });
    eventually("every update durable", || async {
        let (s, v) = node.api("GET", "/api/v1/docs/bench-tp", None).await;
        (s == 200 && v["seq"].as_u64() == Some(total)).then_some(())
    })
    .await;
    let secs = started.elapsed().as_secs_f64();
    reader.abort();
    println!(
        "one document, {editors} editors: {total} durable updates in {secs:.2} s = {:.0} updates/s",
        total as f64 / secs
    );
}

/// Load time of a document with 100,000 updates: the whole log, then after
/// compaction (one snapshot).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn bench_load_100k_updates_before_and_after_compaction() {
    let dir = test_dir();
    let config = EmbeddedConfig {
        path: dir.path().join("store"),
        ..EmbeddedConfig::default()
    };
    let store: Arc<dyn Store> = Arc::new(EmbeddedStore::open(&config).unwrap());
    let doc = Doc::with_client_id(1);
    let mut batch = Vec::new();
    for i in 0..100_000u64 {
        let u = local_edit(&doc, |txn| {
            let t = txn.get_or_insert_text("body");
            let len = t.len(txn);
            if i % 10 == 9 && len > 5 {
                t.remove_range(txn, len - 3, 2);
            } else {
                t.insert(txn, len, "ab");
            }
        });
        batch.push(DocUpdate {
            seq: i + 1,
            data: u,
        });
        if batch.len() == 1000 {
            store.doc_append("big", &batch).await.unwrap();
            batch.clear();
        }
    }
    let time_load = || async {
        let started = Instant::now();
        let rec = store.doc_load("big").await.unwrap().unwrap();
        let state = DocState::load(&rec).unwrap();
        (
            started.elapsed(),
            state,
            rec.updates.len(),
            rec.stored_bytes(),
        )
    };
    let (before, state, n, bytes) = time_load().await;
    assert_eq!(state.head(), 100_000);
    let snapshot = state.encode_state();
    store.doc_compact("big", 100_000, &snapshot).await.unwrap();
    let (after, compacted, m, cbytes) = time_load().await;
    assert_eq!(compacted.encode_state(), snapshot);
    println!(
        "load, 100,000 updates: whole log ({n} updates, {bytes} bytes) {:.0} ms; \
         after compaction ({m} updates, {cbytes} bytes) {:.1} ms: {:.0}x faster",
        before.as_secs_f64() * 1e3,
        after.as_secs_f64() * 1e3,
        before.as_secs_f64() / after.as_secs_f64()
    );
}
