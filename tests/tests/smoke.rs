use chorus_protocol::Encoding;
use chorus_tests::TestNode;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smoke() {
    let node = TestNode::start().await;
    let mut a = node.connect("alice", Encoding::Json).await;
    let mut b = node.connect("bob", Encoding::MsgPack).await;
    a.alive().await;
    let room = a
        .ok(
            "room.create",
            json!({"room": "r1", "kind": "public", "name": "R"}),
        )
        .await;
    println!("{room}");
    let j = a.ok("room.join", json!({"room": "r1"})).await;
    println!("{j}");
    let j = b.ok("room.join", json!({"room": "r1"})).await;
    println!("{j}");
    let s = a
        .ok("room.send", json!({"room": "r1", "text": "hello"}))
        .await;
    println!("{s}");
    let p = b
        .push_where(|p| p.push == "entry" && p.data["kind"] == "message")
        .await;
    println!("{p:?}");
    node.stop().await;
}
