//! Catch-up: a client resubscribing with (offset, epoch) gets exactly what it
//! missed, then live entries, with no gap and no duplicate, even while the
//! room is being written to; or `recovered: false` with the reason. A
//! client-supplied id makes a retried send idempotent.

use std::collections::BTreeMap;

use chorus_protocol::Encoding;
use chorus_tests::{both_encodings, other, Client, TestNode};
use serde_json::{json, Value};

both_encodings!(
    resubscribe_gets_exactly_the_missed_entries_then_live_ones,
    resubscribe_while_the_room_is_written_to,
    unrecoverable_resubscribes_say_why,
    client_id_makes_a_retried_send_idempotent,
    client_ids_belong_to_their_sender,
);

fn offsets(entries: &Value) -> Vec<u64> {
    entries
        .as_array()
        .expect("entries")
        .iter()
        .map(|e| e["offset"].as_u64().unwrap())
        .collect()
}

async fn send(c: &mut Client, room: &str, text: &str) -> u64 {
    c.ok("room.send", json!({"room": room, "text": text})).await["offset"]
        .as_u64()
        .unwrap()
}

async fn resubscribe_gets_exactly_the_missed_entries_then_live_ones(enc: Encoding) {
    let node = TestNode::start().await;
    let mut alice = node.connect("alice", enc).await;
    alice
        .ok(
            "room.create",
            json!({"room": "c", "kind": "public", "membership_entries": true}),
        )
        .await;
    let mut bob = node.connect("bob", other(enc)).await;
    let j = bob.ok("room.join", json!({"room": "c"})).await;
    let epoch = j["epoch"].as_str().unwrap().to_string();
    for i in 0..3 {
        assert_eq!(send(&mut alice, "c", &format!("seen {i}")).await, 3 + i);
    }
    let mut last = 0;
    while last < 5 {
        let p = bob.entry("room:c", "message").await;
        assert_eq!(p.epoch.as_deref(), Some(epoch.as_str()));
        last = p.offset.unwrap();
    }
    bob.close().await;

    // Bob is away while four more arrive.
    for i in 0..4 {
        assert_eq!(send(&mut alice, "c", &format!("missed {i}")).await, 6 + i);
    }
    let mut bob = node.connect("bob", enc).await;
    let s = bob
        .ok(
            "subscribe",
            json!({"channel": "room:c", "offset": last, "epoch": epoch}),
        )
        .await;
    assert_eq!(s["recovered"], true);
    assert!(s.get("reason").is_none_or(Value::is_null));
    assert_eq!(
        (s["epoch"].as_str(), s["offset"].as_u64()),
        (Some(epoch.as_str()), Some(9))
    );
    assert_eq!(offsets(&s["missed"]), vec![6, 7, 8, 9]);
    let texts: Vec<&str> = s["missed"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["text"].as_str().unwrap())
        .collect();
    assert_eq!(texts, vec!["missed 0", "missed 1", "missed 2", "missed 3"]);

    // Then live, starting right after the catch-up.
    assert_eq!(send(&mut alice, "c", "live").await, 10);
    let p = bob.push("entry", Some("room:c")).await;
    assert_eq!(
        (p.offset, p.data["text"].as_str()),
        (Some(10), Some("live"))
    );
    assert!(
        !bob.has_buffered(|p| p.push == "entry"),
        "no duplicate of caught-up entries"
    );

    // Resubscribing at the head misses nothing and replays nothing.
    let mut carol = node.connect("carol", other(enc)).await;
    let s = carol
        .ok(
            "subscribe",
            json!({"channel": "room:c", "offset": 10, "epoch": epoch}),
        )
        .await;
    assert_eq!(
        (s["recovered"].as_bool(), s["offset"].as_u64()),
        (Some(true), Some(10))
    );
    assert_eq!(s["missed"], json!([]));
    // A subscription without an offset starts at the head.
    let s = carol.ok("subscribe", json!({"channel": "room:c"})).await;
    assert_eq!(
        (
            s["recovered"].as_bool(),
            s["offset"].as_u64(),
            s["missed"].clone()
        ),
        (Some(true), Some(10), json!([]))
    );
}

async fn resubscribe_while_the_room_is_written_to(enc: Encoding) {
    const TOTAL: u64 = 60;
    let node = TestNode::start().await;
    let mut alice = node.connect("alice", enc).await;
    let created = alice
        .ok(
            "room.create",
            json!({"room": "busy", "kind": "public", "membership_entries": true}),
        )
        .await;
    assert_eq!(created["id"], "busy");
    let j = alice.ok("room.join", json!({"room": "busy"})).await;
    let epoch = j["epoch"].as_str().unwrap().to_string();

    // Alice publishes TOTAL messages in pipelined bursts from another task.
    let (ten_sent, ten_acked) = tokio::sync::oneshot::channel();
    let writer = tokio::spawn(async move {
        let mut ten_sent = Some(ten_sent);
        let mut acked = Vec::new();
        for burst in 0..(TOTAL / 5) {
            let mut ids = Vec::new();
            for i in 0..5 {
                ids.push(
                    alice
                        .send(
                            "room.send",
                            json!({"room": "busy", "text": format!("m{}", burst * 5 + i)}),
                        )
                        .await,
                );
            }
            for id in ids {
                acked.push(
                    alice.reply(id).await.expect("send")["offset"]
                        .as_u64()
                        .unwrap(),
                );
            }
            if acked.len() >= 10 {
                if let Some(tx) = ten_sent.take() {
                    let _ = tx.send(());
                }
            }
        }
        acked
    });

    // Bob resubscribes from offset 1 in the middle of it.
    ten_acked.await.expect("writer started");
    let mut bob = node.connect("bob", other(enc)).await;
    let s = bob
        .ok(
            "subscribe",
            json!({"channel": "room:busy", "offset": 1, "epoch": epoch}),
        )
        .await;
    assert_eq!(s["recovered"], true);
    let mut seen = offsets(&s["missed"]);
    assert_eq!(seen.len() as u64, s["offset"].as_u64().unwrap() - 1);
    let acked = writer.await.expect("writer");
    assert_eq!(
        acked,
        (2..=TOTAL + 1).collect::<Vec<_>>(),
        "offsets follow the send order"
    );
    while seen.last().copied().unwrap_or(0) < TOTAL + 1 {
        let p = bob.push("entry", Some("room:busy")).await;
        assert_eq!(p.data["offset"], p.offset.unwrap());
        seen.push(p.offset.unwrap());
    }
    assert_eq!(
        seen,
        (2..=TOTAL + 1).collect::<Vec<_>>(),
        "missed + live = every entry once, in order"
    );
}

async fn unrecoverable_resubscribes_say_why(enc: Encoding) {
    let node = TestNode::start_with(chorus_tests::test_dir(), |c| c.limits.max_catchup = 5).await;
    let mut alice = node.connect("alice", enc).await;
    alice
        .ok(
            "room.create",
            json!({"room": "w", "kind": "public", "membership_entries": true}),
        )
        .await;
    let j = alice.ok("room.join", json!({"room": "w"})).await;
    let epoch = j["epoch"].as_str().unwrap().to_string();
    for i in 0..8 {
        assert_eq!(send(&mut alice, "w", &format!("m{i}")).await, 2 + i);
    }

    // Another epoch: the history the client knows is not this one.
    let mut bob = node.connect("bob", other(enc)).await;
    let s = bob
        .ok(
            "subscribe",
            json!({"channel": "room:w", "offset": 3, "epoch": "0123456789abcdef"}),
        )
        .await;
    assert_eq!(s["recovered"], false);
    assert_eq!(s["reason"], "epoch_changed", "the token alone: {s}");
    assert!(s["detail"].as_str().is_some_and(|d| !d.is_empty()), "{s}");
    assert_eq!(s["missed"], json!([]));
    assert_eq!(
        (s["epoch"].as_str(), s["offset"].as_u64()),
        (Some(epoch.as_str()), Some(9)),
        "the current position, to resync from"
    );
    // The subscription is live all the same.
    assert_eq!(send(&mut alice, "w", "after").await, 10);
    assert_eq!(bob.push("entry", Some("room:w")).await.offset, Some(10));

    // An offset the channel never had.
    let s = bob
        .ok(
            "subscribe",
            json!({"channel": "room:w", "offset": 50, "epoch": epoch}),
        )
        .await;
    assert_eq!(
        (s["recovered"].as_bool(), s["missed"].clone()),
        (Some(false), json!([]))
    );
    assert_eq!(s["reason"], "offset_ahead", "the token alone: {s}");
    assert!(s["detail"].as_str().is_some_and(|d| !d.is_empty()), "{s}");

    // Further behind than max_catchup (5): 10 - 4 = 6 missed.
    let s = bob
        .ok(
            "subscribe",
            json!({"channel": "room:w", "offset": 4, "epoch": epoch}),
        )
        .await;
    assert_eq!(
        (s["recovered"].as_bool(), s["missed"].clone()),
        (Some(false), json!([]))
    );
    assert_eq!(s["reason"], "too_far_behind", "the token alone: {s}");
    assert!(s["detail"].as_str().is_some_and(|d| !d.is_empty()), "{s}");
    // Exactly max_catchup behind is still recovered.
    let s = bob
        .ok(
            "subscribe",
            json!({"channel": "room:w", "offset": 5, "epoch": epoch}),
        )
        .await;
    assert_eq!(s["recovered"], true);
    assert_eq!(offsets(&s["missed"]), vec![6, 7, 8, 9, 10]);

    // Topics catch up the same way.
    for n in 1..=3 {
        let (_, v) = node
            .api(
                "POST",
                "/api/v1/topics/scores/publish",
                Some(json!({"data": {"n": n}})),
            )
            .await;
        assert_eq!(v["offset"], n);
    }
    let s = bob
        .ok("subscribe", json!({"channel": "topic:scores", "offset": 1}))
        .await;
    assert_eq!(s["recovered"], true);
    let ns: Vec<u64> = s["missed"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["data"]["n"].as_u64().unwrap())
        .collect();
    assert_eq!(ns, vec![2, 3]);
    let s = bob
        .ok(
            "subscribe",
            json!({"channel": "topic:scores", "offset": 1, "epoch": "nope"}),
        )
        .await;
    assert_eq!(s["recovered"], false);
    bob.alive().await;
}

async fn client_id_makes_a_retried_send_idempotent(enc: Encoding) {
    let node = TestNode::start().await;
    let mut alice = node.connect("alice", enc).await;
    let mut bob = node.connect("bob", other(enc)).await;
    alice
        .ok(
            "room.create",
            json!({"room": "i", "kind": "group", "members": ["bob"]}),
        )
        .await;
    bob.ok("room.join", json!({"room": "i"})).await;

    let msg = json!({"room": "i", "text": "once", "client_id": "c-1"});
    let a = alice.ok("room.send", msg.clone()).await;
    let b = alice.ok("room.send", msg.clone()).await;
    assert_eq!(
        (a["offset"].as_u64(), a["duplicate"].as_bool()),
        (Some(3), Some(false))
    );
    assert_eq!(
        (b["offset"].as_u64(), b["duplicate"].as_bool()),
        (Some(3), Some(true))
    );
    assert_eq!(a["epoch"], b["epoch"]);

    // Retries in flight together: one write, both answered with it.
    let msg2 = json!({"room": "i", "text": "twice?", "client_id": "c-2"});
    let x = alice.send("room.send", msg2.clone()).await;
    let y = alice.send("room.send", msg2.clone()).await;
    let z = alice.send("room.send", msg2).await;
    let replies = [
        alice.reply(x).await.unwrap(),
        alice.reply(y).await.unwrap(),
        alice.reply(z).await.unwrap(),
    ];
    assert!(replies.iter().all(|r| r["offset"] == 4), "{replies:?}");
    assert_eq!(
        replies.iter().filter(|r| r["duplicate"] == false).count(),
        1,
        "{replies:?}"
    );

    // A retry from another device of the same user, after other messages.
    assert_eq!(send(&mut bob, "i", "in between").await, 5);
    let mut phone = node.connect("alice", other(enc)).await;
    let c = phone
        .ok(
            "room.send",
            json!({"room": "i", "text": "once", "client_id": "c-1"}),
        )
        .await;
    assert_eq!(
        (c["offset"].as_u64(), c["duplicate"].as_bool()),
        (Some(3), Some(true))
    );

    // Stored once, pushed once.
    assert_eq!(send(&mut alice, "i", "last").await, 6);
    let mut pushed = BTreeMap::new();
    loop {
        let p = bob.push("entry", Some("room:i")).await;
        *pushed.entry(p.offset.unwrap()).or_insert(0) += 1;
        if p.offset == Some(6) {
            break;
        }
    }
    assert!(pushed.values().all(|n| *n == 1), "{pushed:?}");
    assert_eq!(
        pushed
            .keys()
            .copied()
            .filter(|o| *o >= 3)
            .collect::<Vec<_>>(),
        vec![3, 4, 5, 6]
    );
    let h = bob.ok("history", json!({"channel": "room:i"})).await;
    assert_eq!(offsets(&h["entries"]), vec![1, 2, 3, 4, 5, 6]);
    let cids: Vec<Option<&str>> = h["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["client_id"].as_str())
        .collect();
    assert_eq!(cids, vec![None, None, Some("c-1"), Some("c-2"), None, None]);

    // Ids are per room; and they must be 1..=128 bytes.
    alice
        .ok("room.create", json!({"room": "j", "kind": "group"}))
        .await;
    let d = alice
        .ok(
            "room.send",
            json!({"room": "j", "text": "once", "client_id": "c-1"}),
        )
        .await;
    assert_eq!(
        (d["offset"].as_u64(), d["duplicate"].as_bool()),
        (Some(2), Some(false))
    );
    assert_eq!(
        alice
            .err(
                "room.send",
                json!({"room": "i", "text": "x", "client_id": ""})
            )
            .await,
        1007
    );
    assert_eq!(
        alice
            .err(
                "room.send",
                json!({"room": "i", "text": "x", "client_id": "x".repeat(129)})
            )
            .await,
        1007
    );

    // The server API's posts are idempotent the same way.
    let body = json!({"sender": "bot", "text": "deploy done", "client_id": "api-1"});
    let (s1, e) = node
        .api("POST", "/api/v1/rooms/i/messages", Some(body.clone()))
        .await;
    let (s2, f) = node
        .api("POST", "/api/v1/rooms/i/messages", Some(body))
        .await;
    assert_eq!((s1, s2), (200, 200));
    assert_eq!(
        (e["offset"].as_u64(), e["duplicate"].as_bool()),
        (Some(7), Some(false))
    );
    assert_eq!(
        (f["offset"].as_u64(), f["duplicate"].as_bool()),
        (Some(7), Some(true))
    );
}

/// An id is its sender's: another user (or the server API as another
/// sender, or a publisher on a topic) reusing it stores a message of its own.
async fn client_ids_belong_to_their_sender(enc: Encoding) {
    let node = TestNode::start().await;
    let mut alice = node.connect("alice", enc).await;
    let mut bob = node.connect("bob", other(enc)).await;
    alice
        .ok(
            "room.create",
            json!({"room": "s", "kind": "group", "members": ["bob"]}),
        )
        .await;
    bob.ok("room.join", json!({"room": "s"})).await;

    let a = alice
        .ok(
            "room.send",
            json!({"room": "s", "text": "from alice", "client_id": "shared"}),
        )
        .await;
    let b = bob
        .ok(
            "room.send",
            json!({"room": "s", "text": "from bob", "client_id": "shared"}),
        )
        .await;
    assert_eq!(
        (a["offset"].as_u64(), a["duplicate"].as_bool()),
        (Some(3), Some(false))
    );
    assert_eq!(
        (b["offset"].as_u64(), b["duplicate"].as_bool()),
        (Some(4), Some(false))
    );
    // Each sender's retry still finds its own message.
    let again = bob
        .ok(
            "room.send",
            json!({"room": "s", "text": "from bob", "client_id": "shared"}),
        )
        .await;
    assert_eq!(
        (again["offset"].as_u64(), again["duplicate"].as_bool()),
        (Some(4), Some(true))
    );

    // The server API posting as another sender, and without a sender.
    let mut offsets = Vec::new();
    for body in [
        json!({"sender": "bot", "text": "from bot", "client_id": "shared"}),
        json!({"text": "from the app", "client_id": "shared"}),
        json!({"sender": "bot", "text": "from bot", "client_id": "shared"}),
    ] {
        let (status, v) = node
            .api("POST", "/api/v1/rooms/s/messages", Some(body))
            .await;
        assert_eq!(status, 200, "{v}");
        offsets.push((v["offset"].as_u64(), v["duplicate"].as_bool()));
    }
    assert_eq!(
        offsets,
        vec![
            (Some(5), Some(false)),
            (Some(6), Some(false)),
            (Some(5), Some(true))
        ]
    );

    let h = alice.ok("history", json!({"channel": "room:s"})).await;
    let texts: Vec<&str> = h["entries"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["text"].as_str())
        .collect();
    assert_eq!(
        texts,
        vec!["from alice", "from bob", "from bot", "from the app"]
    );

    // The same on a topic: two publishers, one id, two publications.
    let claims = Some(json!({"publish": ["post:*"]}));
    let ttl = std::time::Duration::from_secs(3600);
    let mut w1 = node
        .connect_token(&node.token_with("w1", ttl, claims.clone()), enc)
        .await;
    let mut w2 = node
        .connect_token(&node.token_with("w2", ttl, claims), other(enc))
        .await;
    let args = json!({"topic": "post:1", "data": 1, "client_id": "shared"});
    let x = w1.ok("topic.publish", args.clone()).await;
    let y = w2.ok("topic.publish", args).await;
    assert_eq!(
        (x["offset"].as_u64(), x["duplicate"].as_bool()),
        (Some(1), Some(false))
    );
    assert_eq!(
        (y["offset"].as_u64(), y["duplicate"].as_bool()),
        (Some(2), Some(false))
    );

    // Every path checks the id's length: 1..=128 bytes.
    for bad in [String::new(), "x".repeat(129)] {
        let args = json!({"topic": "post:1", "data": 1, "client_id": bad});
        assert_eq!(w1.err("topic.publish", args).await, 1007);
        for path in ["/api/v1/topics/post:1/publish", "/api/v1/rooms/s/messages"] {
            let body = json!({"data": 1, "text": "x", "client_id": bad});
            let (status, v) = node.api("POST", path, Some(body)).await;
            assert_eq!(
                (status, v["error"]["code"].as_u64()),
                (400, Some(1007)),
                "{path}: {v}"
            );
        }
    }
}
