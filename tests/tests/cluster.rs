//! A healthy cluster of three nodes in one process: placement, the peer
//! transport and per-node fan-out, seen through real sockets.

use chorus_protocol::Encoding;
use chorus_tests::cluster::{node_config, Sandbox};
use chorus_tests::{eventually, metric, other, TestNode};
use serde_json::json;

/// `chorus_cluster_remote_deliveries_total` of a node.
async fn remote_deliveries(node: &TestNode) -> f64 {
    metric(
        &node.metrics().await,
        "chorus_cluster_remote_deliveries_total",
    )
    .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_room_is_served_across_three_nodes_with_one_copy_per_node() {
    let cluster = Sandbox::start(3).await;
    // The room lives on node 0; its clients use nodes 1 and 2 (and 0).
    let room = cluster.key_owned_by(0, "room:lobby-");
    let name = room.trim_start_matches("room:").to_string();
    let (a, b, c) = (cluster.node(0), cluster.node(1), cluster.node(2));

    let mut alice = b.connect("alice", Encoding::Json).await;
    // Joins are entries here, so every subscriber can wait for carol's.
    alice
        .ok(
            "room.create",
            json!({"room": name, "kind": "public", "membership_entries": true}),
        )
        .await;
    let mut subscribers = Vec::new();
    for (i, node) in [a, b, c, b, c, c].into_iter().enumerate() {
        let enc = if i % 2 == 0 {
            Encoding::Json
        } else {
            Encoding::MsgPack
        };
        let mut s = node.connect(&format!("sub{i}"), enc).await;
        s.ok("room.join", json!({"room": name})).await;
        subscribers.push(s);
    }
    // Messages posted from nodes 2 and 1 reach every subscriber once, in order.
    let mut carol = c.connect("carol", Encoding::MsgPack).await;
    carol.ok("room.join", json!({"room": name})).await;
    for s in &mut subscribers {
        s.entry(&room, "joined").await;
    }
    let before = remote_deliveries(a).await;
    let mut offsets = Vec::new();
    for i in 0..10 {
        let (sender, text) = if i % 2 == 0 {
            (&mut carol, format!("c{i}"))
        } else {
            (&mut alice, format!("a{i}"))
        };
        let r = sender
            .ok("room.send", json!({"room": name, "text": text}))
            .await;
        offsets.push(r["offset"].as_u64().unwrap());
    }
    assert!(offsets.windows(2).all(|w| w[0] < w[1]), "{offsets:?}");
    for s in &mut subscribers {
        for o in &offsets {
            let p = s.entry(&room, "message").await;
            assert_eq!(p.offset, Some(*o));
        }
    }
    // Each message left the owner once per other node with subscribers (2),
    // not once per remote socket (5).
    let sent = remote_deliveries(a).await - before;
    assert_eq!(sent, 20.0, "10 messages x 2 nodes");

    // History and unread counts read the same from every node.
    for node in [a, b, c] {
        let mut reader = node.connect("sub0", Encoding::Json).await;
        let h = reader
            .ok("history", json!({"channel": room, "limit": 10}))
            .await;
        let got: Vec<u64> = h["entries"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["offset"].as_u64().unwrap())
            .collect();
        assert_eq!(got, offsets);
    }
}

/// The issue's figure: one publisher, 1,000 subscribers spread over three
/// nodes. Each publication leaves the topic's owner exactly twice (once to
/// each other node), and every subscriber gets every one, once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_subscribers_on_three_nodes_cost_two_sends_per_message() {
    let cluster = Sandbox::start(3).await;
    let topic = cluster.key_owned_by(0, "topic:wide-");
    let name = topic.trim_start_matches("topic:").to_string();
    let mut subscribers = Vec::with_capacity(1000);
    for i in 0..1000 {
        let mut s = cluster
            .node(i % 3)
            .connect(&format!("s{i}"), Encoding::MsgPack)
            .await;
        s.ok("subscribe", json!({"channel": topic})).await;
        subscribers.push(s);
    }
    let token = cluster.node(1).token_with(
        "pub",
        std::time::Duration::from_secs(3600),
        Some(json!({"publish": ["wide-*"]})),
    );
    let mut publisher = cluster.node(1).connect_token(&token, Encoding::Json).await;
    let before = remote_deliveries(cluster.node(0)).await;
    let mut offsets = Vec::new();
    for i in 0..5 {
        let r = publisher
            .ok("topic.publish", json!({"topic": name, "data": {"n": i}}))
            .await;
        offsets.push(r["offset"].as_u64().unwrap());
    }
    for s in &mut subscribers {
        for (i, o) in offsets.iter().enumerate() {
            let p = s.entry(&topic, "publish").await;
            assert_eq!(
                (p.offset, p.data["data"]["n"].as_u64()),
                (Some(*o), Some(i as u64))
            );
        }
    }
    let sent = remote_deliveries(cluster.node(0)).await - before;
    assert_eq!(
        sent, 10.0,
        "5 publications x 2 other nodes, for 667 remote sockets"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_typing_receipts_and_notifications_cross_nodes() {
    let cluster = Sandbox::start(3).await;
    let (a, b, c) = (cluster.node(0), cluster.node(1), cluster.node(2));
    // Alice has two devices on two nodes; her user actor lives on a third
    // node or one of them: either way she is one online user.
    let mut watcher = c.connect("watcher", Encoding::Json).await;
    let p = watcher
        .ok("presence.watch", json!({"users": ["alice"]}))
        .await;
    assert_eq!(p["users"][0]["status"], "offline");
    let phone = a.connect("alice", Encoding::MsgPack).await;
    watcher
        .push_where(|p| p.push == "presence" && p.data["status"] == "online")
        .await;
    let mut laptop = b.connect("alice", Encoding::Json).await;
    laptop.alive().await;
    let q = watcher
        .ok("presence.query", json!({"users": ["alice"]}))
        .await;
    assert_eq!(q["users"][0]["devices"], 2, "{q}");
    phone.close().await;
    let deadline = tokio::time::Instant::now() + chorus_tests::WAIT;
    let q = loop {
        let q = watcher
            .ok("presence.query", json!({"users": ["alice"]}))
            .await;
        if q["users"][0]["devices"] == 1 {
            break q;
        }
        assert!(tokio::time::Instant::now() < deadline, "devices: {q}");
        tokio::time::sleep(chorus_tests::POLL).await;
    };
    assert_eq!(q["users"][0]["status"], "online", "still online: {q}");

    // A direct room: bob on node 2 writes to alice on node 1; she gets the
    // message, the typing indicator, a notification, and her unread count.
    let mut bob = c.connect("bob", other(Encoding::Json)).await;
    let dm = bob.ok("room.direct", json!({"user": "alice"})).await;
    let dm_id = dm["id"].as_str().unwrap().to_string();
    let channel = format!("room:{dm_id}");
    laptop.ok("room.join", json!({"room": dm_id})).await;
    bob.ok("room.join", json!({"room": dm_id})).await;
    bob.ok("room.typing", json!({"room": dm_id})).await;
    let t = laptop.push("typing", Some(&channel)).await;
    assert_eq!(t.data["users"], json!(["bob"]));
    let sent = bob
        .ok("room.send", json!({"room": dm_id, "text": "hi alice"}))
        .await;
    let offset = sent["offset"].as_u64().unwrap();
    assert_eq!(laptop.entry(&channel, "message").await.offset, Some(offset));
    let n = laptop.push("notifications", None).await;
    assert_eq!(n.data["items"][0]["type"], "chat.direct", "{:?}", n.data);
    let list = laptop.ok("rooms.list", json!({})).await;
    assert_eq!(list["rooms"][0]["unread"], 1, "{list}");
    laptop
        .ok("room.read", json!({"room": dm_id, "offset": offset}))
        .await;
    let receipt = bob.push("receipt", Some(&channel)).await;
    assert_eq!(receipt.data["user"], "alice");

    // Catch-up from another node: resubscribe on node 0 from an old offset.
    let mut again = a.connect("alice", Encoding::Json).await;
    let s = again
        .ok(
            "subscribe",
            json!({"channel": channel, "offset": offset - 1, "epoch": sent["epoch"]}),
        )
        .await;
    assert_eq!(s["recovered"], true, "{s}");
    assert_eq!(s["missed"][0]["offset"], offset);

    // The server API on any node reaches the owner.
    let (status, v) = a
        .api(
            "POST",
            "/api/v1/notifications",
            Some(json!({"user": "alice", "type": "like", "title": "Bob liked it"})),
        )
        .await;
    assert_eq!(status, 200, "{v}");
    let n = laptop
        .push_where(|p| p.push == "notifications" && p.data["items"][0]["type"] == "like")
        .await;
    assert_eq!(n.data["items"][0]["title"], "Bob liked it");
    let (status, v) = b.api("GET", "/api/v1/cluster?key=user:alice", None).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["members"].as_array().unwrap().len(), 3, "{v}");
    assert_eq!(v["view"].as_array().unwrap().len(), 3, "{v}");
    let owner = v["owner"]["node"].as_str().unwrap();
    assert_eq!(
        owner,
        cluster
            .node(cluster.owner_of("user:alice"))
            .handle()
            .node_id()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_without_the_secret_is_not_admitted() {
    let cluster = Sandbox::start(2).await;
    let seed = cluster.node(0).handle().services().cluster.gossip_addr();
    let (mut config, dir) = node_config(9, seed, None);
    config.cluster.secret = "not-the-cluster-secret-at-all".into();
    config.cluster.join_timeout_ms = 500;
    let deps = chorus_node::Deps {
        store: Some(cluster.node(0).handle().services().store.clone()),
        ..Default::default()
    };
    let intruder = TestNode::start_deps(dir, config, deps).await;
    let transport = intruder.handle().services().cluster.members();
    // Its gossip is refused: the cluster never lists it, and it hears no one.
    eventually("the intruder's gossip to be refused", || async {
        let m = cluster.node(0).metrics().await;
        (metric(&m, "chorus_cluster_gossip_rejected_total").unwrap_or(0.0) > 0.0).then_some(())
    })
    .await;
    for i in 0..2 {
        let view = cluster.node(i).handle().services().cluster.members();
        assert!(view.iter().all(|m| m.id.as_str() != "node-9"), "{view:?}");
    }
    assert!(
        transport.iter().all(|m| m.id.as_str() == "node-9"),
        "the intruder sees only itself: {transport:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_node_is_down_and_its_keys_move_to_the_others() {
    let mut cluster = Sandbox::start(3).await;
    let room = cluster.key_owned_by(2, "room:orphan-");
    let name = room.trim_start_matches("room:").to_string();
    let mut alice = cluster.node(0).connect("alice", Encoding::Json).await;
    alice
        .ok("room.create", json!({"room": name, "kind": "public"}))
        .await;
    alice.ok("room.join", json!({"room": name})).await;
    let first = alice
        .ok("room.send", json!({"room": name, "text": "before"}))
        .await;

    // SIGKILL-like: no leave, no close frames; gossip just stops.
    let _ = cluster.nodes.remove(2).kill();
    for node in &cluster.nodes {
        eventually("the killed node to be down and out of the view", || async {
            let c = &node.handle().services().cluster;
            let down = c.members().iter().any(|m| {
                m.id.as_str() == "node-2" && m.state == chorus_actors::cluster::MemberState::Down
            });
            (down && c.view().members().len() == 2).then_some(())
        })
        .await;
    }
    // The room now has an owner among the survivors, which loads it from the store.
    let owner = cluster.owner_of(&room);
    assert!(owner < 2);
    let mut bob = cluster.node(1).connect("bob", Encoding::MsgPack).await;
    bob.ok("room.join", json!({"room": name})).await;
    let after = bob
        .ok("room.send", json!({"room": name, "text": "after"}))
        .await;
    assert_eq!(after["epoch"], first["epoch"]);
    let h = bob.ok("history", json!({"channel": room})).await;
    let texts: Vec<&str> = h["entries"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["text"].as_str())
        .collect();
    assert_eq!(texts, vec!["before", "after"]);
    let m = cluster.node(0).metrics().await;
    assert_eq!(
        metric(&m, r#"chorus_cluster_members{state="down"}"#),
        Some(1.0),
        "{m}"
    );
}
