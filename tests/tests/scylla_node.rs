//! A node on the ScyllaDB backend (tested against Cassandra) serves what the
//! embedded backend serves: chat, catch-up, notifications, restart.
//!
//! Needs `CHORUS_CQL=host:port` (`scripts/cassandra.sh start`); without it the
//! test says so and returns, unless `CHORUS_REQUIRE_CQL=1` (CI), where a
//! missing server fails it.

use std::sync::Arc;

use chorus_protocol::Encoding;
use chorus_storage::Backend;
use chorus_tests::TestNode;
use serde_json::json;

fn cql() -> Option<String> {
    match std::env::var("CHORUS_CQL") {
        Ok(addr) => Some(addr),
        Err(_) => {
            assert_ne!(
                std::env::var("CHORUS_REQUIRE_CQL").as_deref(),
                Ok("1"),
                "CHORUS_REQUIRE_CQL=1 but CHORUS_CQL is not set"
            );
            eprintln!("skipped: set CHORUS_CQL=127.0.0.1:9042 (scripts/cassandra.sh start) to run");
            None
        }
    }
}

fn keyspace() -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap();
    // The `chorus_t<secs>_` shape lets the storage tests sweep it up later.
    format!(
        "chorus_t{}_{:012x}",
        now.as_secs(),
        now.subsec_nanos() as u64 ^ (std::process::id() as u64) << 20
    )
}

async fn start(dir: Arc<tempfile::TempDir>, addr: &str, ks: &str) -> TestNode {
    let (addr, ks) = (addr.to_string(), ks.to_string());
    TestNode::start_with(dir, move |c| {
        c.storage.backend = Backend::Scylla;
        c.storage.scylla.contact_points = vec![addr.clone()];
        c.storage.scylla.keyspace = ks.clone();
        c.storage.scylla.request_timeout_ms = 20_000;
        c.storage.scylla.bucket_size = 4;
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scylla_node_serves_chat_catchup_notifications_and_restarts() {
    let Some(addr) = cql() else { return };
    let ks = keyspace();
    let dir = Arc::new(tempfile::tempdir().unwrap());
    let node = start(dir.clone(), &addr, &ks).await;

    let mut alice = node.connect("alice", Encoding::Json).await;
    let mut bob = node.connect("bob", Encoding::MsgPack).await;
    alice
        .ok(
            "room.create",
            json!({"room": "s", "kind": "group", "members": ["bob"]}),
        )
        .await;
    let joined = bob.ok("room.join", json!({"room": "s"})).await;
    let epoch = joined["epoch"].as_str().unwrap().to_string();
    let mut offsets = Vec::new();
    // More messages than a bucket holds: history crosses partitions.
    for i in 0..10 {
        let r = alice
            .ok(
                "room.send",
                json!({"room": "s", "text": format!("m{i}"), "client_id": format!("c{i}")}),
            )
            .await;
        offsets.push(r["offset"].as_u64().unwrap());
    }
    for (i, off) in offsets.iter().enumerate() {
        let p = bob
            .push_where(|p| p.push == "entry" && p.offset == Some(*off))
            .await;
        assert_eq!(p.data["text"], format!("m{i}"));
    }
    let dup = alice
        .ok(
            "room.send",
            json!({"room": "s", "text": "m3", "client_id": "c3"}),
        )
        .await;
    assert_eq!(
        (dup["offset"].as_u64(), dup["duplicate"].as_bool()),
        (Some(offsets[3]), Some(true))
    );

    let (status, _) = node
        .api(
            "POST",
            "/api/v1/notifications",
            Some(json!({"user": "bob", "type": "t", "title": "hello"})),
        )
        .await;
    assert_eq!(status, 200);
    let n = bob.push("notifications", None).await;
    assert_eq!(n.data["items"][0]["title"], "hello");
    node.stop().await;

    // Restart on the same keyspace: history, unread counts and notifications are there.
    let node = start(dir, &addr, &ks).await;
    let mut bob = node.connect("bob", Encoding::Json).await;
    let sub = bob
        .ok(
            "subscribe",
            json!({"channel": "room:s", "offset": offsets[4], "epoch": epoch}),
        )
        .await;
    assert_eq!(sub["recovered"], true, "{sub}");
    let missed: Vec<u64> = sub["missed"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["offset"].as_u64().unwrap())
        .collect();
    assert_eq!(missed, offsets[5..].to_vec());
    let page = bob
        .ok("history", json!({"channel": "room:s", "limit": 200}))
        .await;
    let texts: Vec<&str> = page["entries"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["text"].as_str())
        .collect();
    assert_eq!(texts, (0..10).map(|i| format!("m{i}")).collect::<Vec<_>>());
    let list = bob.ok("rooms.list", json!({})).await;
    assert_eq!(list["rooms"][0]["unread"], 10, "{list}");
    let inbox = bob.ok("notifications.list", json!({})).await;
    assert_eq!(inbox["unread"], 1, "{inbox}");
    node.stop().await;
}
