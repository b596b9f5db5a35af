//! Presence: online / idle / offline merged across a user's devices, idle
//! after `idle_after` (600 ms in the test config) and back on activity, last
//! seen, an activity line, watching users or a room's members, queries.

use std::time::Instant;

use chorus_protocol::{now_ms, Encoding, Push};
use chorus_tests::{both_encodings, other, Client, TestNode};
use serde_json::{json, Value};

both_encodings!(
    offline_only_when_every_device_is_gone,
    idle_without_activity_and_back,
    activity_line,
    watch_a_rooms_members,
    query_current_state,
);

async fn presence_of(c: &mut Client, user: &str, status: &str) -> Push {
    c.push_where(|p| p.push == "presence" && p.data["user"] == user && p.data["status"] == status)
        .await
}

async fn offline_only_when_every_device_is_gone(enc: Encoding) {
    let node = TestNode::start().await;
    let mut bob = node.connect("bob", enc).await;
    let w = bob.ok("presence.watch", json!({"users": ["alice"]})).await;
    assert_eq!(
        w,
        json!({"users": [{"user": "alice", "status": "offline", "devices": 0}]})
    );

    let laptop = node.connect("alice", enc).await;
    let p = presence_of(&mut bob, "alice", "online").await;
    assert!(p.ephemeral, "presence is ephemeral");
    assert_eq!(p.data["devices"], 1);
    let phone = node.connect("alice", other(enc)).await;
    let p = bob
        .push_where(|p| p.push == "presence" && p.data["devices"] == 2)
        .await;
    assert_eq!(p.data["status"], "online");

    // One device left: still online.
    laptop.close().await;
    let p = bob
        .push_where(|p| p.push == "presence" && p.data["devices"] == 1)
        .await;
    assert_eq!(p.data["status"], "online");
    assert_eq!(
        bob.ok("presence.query", json!({"users": ["alice"]})).await["users"][0]["status"],
        "online"
    );

    // Both gone: offline, last seen when the last one closed.
    let before = now_ms();
    phone.close().await;
    let p = presence_of(&mut bob, "alice", "offline").await;
    let after = now_ms();
    assert_eq!(p.data["devices"], 0);
    let last_seen = p.data["last_seen"].as_i64().expect("last_seen");
    assert!(
        (before..=after).contains(&last_seen),
        "{before} <= {last_seen} <= {after}"
    );
    let q = bob.ok("presence.query", json!({"users": ["alice"]})).await;
    assert_eq!(
        q,
        json!({"users": [{"user": "alice", "status": "offline", "last_seen": last_seen, "devices": 0}]})
    );
    let (status, v) = node.api("GET", "/api/v1/users/alice/presence", None).await;
    assert_eq!(status, 200);
    assert_eq!(
        v,
        json!({"user": "alice", "status": "offline", "last_seen": last_seen, "devices": 0})
    );
}

async fn idle_without_activity_and_back(enc: Encoding) {
    let node = TestNode::start().await;
    let mut bob = node.connect("bob", enc).await;
    bob.ok("presence.watch", json!({"users": ["alice"]})).await;
    let connected = Instant::now();
    let mut laptop = node.connect("alice", other(enc)).await;
    presence_of(&mut bob, "alice", "online").await;

    // No request for idle_after (600 ms): idle, by itself.
    let p = presence_of(&mut bob, "alice", "idle").await;
    let after = connected.elapsed();
    assert!(after.as_millis() >= 550, "idle after only {after:?}");
    assert_eq!(p.data["devices"], 1);
    let q = bob.ok("presence.query", json!({"users": ["alice"]})).await;
    assert_eq!(q["users"][0]["status"], "idle");

    // Any request is activity: online again.
    laptop.alive().await;
    presence_of(&mut bob, "alice", "online").await;

    // Declared idle on one device; another active device makes the user online.
    let r = laptop.ok("presence.set", json!({"status": "idle"})).await;
    assert_eq!(r["status"], "idle");
    presence_of(&mut bob, "alice", "idle").await;
    let mut phone = node.connect("alice", enc).await;
    let p = presence_of(&mut bob, "alice", "online").await;
    assert_eq!(p.data["devices"], 2);
    let r = phone.ok("presence.set", json!({"status": "idle"})).await;
    assert_eq!(
        (r["status"].as_str(), r["devices"].as_u64()),
        (Some("idle"), Some(2))
    );
    presence_of(&mut bob, "alice", "idle").await;
    let r = laptop.ok("presence.set", json!({"status": "online"})).await;
    assert_eq!(r["status"], "online");
    presence_of(&mut bob, "alice", "online").await;
    assert_eq!(
        laptop
            .err("presence.set", json!({"status": "offline"}))
            .await,
        1007
    );
}

async fn activity_line(enc: Encoding) {
    let node = TestNode::start().await;
    let mut alice = node.connect("alice", enc).await;
    alice.alive().await;
    let mut bob = node.connect("bob", other(enc)).await;
    let w = bob.ok("presence.watch", json!({"users": ["alice"]})).await;
    assert_eq!(
        (
            w["users"][0]["status"].as_str(),
            w["users"][0]["devices"].as_u64()
        ),
        (Some("online"), Some(1))
    );
    assert!(w["users"][0].get("activity").is_none_or(Value::is_null));

    let r = alice
        .ok("presence.set", json!({"activity": "Listening to Bach"}))
        .await;
    assert_eq!(r["activity"], "Listening to Bach");
    let p = bob
        .push_where(|p| p.push == "presence" && p.data["activity"] == "Listening to Bach")
        .await;
    assert_eq!(p.data["user"], "alice");
    assert_eq!(p.data["status"], "online");
    let q = bob.ok("presence.query", json!({"users": ["alice"]})).await;
    assert_eq!(q["users"][0]["activity"], "Listening to Bach");

    // "" clears it.
    let r = alice.ok("presence.set", json!({"activity": ""})).await;
    assert!(r.get("activity").is_none_or(Value::is_null), "{r}");
    bob.push_where(|p| {
        p.push == "presence"
            && p.data["user"] == "alice"
            && p.data.get("activity").is_none_or(Value::is_null)
    })
    .await;
    assert_eq!(
        alice
            .err("presence.set", json!({"activity": "x".repeat(257)}))
            .await,
        1007
    );
}

async fn watch_a_rooms_members(enc: Encoding) {
    let node = TestNode::start().await;
    let mut alice = node.connect("alice", enc).await;
    alice
        .ok(
            "room.create",
            json!({"room": "club", "kind": "group", "members": ["bob", "carol"]}),
        )
        .await;
    let mut carol = node.connect("carol", other(enc)).await;

    // Every member but oneself, sorted, with their current state.
    let w = carol.ok("presence.watch", json!({"room": "club"})).await;
    let users = w["users"].as_array().unwrap();
    let brief: Vec<(&str, &str, u64)> = users
        .iter()
        .map(|u| {
            (
                u["user"].as_str().unwrap(),
                u["status"].as_str().unwrap(),
                u["devices"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(brief, vec![("alice", "online", 1), ("bob", "offline", 0)]);

    let bob = node.connect("bob", enc).await;
    let p = presence_of(&mut carol, "bob", "online").await;
    assert_eq!(p.data["devices"], 1);
    bob.close().await;
    presence_of(&mut carol, "bob", "offline").await;
    alice
        .ok("presence.set", json!({"activity": "hosting"}))
        .await;
    let p = carol
        .push_where(|p| p.push == "presence" && p.data["user"] == "alice")
        .await;
    assert_eq!(p.data["activity"], "hosting");

    // Unwatched: bob's coming back is no longer pushed to carol.
    assert_eq!(
        carol
            .ok("presence.unwatch", json!({"users": ["bob"]}))
            .await,
        json!({"watching": 1})
    );
    carol.buffered();
    let mut bob = node.connect("bob", enc).await;
    bob.alive().await;
    // The query is answered after bob's user handled his connection, and the
    // barrier after anything that handling queued for carol.
    assert_eq!(
        carol.ok("presence.query", json!({"users": ["bob"]})).await["users"][0]["status"],
        "online"
    );
    carol.hub_barrier().await;
    assert!(
        !carol.has_buffered(|p| p.push == "presence" && p.data["user"] == "bob"),
        "unwatched user still pushed"
    );
    assert_eq!(
        carol.ok("presence.unwatch", json!({"room": "club"})).await,
        json!({"watching": 0})
    );

    // Only members may watch a non-public room.
    let mut dave = node.connect("dave", enc).await;
    assert_eq!(
        dave.err("presence.watch", json!({"room": "club"})).await,
        3003
    );
    dave.alive().await;
}

async fn query_current_state(enc: Encoding) {
    let node = TestNode::start().await;
    let mut alice = node.connect("alice", other(enc)).await;
    alice.alive().await;
    let mut bob = node.connect("bob", enc).await;
    let q = bob
        .ok("presence.query", json!({"users": ["alice", "nobody"]}))
        .await;
    let users = q["users"].as_array().unwrap();
    assert_eq!(users.len(), 2);
    assert_eq!(
        (
            users[0]["user"].as_str(),
            users[0]["status"].as_str(),
            users[0]["devices"].as_u64()
        ),
        (Some("alice"), Some("online"), Some(1))
    );
    assert!(users[0]["last_seen"].as_i64().unwrap() > 0);
    assert_eq!(
        users[1],
        json!({"user": "nobody", "status": "offline", "devices": 0})
    );
    assert_eq!(
        bob.err("presence.query", json!({"users": ["not valid"]}))
            .await,
        1007
    );
    let (status, v) = node.api("GET", "/api/v1/users/alice/presence", None).await;
    assert_eq!(status, 200);
    assert_eq!(
        (v["status"].as_str(), v["devices"].as_u64()),
        (Some("online"), Some(1))
    );
    let (_, v) = node.api("GET", "/api/v1/users/nobody/presence", None).await;
    assert_eq!(
        v,
        json!({"user": "nobody", "status": "offline", "devices": 0})
    );
}
