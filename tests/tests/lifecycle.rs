//! Lifecycle: a restart on the same data keeps history, unread counts,
//! notifications, preferences, membership and last-seen; a killed node
//! (no flush) keeps every acknowledged message; a graceful shutdown closes
//! clients with 1001; idle actors passivate and come back from the store;
//! health, readiness and Prometheus metrics.

use std::collections::BTreeMap;

use chorus_protocol::Encoding;
use chorus_tests::{both_encodings, eventually, metric, other, test_dir, Client, TestNode};
use serde_json::{json, Value};

both_encodings!(
    restart_keeps_history_unread_notifications_and_membership,
    kill_keeps_every_acknowledged_message,
    graceful_shutdown_closes_clients_with_1001,
    draining_answers_503_until_the_listener_closes,
    idle_actors_passivate_and_come_back,
    health_readiness_and_metrics,
    silent_connections_are_closed_with_4004,
);

async fn send(c: &mut Client, room: &str, text: &str) -> u64 {
    let r = c.ok("room.send", json!({"room": room, "text": text})).await;
    r["offset"].as_u64().unwrap()
}

/// Every entry of a channel, paging forwards.
async fn all_entries(c: &mut Client, channel: &str) -> Vec<Value> {
    let mut out = Vec::new();
    let mut after = 0;
    loop {
        let h = c
            .ok(
                "history",
                json!({"channel": channel, "after": after, "limit": 200}),
            )
            .await;
        let page = h["entries"].as_array().unwrap().clone();
        let last = page.last().map(|e| e["offset"].as_u64().unwrap());
        out.extend(page);
        match last {
            Some(l) if h["more"] == true => after = l,
            _ => return out,
        }
    }
}

fn by_room(list: &Value) -> BTreeMap<String, Value> {
    list["rooms"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["room"]["id"].as_str().unwrap().to_string(), r.clone()))
        .collect()
}

async fn restart_keeps_history_unread_notifications_and_membership(enc: Encoding) {
    let dir = test_dir();
    let node = TestNode::start_with(dir.clone(), |_| {}).await;
    let mut alice = node.connect("alice", enc).await;
    let mut bob = node.connect("bob", other(enc)).await;
    alice
        .ok(
            "room.create",
            json!({"room": "team", "kind": "group", "name": "Team", "members": ["bob"]}),
        )
        .await;
    let epoch = alice.ok("room.join", json!({"room": "team"})).await["epoch"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(send(&mut alice, "team", "one").await, 3);
    let k = alice
        .ok(
            "room.send",
            json!({"room": "team", "text": "two", "client_id": "k1"}),
        )
        .await;
    assert_eq!(k["offset"], 4);
    alice
        .ok(
            "room.edit",
            json!({"room": "team", "offset": 3, "text": "one!"}),
        )
        .await;
    assert_eq!(send(&mut alice, "team", "three").await, 6);
    assert_eq!(
        bob.ok("room.read", json!({"room": "team", "offset": 3}))
            .await["unread"],
        2
    );
    alice
        .ok("room.create", json!({"room": "lobby", "kind": "public"}))
        .await;
    bob.ok("room.join", json!({"room": "lobby"})).await;

    // Notifications: two from the server API (one read), one from a DM; preferences.
    bob.ok(
        "notifications.prefs.set",
        json!({"muted_categories": ["promo"]}),
    )
    .await;
    let (_, v) = node
        .api(
            "POST",
            "/api/v1/notifications",
            Some(json!({"user": "bob", "type": "t", "title": "first"})),
        )
        .await;
    let n1 = v["ids"][0].as_u64().unwrap();
    node.api(
        "POST",
        "/api/v1/notifications",
        Some(json!({"user": "bob", "type": "t", "title": "second", "data": {"x": [1, 2]}})),
    )
    .await;
    bob.ok("notifications.read", json!({"ids": [n1]})).await;
    let dm = alice.ok("room.direct", json!({"user": "bob"})).await["id"]
        .as_str()
        .unwrap()
        .to_string();
    send(&mut alice, &dm, "psst").await;
    bob.push_where(|p| {
        p.push == "notifications"
            && p.data["items"]
                .as_array()
                .unwrap()
                .iter()
                .any(|n| n["type"] == "chat.direct")
    })
    .await;

    let history = all_entries(&mut alice, "room:team").await;
    let bob_rooms = by_room(&bob.ok("rooms.list", json!({})).await);
    assert_eq!(bob_rooms["team"]["unread"], 2);
    assert_eq!(bob_rooms.len(), 3);
    let bob_notifs = bob.ok("notifications.list", json!({})).await;
    assert_eq!(
        (
            bob_notifs["items"].as_array().unwrap().len(),
            bob_notifs["unread"].as_u64()
        ),
        (3, Some(2))
    );
    let members = alice.ok("room.members", json!({"room": "team"})).await;
    alice.ok("presence.watch", json!({"users": ["bob"]})).await;
    bob.close().await;
    let p = alice
        .push_where(|p| {
            p.push == "presence" && p.data["user"] == "bob" && p.data["status"] == "offline"
        })
        .await;
    let last_seen = p.data["last_seen"].as_i64().unwrap();

    node.stop().await;
    let node = TestNode::start_with(dir.clone(), |_| {}).await;
    let mut alice = node.connect("alice", enc).await;
    let q = alice.ok("presence.query", json!({"users": ["bob"]})).await;
    assert_eq!(
        q,
        json!({"users": [{"user": "bob", "status": "offline", "last_seen": last_seen, "devices": 0}]})
    );
    let mut bob = node.connect("bob", other(enc)).await;

    // History (including the edit), epoch, membership, read markers and unread counts.
    assert_eq!(all_entries(&mut bob, "room:team").await, history);
    assert_eq!(history[2]["text"], "one!");
    assert_eq!(
        alice.ok("room.members", json!({"room": "team"})).await,
        members
    );
    assert_eq!(by_room(&bob.ok("rooms.list", json!({})).await), bob_rooms);
    let mut carol = node.connect("carol", enc).await;
    assert_eq!(
        carol.err("history", json!({"channel": "room:team"})).await,
        3003
    );
    assert_eq!(
        carol
            .err("room.send", json!({"room": "team", "text": "x"}))
            .await,
        3003
    );
    // Notifications and preferences.
    assert_eq!(bob.ok("notifications.list", json!({})).await, bob_notifs);
    assert_eq!(
        bob.ok("notifications.unread", json!({})).await,
        json!({"unread": 2})
    );
    assert_eq!(
        bob.ok("notifications.prefs.get", json!({})).await,
        json!({"muted_categories": ["promo"], "muted_rooms": []})
    );

    // The room continues where it was: same epoch, next offset, client ids remembered.
    let again = alice
        .ok(
            "room.send",
            json!({"room": "team", "text": "two", "client_id": "k1"}),
        )
        .await;
    assert_eq!(
        again,
        json!({"channel": "room:team", "epoch": epoch, "offset": 4, "duplicate": true})
    );
    let r = alice
        .ok(
            "room.send",
            json!({"room": "team", "text": "after restart"}),
        )
        .await;
    assert_eq!(
        (r["offset"].as_u64(), r["epoch"].as_str()),
        (Some(7), Some(epoch.as_str()))
    );
    let s = bob
        .ok(
            "subscribe",
            json!({"channel": "room:team", "offset": 4, "epoch": epoch}),
        )
        .await;
    assert_eq!(s["recovered"], true);
    let missed: Vec<u64> = s["missed"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["offset"].as_u64().unwrap())
        .collect();
    assert_eq!(missed, vec![5, 6, 7]);
    assert_eq!(
        by_room(&bob.ok("rooms.list", json!({})).await)["team"]["unread"],
        3
    );
    node.stop().await;
}

async fn kill_keeps_every_acknowledged_message(enc: Encoding) {
    let dir = test_dir();
    let node = TestNode::start_with(dir.clone(), |_| {}).await;
    let mut alice = node.connect("alice", enc).await;
    alice
        .ok("room.create", json!({"room": "k", "kind": "public"}))
        .await;
    let epoch = alice.ok("room.join", json!({"room": "k"})).await["epoch"]
        .as_str()
        .unwrap()
        .to_string();
    let mut ids = Vec::new();
    for i in 0..100 {
        ids.push((
            alice
                .send("room.send", json!({"room": "k", "text": format!("m{i}")}))
                .await,
            format!("m{i}"),
        ));
    }
    // Wait for the first 60 acknowledgements only, then kill with the rest in flight.
    let mut acked = BTreeMap::new();
    for (id, text) in &ids[..60] {
        let r = alice.reply(*id).await.expect("send");
        acked.insert(r["offset"].as_u64().unwrap(), text.clone());
    }
    let dir = node.kill();
    drop(alice);

    let node = TestNode::start_with(dir, |_| {}).await;
    let mut reader = node.connect("reader", other(enc)).await;
    let entries = all_entries(&mut reader, "room:k").await;
    let stored: BTreeMap<u64, String> = entries
        .iter()
        .filter(|e| e["kind"] == "message")
        .map(|e| {
            (
                e["offset"].as_u64().unwrap(),
                e["text"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    for (offset, text) in &acked {
        assert_eq!(
            stored.get(offset),
            Some(text),
            "acknowledged message at {offset} lost"
        );
    }
    let offsets: Vec<u64> = entries
        .iter()
        .map(|e| e["offset"].as_u64().unwrap())
        .collect();
    assert_eq!(
        offsets,
        (1..=offsets.len() as u64).collect::<Vec<_>>(),
        "no gap in the stored offsets"
    );
    // Messages are stored in the order they were sent; none twice.
    let texts: Vec<&String> = stored.values().collect();
    let sent: Vec<&String> = ids.iter().map(|(_, t)| t).take(texts.len()).collect();
    assert_eq!(texts, sent);

    // The room goes on after its head, in the same epoch.
    let head = *offsets.last().unwrap();
    let mut alice = node.connect("alice", enc).await;
    let r = alice
        .ok("room.send", json!({"room": "k", "text": "after"}))
        .await;
    assert_eq!(
        (r["offset"].as_u64(), r["epoch"].as_str()),
        (Some(head + 1), Some(epoch.as_str()))
    );
}

async fn graceful_shutdown_closes_clients_with_1001(enc: Encoding) {
    let dir = test_dir();
    let node = TestNode::start_with(dir.clone(), |_| {}).await;
    let mut a = node.connect("alice", enc).await;
    let mut b = node.connect("bob", other(enc)).await;
    a.ok("room.create", json!({"room": "s", "kind": "public"}))
        .await;
    a.ok("room.join", json!({"room": "s"})).await;
    b.ok("room.join", json!({"room": "s"})).await;
    // A load balancer's probe, on a kept-alive connection.
    let probe = reqwest::Client::new();
    let readyz = format!("http://{}/readyz", node.addr);
    let ready = probe.get(&readyz).send().await.expect("readyz");
    assert_eq!(ready.status().as_u16(), 200);

    // Sends in flight while the node shuts down: each is either acknowledged
    // (and then stored), refused as shutting_down, or unanswered.
    let mut ids = Vec::new();
    for i in 0..30 {
        ids.push((
            a.send("room.send", json!({"room": "s", "text": format!("m{i}")}))
                .await,
            format!("m{i}"),
        ));
    }
    let stopping = tokio::spawn(node.stop());
    // Readiness goes red at once, so the balancer stops sending new clients:
    // the probe gets 503 on its kept-alive connection, or no answer at all
    // once the node has stopped accepting (both mean "not ready" to it).
    eventually("/readyz to stop reporting ready", || {
        let (probe, readyz) = (&probe, &readyz);
        async move {
            let answer = probe
                .get(readyz.as_str())
                .timeout(std::time::Duration::from_millis(500))
                .send()
                .await;
            match answer {
                Ok(r) if r.status().as_u16() == 200 => None,
                Ok(r) => {
                    assert_eq!(r.status().as_u16(), 503);
                    Some(())
                }
                Err(_) => Some(()),
            }
        }
    })
    .await;
    for c in [&mut a, &mut b] {
        let (code, reason) = c.closed_by_server().await;
        assert_eq!(code, 1001, "{reason}");
        assert!(reason.contains("reconnect"), "{reason}");
    }
    stopping.await.expect("shutdown completes");
    let mut acked = BTreeMap::new();
    for (id, text) in &ids {
        match a.take_reply(*id) {
            Some(Ok(r)) => {
                acked.insert(r["offset"].as_u64().unwrap(), text.clone());
            }
            Some(Err(e)) => assert_eq!(e.code.code(), 5005, "{e:?}"),
            None => {}
        }
    }

    let node = TestNode::start_with(dir, |_| {}).await;
    let mut reader = node.connect("reader", enc).await;
    let stored: BTreeMap<u64, String> = all_entries(&mut reader, "room:s")
        .await
        .iter()
        .filter(|e| e["kind"] == "message")
        .map(|e| {
            (
                e["offset"].as_u64().unwrap(),
                e["text"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    for (offset, text) in &acked {
        assert_eq!(
            stored.get(offset),
            Some(text),
            "acknowledged message at {offset} lost"
        );
    }
}

async fn idle_actors_passivate_and_come_back(enc: Encoding) {
    let node = TestNode::start_with(test_dir(), |c| c.actors.passivate_after_ms = 100).await;
    let mut alice = node.connect("alice", enc).await;
    alice
        .ok(
            "room.create",
            json!({"room": "p", "kind": "group", "members": ["bob"]}),
        )
        .await;
    let epoch = alice.ok("room.join", json!({"room": "p"})).await["epoch"]
        .as_str()
        .unwrap()
        .to_string();
    let first = alice
        .ok(
            "room.send",
            json!({"room": "p", "text": "before", "client_id": "pc-1"}),
        )
        .await;
    assert_eq!(first["offset"], 3);
    alice
        .ok("presence.set", json!({"activity": "away soon"}))
        .await;
    node.api(
        "POST",
        "/api/v1/notifications",
        Some(json!({"user": "bob", "type": "t", "title": "while away"})),
    )
    .await;
    let history = all_entries(&mut alice, "room:p").await;
    alice.close().await;

    // With nobody connected or subscribed, rooms and users leave memory.
    eventually("every room and user actor to passivate", || {
        let node = &node;
        async move {
            let m = node.metrics().await;
            (metric(&m, "chorus_active_rooms") == Some(0.0)
                && metric(&m, "chorus_active_users") == Some(0.0))
            .then_some(())
        }
    })
    .await;

    // They come back from the store as they were.
    let mut alice = node.connect("alice", other(enc)).await;
    assert_eq!(all_entries(&mut alice, "room:p").await, history);
    let again = alice
        .ok(
            "room.send",
            json!({"room": "p", "text": "before", "client_id": "pc-1"}),
        )
        .await;
    assert_eq!(
        again,
        json!({"channel": "room:p", "epoch": epoch, "offset": 3, "duplicate": true})
    );
    assert_eq!(
        alice
            .ok("room.send", json!({"room": "p", "text": "after"}))
            .await["offset"],
        4
    );
    let mut bob = node.connect("bob", enc).await;
    let list = bob.ok("rooms.list", json!({})).await;
    assert_eq!(list["rooms"][0]["unread"], 2);
    assert_eq!(
        bob.ok("notifications.unread", json!({})).await,
        json!({"unread": 1})
    );
    let m = node.metrics().await;
    assert!(metric(&m, "chorus_active_rooms").unwrap() >= 1.0);
}

async fn health_readiness_and_metrics(enc: Encoding) {
    let node = TestNode::start().await;
    assert_eq!(
        node.api("GET", "/healthz", None).await,
        (200, Value::String("ok\n".into()))
    );
    assert_eq!(
        node.api("GET", "/readyz", None).await,
        (200, Value::String("ready\n".into()))
    );
    let m = node.metrics().await;
    assert!(m.contains("# TYPE chorus_connections gauge"), "{m}");
    assert_eq!(metric(&m, "chorus_connections"), Some(0.0));
    assert_eq!(metric(&m, "chorus_connections_opened_total"), Some(0.0));
    assert_eq!(metric(&m, "chorus_messages_published_total"), Some(0.0));
    assert_eq!(
        metric(&m, r#"chorus_errors_total{code="unknown_op"}"#),
        None
    );

    let mut a = node.connect("alice", enc).await;
    let mut b = node.connect("bob", other(enc)).await;
    a.ok("room.create", json!({"room": "m", "kind": "public"}))
        .await;
    a.ok("room.join", json!({"room": "m"})).await;
    b.ok("room.join", json!({"room": "m"})).await;
    send(&mut a, "m", "warm up").await;
    b.push_where(|p| p.push == "entry" && p.data["text"] == "warm up")
        .await;
    a.push_where(|p| p.push == "entry" && p.data["text"] == "warm up")
        .await;
    let before = node.metrics().await;
    assert_eq!(metric(&before, "chorus_connections"), Some(2.0));
    assert_eq!(
        metric(&before, "chorus_connections_opened_total"),
        Some(2.0)
    );

    // Three messages to two subscribers.
    for i in 0..3 {
        send(&mut a, "m", &format!("m{i}")).await;
    }
    b.push_where(|p| p.push == "entry" && p.data["text"] == "m2")
        .await;
    a.push_where(|p| p.push == "entry" && p.data["text"] == "m2")
        .await;
    assert_eq!(a.err("no.such.op", json!({})).await, 1002);
    let after = node.metrics().await;
    let delta =
        |name: &str| metric(&after, name).unwrap_or(0.0) - metric(&before, name).unwrap_or(0.0);
    assert_eq!(delta("chorus_messages_published_total"), 3.0);
    assert_eq!(delta("chorus_fanout_deliveries_total"), 6.0);
    assert_eq!(delta("chorus_frames_in_total"), 4.0);
    assert!(
        delta("chorus_frames_out_total") >= 3.0 + 6.0 + 1.0,
        "acks, pushes, the error"
    );
    assert_eq!(delta(r#"chorus_errors_total{code="unknown_op"}"#), 1.0);
    assert!(metric(&after, "chorus_store_append_seconds_count").unwrap() >= 4.0);
    assert!(metric(&after, "chorus_active_rooms").unwrap() >= 1.0);
    assert_eq!(metric(&after, "chorus_active_users"), Some(2.0));

    a.close().await;
    b.close().await;
    eventually("connections to be counted closed", || {
        let node = &node;
        async move { (metric(&node.metrics().await, "chorus_connections") == Some(0.0)).then_some(()) }
    })
    .await;
    let m = node.metrics().await;
    assert_eq!(metric(&m, "chorus_connections_opened_total"), Some(2.0));
}

async fn silent_connections_are_closed_with_4004(enc: Encoding) {
    let node = TestNode::start_with(test_dir(), |c| {
        c.limits.ping_interval_ms = 100;
        c.limits.idle_timeout_ms = 400;
    })
    .await;
    let mut watcher = node.connect("watcher", enc).await;
    watcher
        .ok("presence.watch", json!({"users": ["silent"]}))
        .await;
    let mut silent = node.connect("silent", other(enc)).await;
    silent.alive().await;
    presence(&mut watcher, "online").await;
    // The watcher keeps reading (and so answers the node's pings) while the
    // other client reads nothing: only the silent one is closed.
    presence(&mut watcher, "offline").await;
    let (code, reason) = silent.closed_by_server().await;
    assert_eq!(code, 4004, "{reason}");
    watcher.alive().await;
    let m = node.metrics().await;
    assert_eq!(
        metric(&m, "chorus_idle_disconnects_total"),
        Some(1.0),
        "{m}"
    );
}

async fn presence(c: &mut Client, status: &str) {
    c.push_where(|p| {
        p.push == "presence" && p.data["user"] == "silent" && p.data["status"] == status
    })
    .await;
}

/// From SIGTERM until exit the listener stays open: `/readyz` and a new
/// `/ws` handshake answer 503 (5005), the server API 503 (5005); only once
/// the node has stopped is the connection refused, and not before
/// `shutdown.readiness_grace_ms`, so a load balancer's probe sees it.
async fn draining_answers_503_until_the_listener_closes(enc: Encoding) {
    let node = TestNode::start_with(test_dir(), |c| c.shutdown.readiness_grace_ms = 3000).await;
    let addr = node.addr;
    let url = node.ws_url();
    let token = node.token("carol");
    let mut client = node.connect("dave", enc).await;
    let stopping = tokio::spawn(node.stop());

    let fresh = || {
        reqwest::Client::builder()
            .pool_max_idle_per_host(0)
            .build()
            .expect("client")
    };
    let readyz = format!("http://{addr}/readyz");
    eventually("/readyz to answer 503", || {
        let (client, readyz) = (fresh(), readyz.clone());
        async move {
            let r = client
                .get(readyz)
                .send()
                .await
                .expect("the listener is open");
            (r.status().as_u16() == 503).then_some(())
        }
    })
    .await;
    let refused = match Client::connect(&url, &token, enc).await {
        Ok(_) => panic!("a handshake during the drain was accepted"),
        Err(r) => r,
    };
    assert_eq!(
        (refused.status, refused.code),
        (503, Some(5005)),
        "{refused:?}"
    );
    let (status, v) = chorus_tests::api_call(
        addr,
        "POST",
        "/api/v1/notifications",
        Some(json!({"user": "carol", "type": "t", "title": "x"})),
        Some(chorus_tests::API_KEY),
    )
    .await;
    assert_eq!(
        (status, v["error"]["code"].as_u64()),
        (503, Some(5005)),
        "{v}"
    );
    assert!(!stopping.is_finished(), "the drain ended before the checks");

    let (code, _) = client.closed_by_server().await;
    assert_eq!(code, 1001);
    stopping.await.expect("shutdown completes");
    let after = fresh().get(&readyz).send().await;
    assert!(
        after.is_err(),
        "the listener is closed after the node stopped: {after:?}"
    );
}
