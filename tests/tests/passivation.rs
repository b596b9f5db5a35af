//! Idle rooms and users stop and come back from the store with their state.

use std::time::Duration;

use chorus_protocol::Encoding;
use chorus_tests::{TestNode, WAIT};
use serde_json::json;

async fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !cond() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_actors_passivate_and_reload() {
    let dir = std::sync::Arc::new(tempfile::tempdir().unwrap());
    let node = TestNode::start_with(dir, |c| c.actors.passivate_after_ms = 200).await;
    let metrics = node.handle().services().metrics.clone();
    let mut a = node.connect("alice", Encoding::MsgPack).await;
    a.ok(
        "room.create",
        json!({"room": "p", "kind": "group", "members": ["bob"]}),
    )
    .await;
    let sent = a
        .ok(
            "room.send",
            json!({"room": "p", "text": "one", "client_id": "k1"}),
        )
        .await;
    let first = sent["offset"].as_u64().unwrap();
    a.ok("room.read", json!({"room": "p", "offset": first}))
        .await;
    a.close().await;

    // Nobody is subscribed and nothing happens: the room and alice's user actor stop.
    wait_for("room and users to passivate", || {
        metrics.active_rooms.get() == 0 && metrics.active_users.get() == 0
    })
    .await;

    let mut b = node.connect("bob", Encoding::Json).await;
    let list = b.ok("rooms.list", json!({})).await;
    assert_eq!(list["rooms"][0]["unread"], 1, "{list}");
    // The reloaded room continues its offsets and remembers client ids.
    let again = b.ok("room.send", json!({"room": "p", "text": "two"})).await;
    assert_eq!(again["offset"].as_u64().unwrap(), first + 1);
    let mut a = node.connect("alice", Encoding::Json).await;
    let dup = a
        .ok(
            "room.send",
            json!({"room": "p", "text": "one", "client_id": "k1"}),
        )
        .await;
    assert_eq!(dup["offset"].as_u64().unwrap(), first);
    assert_eq!(dup["duplicate"], true);
    let page = a.ok("history", json!({"channel": "room:p"})).await;
    let texts: Vec<_> = page["entries"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["text"].as_str())
        .collect();
    assert_eq!(texts, vec!["one", "two"]);
    node.stop().await;
}
