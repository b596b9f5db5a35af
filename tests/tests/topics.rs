//! Topics and feeds: publish through the server API or by a client whose
//! token allows it (`publish` claim); `rooms` / `topics` claims restrict what
//! a client may use; feeds fan one publication out to many users, each of
//! whom may read only their own feed.

use chorus_protocol::Encoding;
use chorus_tests::{both_encodings, other, TestNode};
use serde_json::{json, Value};
use std::time::Duration;

both_encodings!(
    server_publishes_to_a_topic,
    clients_publish_with_the_publish_claim,
    claims_restrict_rooms_and_topics,
    feeds_reach_each_user_and_only_them,
);

const FORBIDDEN: u16 = 3001;

async fn api_publish(node: &TestNode, topic: &str, data: Value) -> Value {
    let (status, v) = node
        .api(
            "POST",
            &format!("/api/v1/topics/{topic}/publish"),
            Some(json!({"data": data})),
        )
        .await;
    assert_eq!(status, 200, "{v}");
    v
}

async fn server_publishes_to_a_topic(enc: Encoding) {
    let node = TestNode::start().await;
    let mut viewer = node.connect("viewer", enc).await;
    let mut counter = node.connect("counter", other(enc)).await;

    let s = viewer
        .ok("subscribe", json!({"channel": "topic:post:123"}))
        .await;
    assert_eq!(s["channel"], "topic:post:123");
    assert_eq!(
        (s["offset"].as_u64(), s["recovered"].as_bool()),
        (Some(0), Some(true))
    );
    assert_eq!(s["missed"], json!([]));
    let epoch = s["epoch"].as_str().unwrap().to_string();
    assert!(!epoch.is_empty());

    // Live comments.
    let comment = json!({"comment": "first!", "by": "zoe"});
    let r = api_publish(&node, "post:123", comment.clone()).await;
    assert_eq!(
        r,
        json!({"channel": "topic:post:123", "epoch": epoch, "offset": 1, "duplicate": false})
    );
    let p = viewer.entry("topic:post:123", "publish").await;
    assert_eq!(
        (p.offset, p.epoch.as_deref()),
        (Some(1), Some(epoch.as_str()))
    );
    assert_eq!(p.data["data"], comment);
    assert!(
        p.data.get("sender").is_none_or(Value::is_null),
        "the server publishes as nobody"
    );

    // A like counter: every update, in order.
    counter
        .ok("subscribe", json!({"channel": "topic:likes:123"}))
        .await;
    for n in 1..=5 {
        assert_eq!(
            api_publish(&node, "likes:123", json!({"likes": n})).await["offset"],
            n
        );
    }
    for n in 1..=5u64 {
        let p = counter.entry("topic:likes:123", "publish").await;
        assert_eq!(
            (p.offset, p.data["data"]["likes"].as_u64()),
            (Some(n), Some(n))
        );
    }
    let h = viewer
        .ok("history", json!({"channel": "topic:likes:123", "after": 3}))
        .await;
    let likes: Vec<u64> = h["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["data"]["likes"].as_u64().unwrap())
        .collect();
    assert_eq!(likes, vec![4, 5]);

    // Unsubscribed: no more pushes. Counter still gets the next entry; by the
    // time viewer's barrier reply arrives, it would have had it too.
    counter
        .ok("subscribe", json!({"channel": "topic:post:123"}))
        .await;
    assert_eq!(
        viewer
            .ok("unsubscribe", json!({"channel": "topic:post:123"}))
            .await,
        json!({"channel": "topic:post:123"})
    );
    assert_eq!(
        viewer
            .err("unsubscribe", json!({"channel": "topic:post:123"}))
            .await,
        3009
    );
    api_publish(&node, "post:123", json!({"comment": "second"})).await;
    assert_eq!(
        counter.entry("topic:post:123", "publish").await.offset,
        Some(2)
    );
    viewer.hub_barrier().await;
    assert!(
        !viewer.has_buffered(|p| p.offset == Some(2)),
        "pushed after unsubscribe"
    );

    // A dashboard metric with a client id is idempotent through the API too.
    let body = json!({"data": {"cpu": 0.5}, "client_id": "sample-1"});
    let (_, a) = node
        .api(
            "POST",
            "/api/v1/topics/metrics.cpu/publish",
            Some(body.clone()),
        )
        .await;
    let (_, b) = node
        .api("POST", "/api/v1/topics/metrics.cpu/publish", Some(body))
        .await;
    assert_eq!(
        (a["offset"].as_u64(), a["duplicate"].as_bool()),
        (Some(1), Some(false))
    );
    assert_eq!(
        (b["offset"].as_u64(), b["duplicate"].as_bool()),
        (Some(1), Some(true))
    );
    let (status, v) = node
        .api(
            "POST",
            "/api/v1/topics/bad%20name/publish",
            Some(json!({"data": 1})),
        )
        .await;
    assert_eq!((status, v["error"]["code"].as_u64()), (400, Some(1007)));
}

async fn clients_publish_with_the_publish_claim(enc: Encoding) {
    let node = TestNode::start().await;
    let token = node.token_with(
        "writer",
        Duration::from_secs(3600),
        Some(json!({"publish": ["post:*"]})),
    );
    let mut writer = node.connect_token(&token, enc).await;
    let mut reader = node.connect("reader", other(enc)).await;
    reader
        .ok("subscribe", json!({"channel": "topic:post:7"}))
        .await;

    let r = writer
        .ok(
            "topic.publish",
            json!({"topic": "post:7", "data": {"comment": "hi"}}),
        )
        .await;
    assert_eq!(
        (
            r["channel"].as_str(),
            r["offset"].as_u64(),
            r["duplicate"].as_bool()
        ),
        (Some("topic:post:7"), Some(1), Some(false))
    );
    let p = reader.entry("topic:post:7", "publish").await;
    assert_eq!(p.offset, Some(1));
    assert_eq!(p.data["sender"], "writer");
    assert_eq!(p.data["data"], json!({"comment": "hi"}));

    // Outside its patterns, and without the claim at all: forbidden.
    assert_eq!(
        writer
            .err("topic.publish", json!({"topic": "poll:1", "data": 1}))
            .await,
        FORBIDDEN
    );
    assert_eq!(
        reader
            .err("topic.publish", json!({"topic": "post:7", "data": 1}))
            .await,
        FORBIDDEN
    );
    assert_eq!(
        writer
            .err("topic.publish", json!({"topic": "post 7", "data": 1}))
            .await,
        1007
    );

    // A retried publish with the same client id is stored once.
    let a = writer
        .ok(
            "topic.publish",
            json!({"topic": "post:7", "data": {"comment": "once"}, "client_id": "w-1"}),
        )
        .await;
    let b = writer
        .ok(
            "topic.publish",
            json!({"topic": "post:7", "data": {"comment": "once"}, "client_id": "w-1"}),
        )
        .await;
    assert_eq!(
        (a["offset"].as_u64(), a["duplicate"].as_bool()),
        (Some(2), Some(false))
    );
    assert_eq!(
        (b["offset"].as_u64(), b["duplicate"].as_bool()),
        (Some(2), Some(true))
    );
    let h = reader
        .ok("history", json!({"channel": "topic:post:7"}))
        .await;
    assert_eq!(h["head"]["offset"], 2);
    assert_eq!(h["entries"].as_array().unwrap().len(), 2);
    writer.alive().await;
    reader.alive().await;
}

async fn claims_restrict_rooms_and_topics(enc: Encoding) {
    let node = TestNode::start().await;
    let mut alice = node.connect("alice", other(enc)).await;
    alice
        .ok("room.create", json!({"room": "lobby", "kind": "public"}))
        .await;
    let token = node.token_with(
        "rick",
        Duration::from_secs(3600),
        Some(json!({"rooms": ["team-*"], "topics": ["news"]})),
    );
    let mut rick = node.connect_token(&token, enc).await;

    // Rooms: only ids matching `team-*`.
    rick.ok("room.create", json!({"room": "team-a", "kind": "group"}))
        .await;
    rick.ok("room.send", json!({"room": "team-a", "text": "allowed"}))
        .await;
    for (op, args) in [
        ("room.create", json!({"room": "other", "kind": "group"})),
        ("room.join", json!({"room": "lobby"})),
        ("room.send", json!({"room": "lobby", "text": "hi"})),
        ("history", json!({"channel": "room:lobby"})),
        ("subscribe", json!({"channel": "room:lobby"})),
        ("room.members", json!({"room": "lobby"})),
        ("room.direct", json!({"user": "alice"})),
        ("presence.watch", json!({"room": "lobby"})),
    ] {
        assert_eq!(rick.err(op, args.clone()).await, FORBIDDEN, "{op} {args}");
    }
    // Listing reveals a room: rick is a member of secret-ops (invited through
    // the server API), but his token lists only the team-* rooms.
    let (status, _) = node
        .api(
            "POST",
            "/api/v1/rooms",
            Some(json!({"room": "secret-ops", "kind": "group", "created_by": "alice", "members": ["rick"]})),
        )
        .await;
    assert_eq!(status, 200);
    let full = node
        .connect("rick", other(enc))
        .await
        .ok("rooms.list", json!({}))
        .await;
    let listed = |v: &serde_json::Value| -> Vec<String> {
        let mut ids: Vec<String> = v["rooms"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["room"]["id"].as_str().unwrap().to_string())
            .collect();
        ids.sort();
        ids
    };
    assert_eq!(listed(&full), vec!["secret-ops", "team-a"], "{full}");
    let limited = rick.ok("rooms.list", json!({})).await;
    assert_eq!(listed(&limited), vec!["team-a"], "{limited}");
    // Topics: only `news`.
    rick.ok("subscribe", json!({"channel": "topic:news"})).await;
    assert_eq!(
        rick.err("subscribe", json!({"channel": "topic:sports"}))
            .await,
        FORBIDDEN
    );
    assert_eq!(
        rick.err("history", json!({"channel": "topic:sports"}))
            .await,
        FORBIDDEN
    );
    assert_eq!(
        rick.err("topic.publish", json!({"topic": "news", "data": 1}))
            .await,
        FORBIDDEN
    );
    // Still the user's own feed.
    rick.ok("subscribe", json!({"channel": "feed:rick"})).await;
    // What is allowed still works live.
    api_publish(&node, "news", json!({"headline": "ok"})).await;
    assert_eq!(
        rick.entry("topic:news", "publish").await.data["data"]["headline"],
        "ok"
    );
    rick.alive().await;
}

async fn feeds_reach_each_user_and_only_them(enc: Encoding) {
    let node = TestNode::start().await;
    let mut alice = node.connect("alice", enc).await;
    let mut bob = node.connect("bob", other(enc)).await;
    alice
        .ok("subscribe", json!({"channel": "feed:alice"}))
        .await;
    bob.ok("subscribe", json!({"channel": "feed:bob"})).await;
    assert_eq!(
        alice.err("subscribe", json!({"channel": "feed:bob"})).await,
        FORBIDDEN
    );
    assert_eq!(
        alice.err("history", json!({"channel": "feed:bob"})).await,
        FORBIDDEN
    );
    assert_eq!(
        alice.err("subscribe", json!({"channel": "chat:1"})).await,
        3007
    );
    assert_eq!(
        alice.err("subscribe", json!({"channel": "feed:"})).await,
        3007
    );

    let post = json!({"post": 1, "by": "dave", "text": "new photo"});
    let (status, v) = node
        .api(
            "POST",
            "/api/v1/feeds",
            Some(json!({"users": ["alice", "bob", "carol"], "data": post})),
        )
        .await;
    assert_eq!(status, 200, "{v}");
    let published = v["published"].as_array().unwrap();
    let channels: Vec<&str> = published
        .iter()
        .map(|p| p["channel"].as_str().unwrap())
        .collect();
    assert_eq!(channels, vec!["feed:alice", "feed:bob", "feed:carol"]);
    assert!(published
        .iter()
        .all(|p| p["offset"] == 1 && p["duplicate"] == false));
    for (c, ch) in [(&mut alice, "feed:alice"), (&mut bob, "feed:bob")] {
        let p = c.entry(ch, "publish").await;
        assert_eq!(p.offset, Some(1));
        assert_eq!(p.data["data"], post);
    }

    // Carol was offline: her feed kept both, and she catches up on them.
    let (_, v) = node
        .api(
            "POST",
            "/api/v1/feeds",
            Some(json!({"users": ["carol"], "data": {"post": 2}})),
        )
        .await;
    let epoch = v["published"][0]["epoch"].as_str().unwrap().to_string();
    assert_eq!(v["published"][0]["offset"], 2);
    let mut carol = node.connect("carol", enc).await;
    let s = carol
        .ok(
            "subscribe",
            json!({"channel": "feed:carol", "offset": 0, "epoch": epoch}),
        )
        .await;
    assert_eq!(s["recovered"], true);
    let missed: Vec<Value> = s["missed"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["data"].clone())
        .collect();
    assert_eq!(missed, vec![post, json!({"post": 2})]);
    assert_eq!(s["offset"], 2);

    let (status, v) = node
        .api(
            "POST",
            "/api/v1/feeds",
            Some(json!({"users": [], "data": 1})),
        )
        .await;
    assert_eq!((status, v["error"]["code"].as_u64()), (400, Some(1007)));
}
