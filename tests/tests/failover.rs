//! Failure and ownership changes: what a stopping owner still answers.

use std::time::Duration;

use chorus_actors::room::Publish;
use chorus_actors::services::Replier;
use chorus_protocol::Encoding;
use chorus_protocol::EntryKind;
use chorus_tests::cluster::Sandbox;
use chorus_tests::store::HeldStore;
use chorus_tests::{eventually, metric, test_config, test_dir, Client, TestNode, POLL};
use serde_json::{json, Value};

fn publication(text: String, replier: Replier) -> Publish {
    Publish {
        sender: None,
        as_client: false,
        kind: EntryKind::Publish,
        text: Some(text),
        attachments: None,
        reply_to: None,
        data: None,
        client_id: None,
        replier,
    }
}

/// A room stopped while its write is in flight and more is queued behind
/// it acknowledges the write and writes the queue before it goes: every
/// publish that reached it is answered, and each answer is in the store.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_room_stopped_mid_batch_answers_everything_it_took() {
    let dir = test_dir();
    let config = test_config(dir.path());
    let store = chorus_storage::open(&config.storage).await.expect("store");
    let held = HeldStore::new(store.clone());
    let deps = chorus_node::Deps {
        store: Some(held.clone()),
        ..Default::default()
    };
    let node = TestNode::start_deps(dir, config, deps).await;
    let svc = node.handle().services().clone();
    let key = "topic:busy";

    held.hold();
    let mut answers = Vec::new();
    let (first, rx) = Replier::waiter();
    svc.tell_room(key, publication("m0".into(), first))
        .await
        .unwrap();
    answers.push(rx);
    eventually("the first write to be in flight", || async {
        (held.waiting() == 1).then_some(())
    })
    .await;
    // In the room's mailbox behind the write: they queue for the next batch.
    for i in 1..10 {
        let (r, rx) = Replier::waiter();
        svc.tell_room(key, publication(format!("m{i}"), r))
            .await
            .unwrap();
        answers.push(rx);
    }
    let stopping = tokio::spawn({
        let svc = svc.clone();
        async move { svc.stop_actors(Duration::from_secs(20)).await }
    });
    eventually("the room to be taken out of the registry", || async {
        (svc.active_counts().0 == 0).then_some(())
    })
    .await;
    held.release();
    assert_eq!(stopping.await.unwrap(), 0, "the room stopped in time");

    let mut offsets = Vec::new();
    for (i, rx) in answers.into_iter().enumerate() {
        let v: Value = tokio::time::timeout(Duration::from_secs(10), rx)
            .await
            .expect("answered")
            .unwrap_or_else(|_| panic!("publish {i} was dropped unanswered"))
            .unwrap_or_else(|f| panic!("publish {i} failed: {f}"));
        offsets.push(v["offset"].as_u64().unwrap());
    }
    assert_eq!(offsets, (1..=10).collect::<Vec<u64>>());
    let stored = store.read_range(key, 1, 10, 100).await.unwrap();
    let texts: Vec<String> = stored.iter().filter_map(|e| e.text.clone()).collect();
    assert_eq!(texts, (0..10).map(|i| format!("m{i}")).collect::<Vec<_>>());
    node.kill();
}

/// Sends `text` with `client_id` until an owner acknowledges it, as a
/// client does across a failover: errors and timeouts are retried (the
/// retry of a publish that did land answers `duplicate`).
async fn send_until_acked(client: &mut Client, room: &str, text: &str) -> u64 {
    let args = json!({"room": room, "text": text, "client_id": text});
    let deadline = tokio::time::Instant::now() + FAILOVER_BOUND;
    loop {
        match client.request("room.send", args.clone()).await {
            Ok(v) => return v["offset"].as_u64().expect("an offset"),
            Err(e) => assert!(e.code.retryable(), "a retryable error, got {e:?}"),
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "`{text}` not acknowledged within {FAILOVER_BOUND:?}"
        );
        tokio::time::sleep(POLL).await;
    }
}

/// The (offset, text) of every message stored in `channel` after `after`.
async fn stored_messages(reader: &mut Client, channel: &str, after: u64) -> Vec<(u64, String)> {
    let h = reader
        .ok(
            "history",
            json!({"channel": channel, "after": after, "limit": 100}),
        )
        .await;
    h["entries"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["kind"] == "message")
        .map(|e| {
            (
                e["offset"].as_u64().unwrap(),
                e["text"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

/// Failure detection plus a request timeout, with room to spare on a loaded machine.
const FAILOVER_BOUND: Duration = Duration::from_secs(30);

/// The offsets of the `entry` pushes on `channel`, up to and with `last`.
async fn entries_up_to(client: &mut Client, channel: &str, last: u64) -> Vec<u64> {
    let mut got = Vec::new();
    while got.last() != Some(&last) {
        let p = client
            .push_where(|p| p.push == "entry" && p.channel.as_deref() == Some(channel))
            .await;
        got.push(p.offset.expect("an entry has an offset"));
    }
    got
}

/// The owner of a room dies. Subscribers on the surviving nodes keep their
/// subscription without doing anything: their hubs re-register them at the
/// new owner, which replays what they missed from the store, so each sees
/// every entry once, in offset order. The dead node's connections leave
/// presence, and connections whose user actor lived there are announced
/// again at the new owner.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribers_and_presence_survive_the_death_of_an_owner() {
    let mut cluster = Sandbox::start(3).await;
    let room = cluster.key_owned_by(2, "room:failover-");
    let name = room.trim_start_matches("room:").to_string();
    // carol's actor survives, her only device does not; dave's actor dies,
    // his device survives.
    let carol = cluster.key_owned_by(0, "user:carol-").replace("user:", "");
    let dave = cluster.key_owned_by(2, "user:dave-").replace("user:", "");

    let mut alice = cluster.node(0).connect("alice", Encoding::Json).await;
    alice
        .ok("room.create", json!({"room": name, "kind": "public"}))
        .await;
    alice.ok("room.join", json!({"room": name})).await;
    let mut bob = cluster.node(1).connect("bob", Encoding::MsgPack).await;
    bob.ok("room.join", json!({"room": name})).await;
    let _carol = cluster.node(2).connect(&carol, Encoding::Json).await;
    let _dave = cluster.node(0).connect(&dave, Encoding::Json).await;
    let w = bob
        .ok("presence.watch", json!({"users": [carol, dave]}))
        .await;
    assert!(
        w["users"]
            .as_array()
            .unwrap()
            .iter()
            .all(|p| p["status"] == "online"),
        "{w}"
    );

    let mut acked = Vec::new();
    for i in 0..3 {
        acked.push(send_until_acked(&mut alice, &name, &format!("before-{i}")).await);
    }
    let first = {
        let mut first = None;
        for c in [&mut alice, &mut bob] {
            let got = entries_up_to(c, &room, acked[2]).await;
            first.get_or_insert(got[0]);
        }
        first.unwrap()
    };

    let _ = cluster.nodes.remove(2).kill();
    let killed = std::time::Instant::now();
    acked.push(send_until_acked(&mut alice, &name, "after-0").await);
    // The figure in docs/benchmarks.md (`-- --nocapture` prints it).
    eprintln!(
        "failover: first publish to the moved room acknowledged {:?} after the kill",
        killed.elapsed()
    );
    for i in 1..5 {
        acked.push(send_until_acked(&mut alice, &name, &format!("after-{i}")).await);
    }
    assert!(cluster.owner_of(&room) < 2, "the room moved to a survivor");
    let last = *acked.last().unwrap();
    for (who, c) in [("alice", &mut alice), ("bob", &mut bob)] {
        let got = entries_up_to(c, &room, last).await;
        let want: Vec<u64> = (acked[2] + 1..=last).collect();
        assert_eq!(
            got, want,
            "{who} saw every entry after the kill once, in order"
        );
    }
    let h = bob
        .ok("history", json!({"channel": room, "after": first - 1}))
        .await;
    let texts: Vec<&str> = h["entries"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["text"].as_str())
        .collect();
    let mut want: Vec<String> = (0..3).map(|i| format!("before-{i}")).collect();
    want.extend((0..5).map(|i| format!("after-{i}")));
    assert_eq!(texts, want, "every acknowledged message is stored once");

    // carol's device died with its node: her watchers see her go offline.
    let p = bob
        .push_where(|p| {
            p.push == "presence"
                && p.data["user"] == carol.as_str()
                && p.data["status"] == "offline"
        })
        .await;
    assert_eq!(p.data["devices"], 0);
    // dave's device lives on: the new owner of his actor knows it.
    let deadline = tokio::time::Instant::now() + FAILOVER_BOUND;
    loop {
        let q = bob.ok("presence.query", json!({"users": [dave]})).await;
        // Online or idle (the test's client sends nothing): connected, once.
        if q["users"][0]["status"] != "offline" && q["users"][0]["devices"] == 1 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "dave is {q}");
        tokio::time::sleep(POLL).await;
    }
    let m = cluster.node(1).metrics().await;
    assert!(
        metric(&m, "chorus_cluster_resubscriptions_total").unwrap_or(0.0) >= 1.0,
        "{m}"
    );
}

/// A node joins while messages flow: the room it now owns moves to it (its
/// old owner hands it over), every publish is acknowledged after at most a
/// retry, and subscribers on the old nodes go on receiving every entry
/// once, in order, without subscribing again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_joins_under_load_and_subscribers_follow_the_moved_room() {
    use chorus_actors::placement::{NodeId, View};
    let mut cluster = Sandbox::start(2).await;
    let three = View::new(["node-0", "node-1", "node-2"].map(NodeId::new));
    let room = (0..10_000)
        .map(|i| format!("room:joiner-{i}"))
        .find(|k| three.owner(k).map(NodeId::as_str) == Some("node-2"))
        .expect("some key moves to the joiner");
    let name = room.trim_start_matches("room:").to_string();

    let mut alice = cluster.node(0).connect("alice", Encoding::Json).await;
    alice
        .ok("room.create", json!({"room": name, "kind": "public"}))
        .await;
    alice.ok("room.join", json!({"room": name})).await;
    let mut bob = cluster.node(1).connect("bob", Encoding::MsgPack).await;
    bob.ok("room.join", json!({"room": name})).await;
    let mut carol = cluster.node(1).connect("carol", Encoding::Json).await;
    carol.ok("room.join", json!({"room": name})).await;

    let publisher = tokio::spawn({
        let name = name.clone();
        async move {
            let mut acked = Vec::new();
            for i in 0..40 {
                acked.push(send_until_acked(&mut carol, &name, &format!("m{i}")).await);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            acked
        }
    });
    cluster.join().await;
    let acked = publisher.await.expect("the publisher finished");
    assert_eq!(cluster.owner_of(&room), 2, "the room moved to the joiner");
    let mut sorted = acked.clone();
    sorted.dedup();
    assert_eq!(sorted, acked, "acknowledged in order, each once");

    let last = *acked.last().unwrap();
    for (who, c) in [("alice", &mut alice), ("bob", &mut bob)] {
        let got = entries_up_to(c, &room, last).await;
        let from = got[0];
        assert_eq!(
            got,
            (from..=last).collect::<Vec<u64>>(),
            "{who} saw every entry once, in order"
        );
        assert!(from <= acked[0], "{who} saw them all");
    }
    // Traffic after the move reaches them too.
    let next = send_until_acked(&mut alice, &name, "after the join").await;
    for c in [&mut alice, &mut bob] {
        assert_eq!(entries_up_to(c, &room, next).await, vec![next]);
    }
    for i in 0..2 {
        let m = cluster.node(i).metrics().await;
        assert!(
            metric(&m, "chorus_cluster_resubscriptions_total").unwrap_or(0.0) >= 1.0,
            "node {i} re-registered its subscribers: {m}"
        );
    }
}

/// Node 2 is cut off from the others (gossip and links) while clients on
/// both sides write to the same room: each side believes it owns the room.
/// The store's conditional append lets only one writer have each offset;
/// the other's callers get a retryable error and retry. Subscribers on both
/// sides see one gap-free sequence throughout, and after the partition heals
/// the cluster has one owner again and every acknowledged message is in
/// history exactly once, in the order of its offsets.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_owners_during_a_partition_never_share_an_offset() {
    let cluster = Sandbox::partitionable(3).await;
    let room = cluster.key_owned_by(2, "room:split-");
    let name = room.trim_start_matches("room:").to_string();
    let mut alice = cluster.node(0).connect("alice", Encoding::Json).await;
    alice
        .ok("room.create", json!({"room": name, "kind": "public"}))
        .await;
    alice.ok("room.join", json!({"room": name})).await;
    let mut bob = cluster.node(2).connect("bob", Encoding::MsgPack).await;
    bob.ok("room.join", json!({"room": name})).await;

    cluster.split_off(2).await;
    assert_ne!(
        cluster
            .node(0)
            .handle()
            .services()
            .cluster
            .owner(&room)
            .as_str(),
        "node-2",
        "the majority side owns the room too"
    );
    let mut acked = Vec::new();
    for i in 0..6 {
        let (c, text) = if i % 2 == 0 {
            (&mut alice, format!("majority-{i}"))
        } else {
            (&mut bob, format!("minority-{i}"))
        };
        let offset = send_until_acked(c, &name, &text).await;
        acked.push((offset, text));
    }
    cluster.heal();
    cluster.wait_converged().await;
    for (i, text) in [(0, "healed-a"), (2, "healed-b")] {
        let c = if i == 0 { &mut alice } else { &mut bob };
        let offset = send_until_acked(c, &name, text).await;
        acked.push((offset, text.to_string()));
    }
    let mut offsets: Vec<u64> = acked.iter().map(|(o, _)| *o).collect();
    offsets.sort();
    offsets.dedup();
    assert_eq!(
        offsets.len(),
        acked.len(),
        "no offset acknowledged twice: {acked:?}"
    );

    let last = *offsets.last().unwrap();
    for (who, c) in [("alice", &mut alice), ("bob", &mut bob)] {
        let got = entries_up_to(c, &room, last).await;
        let from = got[0];
        assert_eq!(
            got,
            (from..=last).collect::<Vec<u64>>(),
            "{who}: gap-free, once each"
        );
        assert!(from <= offsets[0], "{who} saw every acknowledged entry");
    }
    acked.sort();
    let mut reader = cluster.node(1).connect("carol", Encoding::Json).await;
    let stored = stored_messages(&mut reader, &room, offsets[0] - 1).await;
    assert_eq!(
        stored, acked,
        "every acknowledged message, once, in offset order"
    );
}

/// An owner that stayed active while another node wrote to its room (views
/// disagreed: here a partition; in a rolling restart, a restarted owner
/// that activated before the others saw it up) resumes a subscriber who
/// is ahead of the head it knows: it reloads the head from the store
/// instead of refusing a stored offset as `offset_ahead`, and pushes what
/// it missed to the subscribers it has. Once the views agree again, the
/// writes go on after what both sides stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_owner_behind_another_writer_resumes_a_subscriber_ahead_of_it() {
    let cluster = Sandbox::partitionable(3).await;
    let room = cluster.key_owned_by(2, "room:behind-");
    let name = room.trim_start_matches("room:").to_string();
    let mut alice = cluster.node(0).connect("alice", Encoding::Json).await;
    alice
        .ok("room.create", json!({"room": name, "kind": "public"}))
        .await;
    alice.ok("room.join", json!({"room": name})).await;
    let first = send_until_acked(&mut alice, &name, "before").await;
    // carol's subscription keeps node 2's room active, at that head.
    let mut carol = cluster.node(2).connect("carol", Encoding::Json).await;
    let s = carol.ok("subscribe", json!({"channel": room})).await;
    let epoch = s["epoch"].as_str().unwrap().to_string();
    assert_eq!(s["offset"].as_u64(), Some(first));

    cluster.split_off(2).await;
    let mut last = first;
    for i in 0..3 {
        last = send_until_acked(&mut alice, &name, &format!("majority-{i}")).await;
    }
    assert!(last > first + 2, "three more acknowledged: {first}..{last}");

    // dave got those entries on the majority side; his device moves to
    // node 2, which still owns the room in its view and never wrote them.
    let mut dave = cluster.node(2).connect("dave", Encoding::MsgPack).await;
    let s = dave
        .ok(
            "subscribe",
            json!({"channel": room, "offset": last - 1, "epoch": epoch}),
        )
        .await;
    assert_eq!(s["recovered"], true, "resumed, not refused: {s}");
    assert_eq!(s["offset"].as_u64(), Some(last), "{s}");
    let missed: Vec<u64> = s["missed"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["offset"].as_u64().unwrap())
        .collect();
    assert_eq!(missed, vec![last], "{s}");
    // carol, subscribed at node 2 all along, gets what the other side stored.
    let got = entries_up_to(&mut carol, &room, last).await;
    assert_eq!(got, ((first + 1)..=last).collect::<Vec<u64>>());

    cluster.heal();
    cluster.wait_converged().await;
    let next = send_until_acked(&mut alice, &name, "healed").await;
    assert_eq!(next, last + 1, "numbered after what both sides stored");
    let stored = stored_messages(&mut alice, &room, first - 1).await;
    let texts: Vec<&str> = stored.iter().map(|(_, t)| t.as_str()).collect();
    assert_eq!(
        texts,
        ["before", "majority-0", "majority-1", "majority-2", "healed"]
    );
}

/// Node 2 is cut off from the others and from the store, as a node on the
/// side of a partition without the store's quorum is. Its clients' writes
/// fail with a retryable error, and none is acknowledged; the majority,
/// which took over the room, goes on acknowledging. erin's only device is
/// on node 2, so the majority sees her offline. Once the partition heals
/// the nodes agree on one owner again, erin is online again, the write she
/// retries with the same `client_id` is stored once, and every acknowledged
/// message is in history once, in offset order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_minority_without_the_store_acknowledges_nothing_and_converges_once_healed() {
    let cluster = Sandbox::partitionable(3).await;
    let room = cluster.key_owned_by(2, "room:island-");
    let name = room.trim_start_matches("room:").to_string();
    let mut alice = cluster.node(0).connect("alice", Encoding::Json).await;
    alice
        .ok("room.create", json!({"room": name, "kind": "public"}))
        .await;
    alice.ok("room.join", json!({"room": name})).await;
    let mut erin = cluster.node(2).connect("erin", Encoding::MsgPack).await;
    erin.ok("room.join", json!({"room": name})).await;
    let mut acked = vec![(
        send_until_acked(&mut alice, &name, "before").await,
        "before".to_string(),
    )];

    cluster.split_off(2).await;
    cluster.cut_from_store(2);

    // The minority side acknowledges nothing: every try is a retryable error.
    let island = json!({"room": name, "text": "from the island", "client_id": "island"});
    for _ in 0..3 {
        let e = erin
            .request("room.send", island.clone())
            .await
            .expect_err("a write on the side without the store is not acknowledged");
        assert!(e.code.retryable(), "a retryable error, got {e:?}");
    }
    // The majority does, and sees erin's only device gone with node 2.
    for i in 0..3 {
        let text = format!("majority-{i}");
        acked.push((send_until_acked(&mut alice, &name, &text).await, text));
    }
    let deadline = tokio::time::Instant::now() + FAILOVER_BOUND;
    loop {
        let q = alice.ok("presence.query", json!({"users": ["erin"]})).await;
        if q["users"][0]["status"] == "offline" {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "erin is {q}");
        tokio::time::sleep(POLL).await;
    }

    cluster.heal();
    cluster.wait_converged().await;
    let owners: Vec<String> = (0..3)
        .map(|i| {
            let c = &cluster.node(i).handle().services().cluster;
            c.owner(&room).as_str().to_string()
        })
        .collect();
    assert!(
        owners.iter().all(|o| *o == owners[0]),
        "one owner: {owners:?}"
    );
    // erin's retry, with the same client_id, is stored once.
    let offset = send_until_acked(&mut erin, &name, "island").await;
    acked.push((offset, "island".to_string()));
    let again = erin
        .ok(
            "room.send",
            json!({"room": name, "text": "island", "client_id": "island"}),
        )
        .await;
    assert_eq!(
        (again["offset"].as_u64(), again["duplicate"].as_bool()),
        (Some(offset), Some(true))
    );
    let deadline = tokio::time::Instant::now() + FAILOVER_BOUND;
    loop {
        let q = alice.ok("presence.query", json!({"users": ["erin"]})).await;
        if q["users"][0]["status"] != "offline" && q["users"][0]["devices"] == 1 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "erin is {q}");
        tokio::time::sleep(POLL).await;
    }

    acked.sort();
    let mut offsets: Vec<u64> = acked.iter().map(|(o, _)| *o).collect();
    offsets.dedup();
    assert_eq!(
        offsets.len(),
        acked.len(),
        "no offset acknowledged twice: {acked:?}"
    );
    let mut reader = cluster.node(1).connect("carol", Encoding::Json).await;
    let stored = stored_messages(&mut reader, &room, offsets[0] - 1).await;
    assert_eq!(
        stored, acked,
        "every acknowledged message, once, in offset order"
    );
}
