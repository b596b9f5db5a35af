//! Notifications: created by the server API (and by chat: direct messages and
//! @mentions), pushed live to every connection of the user, listed with
//! paging, counted, marked read on every device, muted by preference (urgent
//! never), batched in bursts, and gone when expired.

use std::collections::BTreeSet;
use std::time::Instant;

use chorus_protocol::{Encoding, Push};
use chorus_tests::{both_encodings, eventually, other, Client, TestNode};
use serde_json::{json, Value};

both_encodings!(
    pushed_live_to_every_connection,
    list_paging_and_mark_read,
    preferences_mute_but_urgent_gets_through,
    burst_arrives_batched,
    expired_ones_disappear,
    direct_messages_and_mentions_notify,
);

/// Creates one notification through the server API; returns its id.
async fn notify(node: &TestNode, body: Value) -> u64 {
    let (status, v) = node.api("POST", "/api/v1/notifications", Some(body)).await;
    assert_eq!(status, 200, "{v}");
    let ids = v["ids"].as_array().expect("ids");
    assert_eq!(ids.len(), 1, "{v}");
    ids[0].as_u64().expect("numeric id")
}

async fn notify_simple(node: &TestNode, user: &str, title: &str) -> u64 {
    notify(node, json!({"user": user, "type": "test", "title": title})).await
}

/// The ids of a list of notifications, or a list of ids as such.
fn ids(items: &Value) -> Vec<u64> {
    items
        .as_array()
        .expect("a list")
        .iter()
        .map(|n| {
            n.as_u64()
                .or_else(|| n["id"].as_u64())
                .unwrap_or_else(|| panic!("not an id: {n}"))
        })
        .collect()
}

async fn notifications_push(c: &mut Client) -> Push {
    c.push("notifications", None).await
}

async fn pushed_live_to_every_connection(enc: Encoding) {
    let node = TestNode::start().await;
    let mut laptop = node.connect("alice", enc).await;
    let mut phone = node.connect("alice", other(enc)).await;
    let mut bob = node.connect("bob", enc).await;

    let id = notify(
        &node,
        json!({
            "user": "alice", "type": "like", "title": "Bob liked your post", "body": "\"Sunset\"",
            "data": {"post": 123, "tags": ["x"]}, "priority": "high", "category": "social"
        }),
    )
    .await;
    for device in [&mut laptop, &mut phone] {
        let p = notifications_push(device).await;
        assert!(!p.ephemeral, "notifications are stored");
        assert_eq!(p.data["unread"], 1);
        let items = p.data["items"].as_array().unwrap();
        assert_eq!(items.len(), 1);
        let n = &items[0];
        assert_eq!(n["id"], id);
        assert_eq!(n["user"], "alice");
        assert_eq!(n["type"], "like");
        assert_eq!(n["title"], "Bob liked your post");
        assert_eq!(n["body"], "\"Sunset\"");
        assert_eq!(n["data"], json!({"post": 123, "tags": ["x"]}));
        assert_eq!(n["priority"], "high");
        assert_eq!(n["category"], "social");
        assert_eq!(n["read"], false);
        assert!(n["created_at"].as_i64().unwrap() > 0);
        assert!(n.get("expires_at").is_none_or(Value::is_null));
    }

    // Bob's first push is his own notification: alice's never reached him.
    let bob_id = notify_simple(&node, "bob", "for bob").await;
    let p = notifications_push(&mut bob).await;
    assert_eq!(ids(&p.data["items"]), vec![bob_id]);

    // One call, several users.
    let (status, v) = node
        .api("POST", "/api/v1/notifications", Some(json!({"users": ["alice", "bob"], "type": "news", "title": "Hi all", "priority": "low"})))
        .await;
    assert_eq!(status, 200, "{v}");
    let both: Vec<u64> = v["ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i.as_u64().unwrap())
        .collect();
    assert_eq!(both.len(), 2);
    for c in [&mut laptop, &mut phone, &mut bob] {
        let p = notifications_push(c).await;
        let got = ids(&p.data["items"]);
        assert_eq!(got.len(), 1);
        assert!(both.contains(&got[0]));
        assert_eq!(p.data["items"][0]["priority"], "low");
    }
    assert_eq!(
        laptop.ok("notifications.unread", json!({})).await,
        json!({"unread": 2})
    );
    assert_eq!(
        bob.ok("notifications.unread", json!({})).await,
        json!({"unread": 2})
    );

    // Bad calls are refused with a code.
    let (status, v) = node
        .api(
            "POST",
            "/api/v1/notifications",
            Some(json!({"users": [], "type": "t", "title": "x"})),
        )
        .await;
    assert_eq!((status, v["error"]["code"].as_u64()), (400, Some(1007)));
    let (status, v) = node
        .api(
            "POST",
            "/api/v1/notifications",
            Some(json!({"user": "bad user", "type": "t", "title": "x"})),
        )
        .await;
    assert_eq!((status, v["error"]["code"].as_u64()), (400, Some(1007)));
}

async fn list_paging_and_mark_read(enc: Encoding) {
    let node = TestNode::start().await;
    let mut laptop = node.connect("alice", enc).await;
    let mut phone = node.connect("alice", other(enc)).await;
    let mut n = Vec::new();
    for i in 0..5 {
        n.push(notify_simple(&node, "alice", &format!("n{i}")).await);
    }
    assert!(
        n.windows(2).all(|w| w[0] < w[1]),
        "ids are time-ordered: {n:?}"
    );

    // Newest first, paged with `before`.
    let p = laptop.ok("notifications.list", json!({"limit": 2})).await;
    assert_eq!(ids(&p["items"]), vec![n[4], n[3]]);
    assert_eq!(
        (p["more"].as_bool(), p["unread"].as_u64()),
        (Some(true), Some(5))
    );
    assert_eq!(p["items"][0]["title"], "n4");
    let p = laptop
        .ok("notifications.list", json!({"limit": 2, "before": n[3]}))
        .await;
    assert_eq!(ids(&p["items"]), vec![n[2], n[1]]);
    assert_eq!(p["more"], true);
    let p = laptop
        .ok("notifications.list", json!({"limit": 2, "before": n[1]}))
        .await;
    assert_eq!(ids(&p["items"]), vec![n[0]]);
    assert_eq!(p["more"], false);
    // The server API lists the same inbox.
    let (status, p) = node
        .api("GET", "/api/v1/users/alice/notifications?limit=2", None)
        .await;
    assert_eq!(status, 200);
    assert_eq!(ids(&p["items"]), vec![n[4], n[3]]);

    // Mark several: every device is told.
    let r = laptop
        .ok("notifications.read", json!({"ids": [n[0], n[1]]}))
        .await;
    let read_ids: BTreeSet<u64> = ids_set(&r["ids"]);
    assert_eq!(read_ids, BTreeSet::from([n[0], n[1]]));
    assert_eq!(
        (r["all"].as_bool(), r["unread"].as_u64()),
        (Some(false), Some(3))
    );
    for device in [&mut phone, &mut laptop] {
        let p = device.push("notifications.read", None).await;
        assert!(p.ephemeral, "a read-state change is not stored as a push");
        assert_eq!(ids_set(&p.data["ids"]), read_ids);
        assert_eq!(p.data["unread"], 3);
        assert_eq!(p.data["all"], false);
    }
    let p = phone
        .ok("notifications.list", json!({"unread_only": true}))
        .await;
    assert_eq!(ids(&p["items"]), vec![n[4], n[3], n[2]]);
    assert_eq!(p["more"], false);
    let (_, p) = node
        .api(
            "GET",
            "/api/v1/users/alice/notifications?unread_only=true&limit=1",
            None,
        )
        .await;
    assert_eq!(ids(&p["items"]), vec![n[4]]);
    assert_eq!(
        (p["more"].as_bool(), p["unread"].as_u64()),
        (Some(true), Some(3))
    );
    assert_eq!(
        phone.ok("notifications.unread", json!({})).await,
        json!({"unread": 3})
    );

    // Mark one from the other device; marking a read one again changes nothing.
    let r = phone.ok("notifications.read", json!({"ids": [n[2]]})).await;
    assert_eq!(
        (ids(&r["ids"]), r["unread"].as_u64()),
        (vec![n[2]], Some(2))
    );
    let p = laptop.push("notifications.read", None).await;
    assert_eq!(
        (ids(&p.data["ids"]), p.data["unread"].as_u64()),
        (vec![n[2]], Some(2))
    );
    let r = phone.ok("notifications.read", json!({"ids": [n[0]]})).await;
    assert_eq!((ids(&r["ids"]), r["unread"].as_u64()), (vec![], Some(2)));
    assert_eq!(phone.err("notifications.read", json!({})).await, 1003);

    // Mark all.
    let r = laptop.ok("notifications.read", json!({"all": true})).await;
    assert_eq!(ids_set(&r["ids"]), BTreeSet::from([n[3], n[4]]));
    assert_eq!(
        (r["all"].as_bool(), r["unread"].as_u64()),
        (Some(true), Some(0))
    );
    let p = phone
        .push_where(|p| p.push == "notifications.read" && p.data["all"] == true)
        .await;
    assert_eq!(p.data["unread"], 0);
    let p = phone
        .ok("notifications.list", json!({"unread_only": true}))
        .await;
    assert_eq!(ids(&p["items"]), Vec::<u64>::new());
    let p = phone.ok("notifications.list", json!({})).await;
    assert_eq!(ids(&p["items"]), vec![n[4], n[3], n[2], n[1], n[0]]);
    assert!(p["items"]
        .as_array()
        .unwrap()
        .iter()
        .all(|i| i["read"] == true));
    assert_eq!(p["unread"], 0);
}

fn ids_set(v: &Value) -> BTreeSet<u64> {
    ids(v).into_iter().collect()
}

async fn preferences_mute_but_urgent_gets_through(enc: Encoding) {
    let node = TestNode::start().await;
    let mut alice = node.connect("alice", enc).await;
    let mut phone = node.connect("alice", other(enc)).await;
    assert_eq!(
        alice.ok("notifications.prefs.get", json!({})).await,
        json!({"muted_categories": [], "muted_rooms": []})
    );
    let prefs = json!({"muted_categories": ["social"], "muted_rooms": ["noisy"]});
    assert_eq!(
        alice.ok("notifications.prefs.set", prefs.clone()).await,
        prefs
    );
    assert_eq!(phone.ok("notifications.prefs.get", json!({})).await, prefs);

    let muted_cat = notify(
        &node,
        json!({"user": "alice", "type": "like", "title": "a", "category": "social"}),
    )
    .await;
    let muted_room = notify(
        &node,
        json!({"user": "alice", "type": "msg", "title": "b", "room": "noisy", "priority": "high"}),
    )
    .await;
    let urgent = notify(&node, json!({"user": "alice", "type": "alert", "title": "c", "category": "social", "priority": "urgent"})).await;
    // Muted ones are not pushed; urgent ones always are (and at once).
    for device in [&mut alice, &mut phone] {
        let p = notifications_push(device).await;
        assert_eq!(ids(&p.data["items"]), vec![urgent]);
        assert_eq!(
            p.data["unread"], 3,
            "muted ones are still stored and unread"
        );
    }
    // Other categories still get through.
    let work = notify(
        &node,
        json!({"user": "alice", "type": "task", "title": "d", "category": "work"}),
    )
    .await;
    let p = notifications_push(&mut alice).await;
    assert_eq!(ids(&p.data["items"]), vec![work]);
    let p = alice.ok("notifications.list", json!({})).await;
    assert_eq!(ids(&p["items"]), vec![work, urgent, muted_room, muted_cat]);

    // Unmuting takes effect at once.
    alice.ok("notifications.prefs.set", json!({})).await;
    let social = notify(
        &node,
        json!({"user": "alice", "type": "like", "title": "e", "category": "social"}),
    )
    .await;
    assert_eq!(
        ids(&notifications_push(&mut alice).await.data["items"]),
        vec![social]
    );
}

async fn burst_arrives_batched(enc: Encoding) {
    let node = TestNode::start().await;
    let mut alice = node.connect("alice", enc).await;
    let mut phone = node.connect("alice", other(enc)).await;
    let node = &node;
    let calls =
        (0..5).map(|i| async move { notify_simple(node, "alice", &format!("burst {i}")).await });
    let sent: BTreeSet<u64> = futures_util::future::join_all(calls)
        .await
        .into_iter()
        .collect();
    assert_eq!(sent.len(), 5);
    for device in [&mut alice, &mut phone] {
        let mut got = Vec::new();
        let mut pushes = 0;
        let mut last_unread = 0;
        while got.len() < 5 {
            let p = notifications_push(device).await;
            pushes += 1;
            got.extend(ids(&p.data["items"]));
            last_unread = p.data["unread"].as_u64().unwrap();
        }
        assert_eq!(
            got.iter().copied().collect::<BTreeSet<_>>(),
            sent,
            "each once, no other"
        );
        assert_eq!(got.len(), 5, "no duplicates");
        assert!(
            pushes < 5,
            "5 notifications in a burst came as {pushes} pushes"
        );
        assert_eq!(last_unread, 5);
    }
}

async fn expired_ones_disappear(enc: Encoding) {
    let node = TestNode::start().await;
    let mut alice = node.connect("alice", enc).await;
    let keep = notify_simple(&node, "alice", "stays").await;
    let created = Instant::now();
    let gone = notify(
        &node,
        json!({"user": "alice", "type": "flash", "title": "soon gone", "ttl_ms": 400}),
    )
    .await;
    let p = alice
        .push_where(|p| p.push == "notifications" && ids(&p.data["items"]).contains(&gone))
        .await;
    let item = p.data["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["id"] == gone)
        .unwrap()
        .clone();
    let ttl = item["expires_at"].as_i64().unwrap() - item["created_at"].as_i64().unwrap();
    assert!(
        (350..=450).contains(&ttl),
        "expires_at - created_at = {ttl}"
    );
    let p = alice.ok("notifications.list", json!({})).await;
    assert_eq!(ids(&p["items"]), vec![gone, keep]);
    assert_eq!(p["unread"], 2);

    // It disappears by itself: from the list, the count and the server API.
    let page = eventually("the expired notification to disappear", || {
        let node = &node;
        async move {
            let (_, p) = node
                .api("GET", "/api/v1/users/alice/notifications", None)
                .await;
            (ids(&p["items"]) == vec![keep]).then_some(p)
        }
    })
    .await;
    assert!(
        created.elapsed().as_millis() >= 350,
        "gone after only {:?}",
        created.elapsed()
    );
    assert_eq!(page["unread"], 1);
    assert_eq!(
        alice.ok("notifications.unread", json!({})).await,
        json!({"unread": 1})
    );
    let p = alice
        .ok("notifications.list", json!({"unread_only": true}))
        .await;
    assert_eq!(ids(&p["items"]), vec![keep]);
    // An expired notification can no longer be marked read.
    let r = alice.ok("notifications.read", json!({"ids": [gone]})).await;
    assert_eq!((ids(&r["ids"]), r["unread"].as_u64()), (vec![], Some(1)));

    // A lifetime too long to add to the clock means "practically never".
    for ttl in [u64::MAX, i64::MAX as u64] {
        let forever = notify(
            &node,
            json!({"user": "alice", "type": "t", "title": "forever", "ttl_ms": ttl}),
        )
        .await;
        let p = alice.ok("notifications.list", json!({"limit": 1})).await;
        assert_eq!(ids(&p["items"]), vec![forever]);
        assert!(p["items"][0]["expires_at"].as_i64().unwrap() > chorus_protocol::now_ms());
    }
    assert_eq!(
        alice.ok("notifications.unread", json!({})).await,
        json!({"unread": 3})
    );
}

async fn direct_messages_and_mentions_notify(enc: Encoding) {
    let node = TestNode::start().await;
    let mut alice = node.connect("alice", enc).await;
    let mut bob = node.connect("bob", other(enc)).await;
    let mut carol = node.connect("carol", enc).await;

    // A direct message notifies the other member (who need not be subscribed).
    let dm = alice.ok("room.direct", json!({"user": "bob"})).await["id"]
        .as_str()
        .unwrap()
        .to_string();
    let sent = alice
        .ok("room.send", json!({"room": dm, "text": "are you there?"}))
        .await;
    let p = notifications_push(&mut bob).await;
    let items = p.data["items"].as_array().unwrap();
    assert_eq!(items.len(), 1);
    let n = &items[0];
    assert_eq!(n["type"], "chat.direct");
    assert_eq!(n["category"], "chat");
    assert_eq!(n["priority"], "normal");
    assert_eq!(n["room"], dm.as_str());
    assert_eq!(n["body"], "are you there?");
    assert_eq!(n["title"], "alice sent you a message");
    assert_eq!(
        n["data"],
        json!({"room": dm, "offset": sent["offset"], "from": "alice"})
    );

    // @mentions notify the members named, not the sender nor non-members.
    alice
        .ok(
            "room.create",
            json!({"room": "club", "kind": "group", "name": "Club", "members": ["bob", "carol"]}),
        )
        .await;
    let m1 = alice
        .ok(
            "room.send",
            json!({"room": "club", "text": "hey @bob, look (and @alice, @zed)"}),
        )
        .await;
    let p = notifications_push(&mut bob).await;
    let n = &p.data["items"][0];
    assert_eq!(p.data["items"].as_array().unwrap().len(), 1);
    assert_eq!(n["type"], "chat.mention");
    assert_eq!(n["title"], "alice mentioned you in Club");
    assert_eq!(n["room"], "club");
    assert_eq!(
        n["data"],
        json!({"room": "club", "offset": m1["offset"], "from": "alice"})
    );
    let m2 = alice
        .ok("room.send", json!({"room": "club", "text": "@carol!"}))
        .await;
    // Carol's first notification is her own mention: bob's did not reach her.
    let p = notifications_push(&mut carol).await;
    assert_eq!(p.data["items"].as_array().unwrap().len(), 1);
    assert_eq!(p.data["items"][0]["data"]["offset"], m2["offset"]);
    assert_eq!(p.data["items"][0]["type"], "chat.mention");
    let (_, zed) = node
        .api("GET", "/api/v1/users/zed/notifications", None)
        .await;
    assert_eq!(zed["items"], json!([]));

    // They are stored like any other: listed, counted, and alice got none.
    let list = bob.ok("notifications.list", json!({})).await;
    let types: Vec<&str> = list["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["type"].as_str().unwrap())
        .collect();
    assert_eq!(types, vec!["chat.mention", "chat.direct"]);
    assert_eq!(list["unread"], 2);
    let mine = notify_simple(&node, "alice", "sentinel").await;
    let p = notifications_push(&mut alice).await;
    assert_eq!(
        ids(&p.data["items"]),
        vec![mine],
        "the sender is not notified of their own messages"
    );
    // A muted room silences chat notifications too.
    bob.ok("notifications.prefs.set", json!({"muted_rooms": [dm]}))
        .await;
    alice
        .ok("room.send", json!({"room": dm, "text": "muted"}))
        .await;
    alice
        .ok("room.send", json!({"room": "club", "text": "@bob again"}))
        .await;
    let p = notifications_push(&mut bob).await;
    assert_eq!(p.data["items"].as_array().unwrap().len(), 1, "{:?}", p.data);
    assert_eq!(p.data["items"][0]["room"], "club");
    assert_eq!(p.data["unread"], 4);
}
