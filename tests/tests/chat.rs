//! Chat rooms: direct, group and public rooms, membership, messages with
//! attachments and threads, edits and deletes, history paging, typing
//! indicators, read receipts and unread counts. Every test runs in both
//! encodings, and clients of one test mix them.

use std::time::Instant;

use chorus_protocol::Encoding;
use chorus_tests::{both_encodings, other, Client, TestNode};
use serde_json::{json, Value};

both_encodings!(
    group_room_membership,
    direct_rooms,
    public_rooms,
    messages_attachments_and_threads,
    edit_and_delete,
    history_paging,
    typing_appears_and_expires,
    receipts_and_unread_counts,
    server_api_manages_rooms,
    direct_room_ids_cannot_be_squatted,
    a_leave_is_readable_when_it_is_answered,
    membership_entries_are_a_per_room_choice,
);

const NOT_MEMBER: u16 = 3003;

/// (user, role) of each member, in the order the server lists them.
fn members(v: &Value) -> Vec<(String, String)> {
    v["members"]
        .as_array()
        .expect("members")
        .iter()
        .map(|m| {
            (
                m["user"].as_str().unwrap().to_string(),
                m["role"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

fn offsets(page: &Value) -> Vec<u64> {
    page["entries"]
        .as_array()
        .expect("entries")
        .iter()
        .map(|e| e["offset"].as_u64().unwrap())
        .collect()
}

fn summary<'a>(list: &'a Value, room: &str) -> Option<&'a Value> {
    list["rooms"]
        .as_array()
        .expect("rooms")
        .iter()
        .find(|r| r["room"]["id"] == room)
}

async fn send(c: &mut Client, room: &str, text: &str) -> u64 {
    let r = c.ok("room.send", json!({"room": room, "text": text})).await;
    assert_eq!(r["duplicate"], false, "{r}");
    r["offset"].as_u64().expect("offset")
}

async fn group_room_membership(enc: Encoding) {
    let node = TestNode::start().await;
    let mut alice = node.connect("alice", enc).await;
    let mut bob = node.connect("bob", other(enc)).await;
    let mut carol = node.connect("carol", enc).await;

    let info = alice
        .ok(
            "room.create",
            json!({"room": "team", "kind": "group", "name": "Team", "members": ["bob"]}),
        )
        .await;
    assert_eq!(info["id"], "team");
    assert_eq!(info["kind"], "group");
    assert_eq!(info["name"], "Team");
    assert_eq!(info["created_by"], "alice");
    assert!(info["created_at"].as_i64().unwrap() > 0);
    let m = alice.ok("room.members", json!({"room": "team"})).await;
    assert_eq!(
        members(&m),
        vec![
            ("alice".into(), "owner".into()),
            ("bob".into(), "member".into())
        ]
    );

    // The same id again, and a direct room through room.create, are refused.
    assert_eq!(
        bob.err("room.create", json!({"room": "team", "kind": "public"}))
            .await,
        3004
    );
    assert_eq!(
        bob.err("room.create", json!({"room": "x", "kind": "direct"}))
            .await,
        3008
    );

    alice.ok("room.join", json!({"room": "team"})).await;
    let j = bob.ok("room.join", json!({"room": "team"})).await;
    assert_eq!(j["channel"], "room:team");
    assert_eq!(j["recovered"], true);

    // A non-member can neither join (invite-only), read, subscribe, list, invite nor post.
    assert_eq!(
        carol.err("room.join", json!({"room": "team"})).await,
        NOT_MEMBER
    );
    assert_eq!(
        carol.err("history", json!({"channel": "room:team"})).await,
        NOT_MEMBER
    );
    assert_eq!(
        carol
            .err("subscribe", json!({"channel": "room:team"}))
            .await,
        NOT_MEMBER
    );
    assert_eq!(
        carol.err("room.members", json!({"room": "team"})).await,
        NOT_MEMBER
    );
    assert_eq!(
        carol
            .err("room.send", json!({"room": "team", "text": "let me in"}))
            .await,
        NOT_MEMBER
    );
    assert_eq!(
        carol
            .err("room.invite", json!({"room": "team", "user": "carol"}))
            .await,
        NOT_MEMBER
    );
    assert_eq!(
        carol
            .err("room.read", json!({"room": "team", "offset": 1}))
            .await,
        NOT_MEMBER
    );

    // Invite: members see the join, the invitee may now join and post.
    let r = alice
        .ok("room.invite", json!({"room": "team", "user": "carol"}))
        .await;
    assert_eq!(r["invited"], "carol");
    let p = bob
        .push_where(|p| {
            p.push == "entry" && p.data["kind"] == "joined" && p.data["sender"] == "carol"
        })
        .await;
    assert_eq!(p.offset, Some(3));
    assert_eq!(p.data["data"]["by"], "alice");
    carol.ok("room.join", json!({"room": "team"})).await;
    let hi = send(&mut carol, "team", "hi all").await;
    let p = bob
        .push_where(|p| p.push == "entry" && p.offset == Some(hi))
        .await;
    assert_eq!(p.data["sender"], "carol");
    assert_eq!(p.data["text"], "hi all");

    // Only the owner removes members.
    assert_eq!(
        bob.err("room.kick", json!({"room": "team", "user": "carol"}))
            .await,
        3001
    );
    let r = alice
        .ok("room.kick", json!({"room": "team", "user": "carol"}))
        .await;
    assert_eq!(r["removed"], "carol");
    let left = carol
        .push_where(|p| p.push == "entry" && p.data["kind"] == "left")
        .await;
    assert_eq!(left.data["sender"], "carol");
    assert_eq!(left.data["data"]["by"], "alice");
    let left_b = bob
        .push_where(|p| p.push == "entry" && p.data["kind"] == "left")
        .await;
    assert_eq!(left_b.offset, left.offset);
    assert_eq!(
        carol
            .err("room.send", json!({"room": "team", "text": "still here?"}))
            .await,
        NOT_MEMBER
    );
    assert_eq!(
        carol.err("history", json!({"channel": "room:team"})).await,
        NOT_MEMBER
    );
    assert_eq!(
        alice
            .err("room.kick", json!({"room": "team", "user": "carol"}))
            .await,
        NOT_MEMBER
    );

    // The removed member no longer receives the room's traffic: alice's next
    // message is fanned out (she sees it) before a message in another room
    // that carol does see, so had carol still been subscribed it would be
    // queued ahead of that one.
    carol.buffered();
    alice
        .ok("room.create", json!({"room": "lobby", "kind": "public"}))
        .await;
    carol.ok("room.join", json!({"room": "lobby"})).await;
    let secret = send(&mut alice, "team", "carol is gone").await;
    alice
        .push_where(|p| {
            p.push == "entry"
                && p.offset == Some(secret)
                && p.channel.as_deref() == Some("room:team")
        })
        .await;
    alice.ok("room.join", json!({"room": "lobby"})).await;
    send(&mut alice, "lobby", "sentinel").await;
    carol.entry("room:lobby", "message").await;
    assert!(
        !carol.has_buffered(|p| p.channel.as_deref() == Some("room:team")),
        "kicked member still receives the room"
    );

    // Leaving: the others see it, the room is closed to the leaver again.
    assert_eq!(
        bob.ok("room.leave", json!({"room": "team"})).await["left"],
        true
    );
    let p = alice
        .push_where(|p| p.push == "entry" && p.data["kind"] == "left" && p.data["sender"] == "bob")
        .await;
    assert!(
        p.data.get("data").is_none_or(Value::is_null),
        "a leave has no `by`: {:?}",
        p.data
    );
    assert_eq!(
        bob.err("history", json!({"channel": "room:team"})).await,
        NOT_MEMBER
    );
    assert_eq!(
        bob.err("room.join", json!({"room": "team"})).await,
        NOT_MEMBER
    );
    assert_eq!(
        bob.err("room.leave", json!({"room": "team"})).await,
        NOT_MEMBER
    );
    let m = alice.ok("room.members", json!({"room": "team"})).await;
    assert_eq!(members(&m), vec![("alice".into(), "owner".into())]);
    assert_eq!(alice.err("room.join", json!({"room": "nope"})).await, 3002);

    // The history tells the membership story in order.
    let h = alice.ok("history", json!({"channel": "room:team"})).await;
    let story: Vec<(String, String)> = h["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["kind"].as_str().unwrap().to_string(),
                e["sender"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect();
    let expect: Vec<(String, String)> = [
        ("joined", "alice"),
        ("joined", "bob"),
        ("joined", "carol"),
        ("message", "carol"),
        ("left", "carol"),
        ("message", "alice"),
        ("left", "bob"),
    ]
    .iter()
    .map(|(a, b)| (a.to_string(), b.to_string()))
    .collect();
    assert_eq!(story, expect);
    assert_eq!(offsets(&h), (1..=7).collect::<Vec<_>>());
}

async fn direct_rooms(enc: Encoding) {
    let node = TestNode::start().await;
    let mut alice = node.connect("alice", enc).await;
    let mut bob = node.connect("bob", other(enc)).await;
    let mut carol = node.connect("carol", enc).await;

    let a = alice.ok("room.direct", json!({"user": "bob"})).await;
    assert_eq!(a["kind"], "direct");
    assert_eq!(a["created_by"], "alice");
    let dm = a["id"].as_str().unwrap().to_string();
    // One room per pair, whoever asks.
    let b = bob.ok("room.direct", json!({"user": "alice"})).await;
    assert_eq!(b, a);
    assert_eq!(
        alice.err("room.direct", json!({"user": "alice"})).await,
        1007
    );
    let m = bob.ok("room.members", json!({"room": dm})).await;
    assert_eq!(
        members(&m),
        vec![
            ("alice".into(), "member".into()),
            ("bob".into(), "member".into())
        ]
    );

    // Exactly two members, forever.
    assert_eq!(
        alice
            .err("room.invite", json!({"room": dm, "user": "carol"}))
            .await,
        3008
    );
    assert_eq!(
        alice
            .err("room.kick", json!({"room": dm, "user": "bob"}))
            .await,
        3008
    );

    bob.ok("room.join", json!({"room": dm})).await;
    let o = send(&mut alice, &dm, "psst").await;
    let p = bob.entry(&format!("room:{dm}"), "message").await;
    assert_eq!(p.offset, Some(o));
    assert_eq!(p.data["text"], "psst");
    assert_eq!(p.data["sender"], "alice");

    // Leaving would lock the pair out of their one direct room for good
    // (nobody can invite into it, and room.direct returns it): refused too...
    assert_eq!(bob.err("room.leave", json!({"room": dm})).await, 3008);
    let (status, v) = node
        .api("DELETE", &format!("/api/v1/rooms/{dm}/members/bob"), None)
        .await;
    assert_eq!((status, v["error"]["code"].as_u64()), (400, Some(3008)));
    // ...and bob's connection still receives the room.
    let o = send(&mut alice, &dm, "still there?").await;
    assert_eq!(
        bob.entry(&format!("room:{dm}"), "message").await.offset,
        Some(o)
    );

    for (op, args) in [
        ("room.join", json!({"room": dm})),
        ("history", json!({"channel": format!("room:{dm}")})),
        ("subscribe", json!({"channel": format!("room:{dm}")})),
        ("room.send", json!({"room": dm, "text": "me too"})),
    ] {
        assert_eq!(carol.err(op, args).await, NOT_MEMBER, "{op}");
    }
    let carol_rooms = carol.ok("rooms.list", json!({})).await;
    assert!(summary(&carol_rooms, &dm).is_none());
    let bob_rooms = bob.ok("rooms.list", json!({})).await;
    assert_eq!(
        summary(&bob_rooms, &dm).expect("dm listed")["room"]["kind"],
        "direct"
    );
}

async fn public_rooms(enc: Encoding) {
    let node = TestNode::start().await;
    let mut alice = node.connect("alice", enc).await;
    let mut bob = node.connect("bob", other(enc)).await;
    let mut dave = node.connect("dave", enc).await;

    let created = alice
        .ok(
            "room.create",
            json!({"room": "lobby", "kind": "public", "name": "Lobby"}),
        )
        .await;
    assert_eq!(created["membership_entries"], false, "{created}");
    // Anyone may read a public room, but only members post.
    assert_eq!(
        bob.err("room.send", json!({"room": "lobby", "text": "hi"}))
            .await,
        NOT_MEMBER
    );
    let j = bob.ok("room.join", json!({"room": "lobby"})).await;
    assert_eq!(j["channel"], "room:lobby");
    let o = send(&mut bob, "lobby", "hello lobby").await;
    assert_eq!(o, 1, "joins of a public room are not entries");
    let h = dave.ok("history", json!({"channel": "room:lobby"})).await;
    assert_eq!(offsets(&h), vec![1]);
    assert_eq!(h["entries"][0]["text"], "hello lobby");
    // A reader who is not a member can follow it live, too.
    dave.ok("subscribe", json!({"channel": "room:lobby"})).await;
    let o = send(&mut bob, "lobby", "second").await;
    assert_eq!(dave.entry("room:lobby", "message").await.offset, Some(o));

    // Joining twice is harmless (no second join entry).
    bob.ok("room.join", json!({"room": "lobby"})).await;
    let m = alice.ok("room.members", json!({"room": "lobby"})).await;
    assert_eq!(
        members(&m),
        vec![
            ("alice".into(), "owner".into()),
            ("bob".into(), "member".into())
        ]
    );

    // After leaving, still readable (public) but not writable.
    alice.ok("room.join", json!({"room": "lobby"})).await;
    alice.ok("room.leave", json!({"room": "lobby"})).await;
    assert_eq!(
        alice
            .err("room.send", json!({"room": "lobby", "text": "bye"}))
            .await,
        NOT_MEMBER
    );
    let h = alice.ok("history", json!({"channel": "room:lobby"})).await;
    assert_eq!(offsets(&h), vec![1, 2], "nor are leaves");
    // The connection that left no longer receives the room; readers still do.
    alice.buffered();
    let o = send(&mut bob, "lobby", "after alice left").await;
    assert_eq!(
        dave.push_where(|p| p.push == "entry"
            && p.data["kind"] == "message"
            && p.data["text"] == "after alice left")
            .await
            .offset,
        Some(o)
    );
    alice.hub_barrier().await;
    assert!(
        !alice.has_buffered(|p| p.offset == Some(o)),
        "pushed after leaving"
    );
    dave.hub_barrier().await;
    assert!(
        !dave.has_buffered(|p| p.data["kind"] == "joined" || p.data["kind"] == "left"),
        "no membership entry reached a subscriber"
    );

    // A removal is an entry even here: history shows who removed whom.
    bob.ok("room.join", json!({"room": "lobby"})).await;
    let (status, _) = node
        .api("DELETE", "/api/v1/rooms/lobby/members/bob", None)
        .await;
    assert_eq!(status, 200);
    let p = dave.entry("room:lobby", "left").await;
    assert_eq!(
        (p.offset, &p.data["sender"], &p.data["data"]["by"]),
        (Some(4), &json!("bob"), &json!("server"))
    );
}

/// A room's creator chooses whether joins and leaves are entries: a public
/// room can record them, a group room can leave them out. Leaving a group
/// room without them still ends every subscription of the user to it.
async fn membership_entries_are_a_per_room_choice(enc: Encoding) {
    let node = TestNode::start().await;
    let mut alice = node.connect("alice", enc).await;
    let mut bob = node.connect("bob", other(enc)).await;
    let mut bob2 = node.connect("bob", enc).await;

    let r = alice
        .ok(
            "room.create",
            json!({"room": "stage", "kind": "public", "membership_entries": true}),
        )
        .await;
    assert_eq!(r["membership_entries"], true);
    bob.ok("room.join", json!({"room": "stage"})).await;
    // The join is answered before its entry is durable: wait for it.
    bob.entry("room:stage", "joined").await;
    let h = alice.ok("history", json!({"channel": "room:stage"})).await;
    let kinds: Vec<&str> = h["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["kind"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["joined", "joined"], "{h}");

    let r = alice
        .ok(
            "room.create",
            json!({"room": "quiet", "kind": "group", "members": ["bob"], "membership_entries": false}),
        )
        .await;
    assert_eq!(r["membership_entries"], false);
    let g = alice
        .ok("room.create", json!({"room": "loud", "kind": "group"}))
        .await;
    assert_eq!(
        g["membership_entries"], true,
        "group rooms record by default"
    );
    bob.ok("room.join", json!({"room": "quiet"})).await;
    bob2.ok("room.join", json!({"room": "quiet"})).await;
    let o = send(&mut alice, "quiet", "hello").await;
    assert_eq!(o, 1, "no entry for the members added or joining");
    assert_eq!(bob2.entry("room:quiet", "message").await.offset, Some(1));
    assert_eq!(
        bob.ok("room.leave", json!({"room": "quiet"})).await["left"],
        true
    );
    let m = alice.ok("room.members", json!({"room": "quiet"})).await;
    assert_eq!(members(&m), vec![("alice".into(), "owner".into())]);
    let o = send(&mut alice, "quiet", "after bob left").await;
    assert_eq!(o, 2, "no entry for the leave");
    bob2.hub_barrier().await;
    assert!(
        !bob2.has_buffered(|p| p.offset == Some(o)),
        "bob's other connection stopped receiving the room he left"
    );
}

async fn messages_attachments_and_threads(enc: Encoding) {
    let node = TestNode::start().await;
    let mut alice = node.connect("alice", enc).await;
    let mut bob = node.connect("bob", other(enc)).await;
    alice
        .ok(
            "room.create",
            json!({"room": "g", "kind": "group", "members": ["bob"]}),
        )
        .await;
    alice.ok("room.join", json!({"room": "g"})).await;
    bob.ok("room.join", json!({"room": "g"})).await;

    let attachments = json!({
        "files": [{"name": "cat.png", "mime": "image/png", "size": 1024, "w": 640.5}],
        "meta": {"tags": ["a", "b"], "nothing": null, "flag": true, "n": -3}
    });
    let r = alice
        .ok(
            "room.send",
            json!({"room": "g", "text": "look", "attachments": attachments}),
        )
        .await;
    assert_eq!(r["channel"], "room:g");
    assert_eq!(r["offset"], 3, "two join entries precede it");
    assert_eq!(r["duplicate"], false);
    let epoch = r["epoch"].as_str().unwrap().to_string();
    assert!(!epoch.is_empty());

    let p = bob.entry("room:g", "message").await;
    assert_eq!(p.offset, Some(3));
    assert_eq!(p.epoch.as_deref(), Some(epoch.as_str()));
    assert!(!p.ephemeral);
    assert_eq!(p.data["offset"], 3);
    assert_eq!(p.data["sender"], "alice");
    assert_eq!(p.data["text"], "look");
    assert_eq!(p.data["attachments"], attachments);
    assert_eq!(p.data["msg_seq"], 1);

    // A reply (thread).
    let r = bob
        .ok(
            "room.send",
            json!({"room": "g", "text": "cute!", "reply_to": 3}),
        )
        .await;
    assert_eq!(r["offset"], 4);
    let p = alice
        .push_where(|p| p.push == "entry" && p.offset == Some(4))
        .await;
    assert_eq!(p.data["reply_to"], 3);
    assert_eq!(p.data["sender"], "bob");
    assert_eq!(p.data["msg_seq"], 2);
    assert_eq!(
        bob.err(
            "room.send",
            json!({"room": "g", "text": "?", "reply_to": 99})
        )
        .await,
        3005
    );
    assert_eq!(
        bob.err(
            "room.send",
            json!({"room": "g", "text": "?", "reply_to": 0})
        )
        .await,
        3005
    );
    // Threads hang off messages, not off other entries (offset 1 is alice's join).
    assert_eq!(
        bob.err(
            "room.send",
            json!({"room": "g", "text": "?", "reply_to": 1})
        )
        .await,
        3005
    );

    // Limits and unknown rooms.
    let long = "x".repeat(16 * 1024 + 1);
    assert_eq!(
        alice
            .err("room.send", json!({"room": "g", "text": long}))
            .await,
        1007
    );
    assert_eq!(
        alice
            .err("room.send", json!({"room": "nowhere", "text": "hi"}))
            .await,
        3002
    );

    let h = bob.ok("history", json!({"channel": "room:g"})).await;
    assert_eq!(offsets(&h), vec![1, 2, 3, 4]);
    let kinds: Vec<&str> = h["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["kind"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, vec!["joined", "joined", "message", "message"]);
    assert_eq!(h["entries"][2]["attachments"], attachments);
    assert_eq!(h["entries"][3]["reply_to"], 3);
    assert_eq!(h["head"]["offset"], 4);
    assert_eq!(h["head"]["msg_seq"], 2);
    assert_eq!(h["head"]["epoch"], epoch.as_str());
}

async fn edit_and_delete(enc: Encoding) {
    let node = TestNode::start().await;
    let mut alice = node.connect("alice", enc).await;
    let mut bob = node.connect("bob", other(enc)).await;
    alice
        .ok(
            "room.create",
            json!({"room": "g", "kind": "group", "members": ["bob"]}),
        )
        .await;
    alice.ok("room.join", json!({"room": "g"})).await;
    bob.ok("room.join", json!({"room": "g"})).await;
    assert_eq!(send(&mut alice, "g", "frist").await, 3);
    assert_eq!(send(&mut bob, "g", "mine").await, 4);

    let r = alice
        .ok(
            "room.edit",
            json!({"room": "g", "offset": 3, "text": "first"}),
        )
        .await;
    assert_eq!(r["offset"], 5);
    let p = bob.entry("room:g", "edit").await;
    assert_eq!(p.offset, Some(5));
    assert_eq!(p.data["target"], 3);
    assert_eq!(p.data["text"], "first");
    assert_eq!(p.data["sender"], "alice");

    // Only the author changes a message.
    assert_eq!(
        bob.err(
            "room.edit",
            json!({"room": "g", "offset": 3, "text": "hacked"})
        )
        .await,
        3006
    );
    assert_eq!(
        bob.err("room.delete", json!({"room": "g", "offset": 3}))
            .await,
        3006
    );
    assert_eq!(
        alice
            .err(
                "room.edit",
                json!({"room": "g", "offset": 4, "text": "hacked"})
            )
            .await,
        3006
    );
    // Only messages that exist.
    assert_eq!(
        alice
            .err("room.edit", json!({"room": "g", "offset": 99, "text": "?"}))
            .await,
        3005
    );
    assert_eq!(
        alice
            .err("room.edit", json!({"room": "g", "offset": 1, "text": "?"}))
            .await,
        3005
    );

    let h = bob
        .ok(
            "history",
            json!({"channel": "room:g", "after": 2, "limit": 1}),
        )
        .await;
    let e = &h["entries"][0];
    assert_eq!(e["offset"], 3);
    assert_eq!(e["text"], "first");
    assert!(e["edited_at"].as_i64().unwrap() > 0);
    assert!(e.get("deleted").is_none_or(|d| d == false));

    let r = alice
        .ok("room.delete", json!({"room": "g", "offset": 3}))
        .await;
    assert_eq!(r["offset"], 6);
    let p = bob.entry("room:g", "delete").await;
    assert_eq!(p.offset, Some(6));
    assert_eq!(p.data["target"], 3);
    let h = alice.ok("history", json!({"channel": "room:g"})).await;
    assert_eq!(offsets(&h), vec![1, 2, 3, 4, 5, 6]);
    let e = &h["entries"][2];
    assert_eq!(e["deleted"], true);
    assert!(e.get("text").is_none_or(Value::is_null), "{e}");
    assert_eq!(
        h["entries"][3]["text"], "mine",
        "other messages are untouched"
    );
    assert_eq!(
        alice
            .err(
                "room.edit",
                json!({"room": "g", "offset": 3, "text": "undo"})
            )
            .await,
        3005
    );
    assert_eq!(
        alice
            .err("room.delete", json!({"room": "g", "offset": 3}))
            .await,
        3005
    );
    // Edits and deletes are not messages: they do not count as unread.
    let list = bob.ok("rooms.list", json!({})).await;
    assert_eq!(summary(&list, "g").unwrap()["head"]["msg_seq"], 2);
}

async fn history_paging(enc: Encoding) {
    let node = TestNode::start().await;
    let mut alice = node.connect("alice", enc).await;
    let mut phone = node.connect("alice", other(enc)).await;
    alice
        .ok("room.create", json!({"room": "h", "kind": "group"}))
        .await;
    // Ten pipelined sends are numbered in the order they were sent.
    let mut ids = Vec::new();
    for i in 0..10 {
        ids.push(
            alice
                .send("room.send", json!({"room": "h", "text": format!("m{i}")}))
                .await,
        );
    }
    for (i, id) in ids.into_iter().enumerate() {
        let r = alice.reply(id).await.expect("send");
        assert_eq!(r["offset"], i as u64 + 2);
    }

    let texts = |p: &Value| -> Vec<String> {
        p["entries"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["text"].as_str().unwrap_or("").to_string())
            .collect()
    };
    // Backwards from the newest.
    let p = alice
        .ok("history", json!({"channel": "room:h", "limit": 4}))
        .await;
    assert_eq!(offsets(&p), vec![8, 9, 10, 11]);
    assert_eq!(texts(&p), vec!["m6", "m7", "m8", "m9"]);
    assert_eq!(p["more"], true);
    assert_eq!(p["head"]["offset"], 11);
    assert_eq!(p["head"]["msg_seq"], 10);
    let p = phone
        .ok(
            "history",
            json!({"channel": "room:h", "before": 8, "limit": 4}),
        )
        .await;
    assert_eq!(offsets(&p), vec![4, 5, 6, 7]);
    assert_eq!(p["more"], true);
    let p = alice
        .ok(
            "history",
            json!({"channel": "room:h", "before": 4, "limit": 4}),
        )
        .await;
    assert_eq!(offsets(&p), vec![1, 2, 3]);
    assert_eq!(p["more"], false);
    let p = alice
        .ok("history", json!({"channel": "room:h", "before": 1}))
        .await;
    assert_eq!(offsets(&p), Vec::<u64>::new());
    assert_eq!(p["more"], false);

    // Forwards from an offset.
    let p = phone
        .ok(
            "history",
            json!({"channel": "room:h", "after": 0, "limit": 4}),
        )
        .await;
    assert_eq!(offsets(&p), vec![1, 2, 3, 4]);
    assert_eq!(p["more"], true);
    let p = phone
        .ok(
            "history",
            json!({"channel": "room:h", "after": 4, "limit": 4}),
        )
        .await;
    assert_eq!(offsets(&p), vec![5, 6, 7, 8]);
    assert_eq!(p["more"], true);
    let p = phone
        .ok(
            "history",
            json!({"channel": "room:h", "after": 8, "limit": 4}),
        )
        .await;
    assert_eq!(offsets(&p), vec![9, 10, 11]);
    assert_eq!(texts(&p), vec!["m7", "m8", "m9"]);
    assert_eq!(p["more"], false);
    let p = phone
        .ok("history", json!({"channel": "room:h", "after": 11}))
        .await;
    assert_eq!(offsets(&p), Vec::<u64>::new());
    assert_eq!(p["more"], false);
    // Whole history in one page.
    let p = phone.ok("history", json!({"channel": "room:h"})).await;
    assert_eq!(offsets(&p), (1..=11).collect::<Vec<_>>());
    assert_eq!(p["more"], false);

    // The server API pages the same way.
    let (status, p) = node
        .api("GET", "/api/v1/rooms/h/messages?before=5&limit=2", None)
        .await;
    assert_eq!(status, 200, "{p}");
    assert_eq!(offsets(&p), vec![3, 4]);
    assert_eq!(p["more"], true);
    let (_, p) = node
        .api("GET", "/api/v1/rooms/h/messages?after=9&limit=5", None)
        .await;
    assert_eq!(offsets(&p), vec![10, 11]);
    assert_eq!(p["more"], false);

    assert_eq!(
        alice.err("history", json!({"channel": "room:nope"})).await,
        3002
    );
    assert_eq!(
        alice.err("history", json!({"channel": "chat:h"})).await,
        3007
    );
}

async fn typing_appears_and_expires(enc: Encoding) {
    let node = TestNode::start().await;
    let mut alice = node.connect("alice", enc).await;
    let mut bob = node.connect("bob", other(enc)).await;
    alice
        .ok(
            "room.create",
            json!({"room": "t", "kind": "group", "members": ["bob"]}),
        )
        .await;
    alice.ok("room.join", json!({"room": "t"})).await;
    bob.ok("room.join", json!({"room": "t"})).await;

    alice.ok("room.typing", json!({"room": "t"})).await;
    let p = bob.push("typing", Some("room:t")).await;
    let shown = Instant::now();
    assert!(p.ephemeral, "typing is ephemeral");
    assert_eq!(p.offset, None);
    assert_eq!(p.data, json!({"room": "t", "users": ["alice"]}));

    // Nobody renews it: it goes away by itself after typing_ttl (300 ms).
    let p = bob.push("typing", Some("room:t")).await;
    let after = shown.elapsed();
    assert_eq!(p.data, json!({"room": "t", "users": []}));
    assert!(
        after.as_millis() >= 200,
        "typing expired after only {after:?}"
    );
    assert!(after.as_millis() < 3_000, "typing took {after:?} to expire");

    // It is not stored: history has no trace of it.
    let h = bob.ok("history", json!({"channel": "room:t"})).await;
    assert_eq!(offsets(&h), vec![1, 2]);

    // A second round works the same.
    assert_eq!(
        alice.push("typing", Some("room:t")).await.data["users"],
        json!(["alice"])
    );
    assert_eq!(
        alice.push("typing", Some("room:t")).await.data["users"],
        json!([])
    );
    bob.ok("room.typing", json!({"room": "t"})).await;
    assert_eq!(
        alice.push("typing", Some("room:t")).await.data["users"],
        json!(["bob"])
    );
    assert_eq!(
        alice.push("typing", Some("room:t")).await.data["users"],
        json!([])
    );
    assert_eq!(
        alice.err("room.typing", json!({"room": "bad room"})).await,
        1007
    );
    // Refused like a send: a room that does not exist, a non-member.
    assert_eq!(
        alice.err("room.typing", json!({"room": "nowhere"})).await,
        3002
    );
    let mut eve = node.connect("eve", enc).await;
    assert_eq!(eve.err("room.typing", json!({"room": "t"})).await, 3003);
}

async fn receipts_and_unread_counts(enc: Encoding) {
    let node = TestNode::start().await;
    let mut alice = node.connect("alice", enc).await;
    let mut bob = node.connect("bob", other(enc)).await;
    alice
        .ok(
            "room.create",
            json!({"room": "r", "kind": "group", "members": ["bob"]}),
        )
        .await;
    alice
        .ok(
            "room.create",
            json!({"room": "quiet", "kind": "group", "members": ["bob"]}),
        )
        .await;
    alice.ok("room.join", json!({"room": "r"})).await;
    bob.ok("room.join", json!({"room": "r"})).await;
    for i in 0..3 {
        assert_eq!(send(&mut alice, "r", &format!("m{i}")).await, 3 + i);
    }

    let list = bob.ok("rooms.list", json!({})).await;
    let s = summary(&list, "r").expect("bob's rooms include r");
    assert_eq!(
        (s["unread"].as_u64(), s["read_offset"].as_u64()),
        (Some(3), Some(0))
    );
    assert_eq!(s["head"]["offset"], 5);
    assert_eq!(summary(&list, "quiet").expect("quiet listed")["unread"], 0);
    assert_eq!(list["rooms"].as_array().unwrap().len(), 2);
    // A sender has read what they sent.
    let list = alice.ok("rooms.list", json!({})).await;
    let s = summary(&list, "r").unwrap();
    assert_eq!(
        (s["unread"].as_u64(), s["read_offset"].as_u64()),
        (Some(0), Some(5))
    );

    let r = bob.ok("room.read", json!({"room": "r", "offset": 4})).await;
    assert_eq!(r, json!({"room": "r", "offset": 4, "unread": 1}));
    let p = alice.push("receipt", Some("room:r")).await;
    assert!(p.ephemeral);
    assert_eq!(p.data, json!({"room": "r", "user": "bob", "offset": 4}));
    let list = bob.ok("rooms.list", json!({})).await;
    let s = summary(&list, "r").unwrap();
    assert_eq!(
        (s["unread"].as_u64(), s["read_offset"].as_u64()),
        (Some(1), Some(4))
    );

    // A marker never moves back, and never past the head.
    let r = bob.ok("room.read", json!({"room": "r", "offset": 2})).await;
    assert_eq!(r, json!({"room": "r", "offset": 4, "unread": 1}));
    assert_eq!(
        bob.err("room.read", json!({"room": "r", "offset": 99}))
            .await,
        1007
    );
    let r = bob.ok("room.read", json!({"room": "r", "offset": 5})).await;
    assert_eq!(r["unread"], 0);
    // The backwards move pushed nothing: the next receipt is the one for 5.
    let p = alice.push("receipt", Some("room:r")).await;
    assert_eq!(p.data, json!({"room": "r", "user": "bob", "offset": 5}));

    // Joins and edits are not unread messages; new messages are.
    alice
        .ok("room.invite", json!({"room": "r", "user": "carol"}))
        .await;
    alice
        .ok(
            "room.edit",
            json!({"room": "r", "offset": 3, "text": "m0!"}),
        )
        .await;
    let list = bob.ok("rooms.list", json!({})).await;
    assert_eq!(summary(&list, "r").unwrap()["unread"], 0);
    let a = send(&mut alice, "r", "new 1").await;
    let b = send(&mut alice, "r", "new 2").await;
    assert_eq!((a, b), (8, 9));
    let list = bob.ok("rooms.list", json!({})).await;
    let s = summary(&list, "r").unwrap();
    assert_eq!(
        (s["unread"].as_u64(), s["read_offset"].as_u64()),
        (Some(2), Some(5))
    );
    // A marker on a non-message entry counts the messages up to it.
    let r = bob.ok("room.read", json!({"room": "r", "offset": 6})).await;
    assert_eq!(r, json!({"room": "r", "offset": 6, "unread": 2}));
    let r = bob.ok("room.read", json!({"room": "r", "offset": 8})).await;
    assert_eq!(r, json!({"room": "r", "offset": 8, "unread": 1}));
}

async fn server_api_manages_rooms(enc: Encoding) {
    let node = TestNode::start().await;
    let mut alice = node.connect("alice", enc).await;
    let mut carol = node.connect("carol", other(enc)).await;

    let (status, info) = node.api("POST", "/api/v1/rooms", Some(json!({"room": "ops", "kind": "group", "name": "Ops", "created_by": "alice", "members": ["bob"]}))).await;
    assert_eq!(status, 200, "{info}");
    assert_eq!(
        (
            info["id"].as_str(),
            info["kind"].as_str(),
            info["created_by"].as_str()
        ),
        (Some("ops"), Some("group"), Some("alice"))
    );
    let (status, v) = node
        .api(
            "POST",
            "/api/v1/rooms",
            Some(json!({"room": "ops", "kind": "group", "created_by": "bob"})),
        )
        .await;
    assert_eq!((status, v["error"]["code"].as_u64()), (409, Some(3004)));
    let (status, v) = node.api("GET", "/api/v1/rooms/ops", None).await;
    assert_eq!(status, 200);
    assert_eq!(v["room"], info);
    assert_eq!(
        members(&v),
        vec![
            ("alice".into(), "owner".into()),
            ("bob".into(), "member".into())
        ]
    );

    // Members added and removed by the server; the clients see it.
    alice.ok("room.join", json!({"room": "ops"})).await;
    assert_eq!(
        carol.err("room.join", json!({"room": "ops"})).await,
        NOT_MEMBER
    );
    let (status, v) = node
        .api(
            "POST",
            "/api/v1/rooms/ops/members",
            Some(json!({"user": "carol"})),
        )
        .await;
    assert_eq!((status, v), (200, json!({"invited": "carol"})));
    carol.ok("room.join", json!({"room": "ops"})).await;
    let (status, v) = node
        .api("DELETE", "/api/v1/rooms/ops/members/bob", None)
        .await;
    assert_eq!((status, v), (200, json!({"removed": "bob"})));
    let p = alice
        .push_where(|p| p.push == "entry" && p.data["kind"] == "left")
        .await;
    assert_eq!(
        (p.data["sender"].as_str(), p.data["data"]["by"].as_str()),
        (Some("bob"), Some("server"))
    );
    let (status, v) = node
        .api("DELETE", "/api/v1/rooms/ops/members/bob", None)
        .await;
    assert_eq!((status, v["error"]["code"].as_u64()), (403, Some(3003)));

    // Posting as a user, or as nobody.
    let (status, r) = node
        .api(
            "POST",
            "/api/v1/rooms/ops/messages",
            Some(json!({"sender": "alice", "text": "from the backend", "attachments": {"k": 1}})),
        )
        .await;
    assert_eq!(status, 200, "{r}");
    let p = carol
        .push_where(|p| p.push == "entry" && p.offset == r["offset"].as_u64())
        .await;
    assert_eq!(
        (p.data["sender"].as_str(), p.data["text"].as_str()),
        (Some("alice"), Some("from the backend"))
    );
    assert_eq!(p.data["attachments"], json!({"k": 1}));
    let (_, r) = node
        .api(
            "POST",
            "/api/v1/rooms/ops/messages",
            Some(json!({"text": "system notice"})),
        )
        .await;
    let p = carol
        .push_where(|p| p.push == "entry" && p.offset == r["offset"].as_u64())
        .await;
    assert!(p.data.get("sender").is_none_or(Value::is_null));
    let (status, v) = node
        .api(
            "POST",
            "/api/v1/rooms/nope/messages",
            Some(json!({"text": "x"})),
        )
        .await;
    assert_eq!((status, v["error"]["code"].as_u64()), (404, Some(3002)));

    // Direct rooms through the API are the same room the clients get.
    let (status, dm) = node
        .api(
            "POST",
            "/api/v1/rooms",
            Some(json!({"kind": "direct", "created_by": "carol", "members": ["alice"]})),
        )
        .await;
    assert_eq!(status, 200, "{dm}");
    assert_eq!(alice.ok("room.direct", json!({"user": "carol"})).await, dm);
    let (status, v) = node
        .api(
            "POST",
            "/api/v1/rooms",
            Some(json!({"kind": "direct", "created_by": "carol", "members": ["carol"]})),
        )
        .await;
    assert_eq!((status, v["error"]["code"].as_u64()), (400, Some(1007)));
}

async fn direct_room_ids_cannot_be_squatted(enc: Encoding) {
    let node = TestNode::start().await;
    let mut alice = node.connect("alice", enc).await;
    let mut mallory = node.connect("mallory", other(enc)).await;
    // A group room may not take the id the direct room of alice and bob will have...
    let squat = json!({"room": "dm:5:alice:bob", "kind": "group", "members": ["alice", "bob"]});
    assert_eq!(mallory.err("room.create", squat).await, 1007);
    assert_eq!(
        mallory
            .err("room.create", json!({"room": "dm:x", "kind": "public"}))
            .await,
        1007
    );
    let (status, v) = node
        .api(
            "POST",
            "/api/v1/rooms",
            Some(json!({"room": "dm:5:alice:bob", "kind": "public", "created_by": "mallory"})),
        )
        .await;
    assert_eq!((status, v["error"]["code"].as_u64()), (400, Some(1007)));
    // ...so it stays theirs.
    let dm = alice.ok("room.direct", json!({"user": "bob"})).await;
    assert_eq!(
        (dm["id"].as_str(), dm["kind"].as_str()),
        (Some("dm:5:alice:bob"), Some("direct"))
    );
    assert_eq!(
        mallory
            .err("history", json!({"channel": "room:dm:5:alice:bob"}))
            .await,
        NOT_MEMBER
    );
    // Ids chosen by the server never collide with it.
    let auto = alice.ok("room.create", json!({"kind": "group"})).await;
    assert!(auto["id"].as_str().unwrap().starts_with('r'), "{auto}");
}

/// `{"left": true}` comes once the `left` entry is durable: a history read
/// right after it (from another connection) always has it. Before, about one
/// try in seven missed it.
async fn a_leave_is_readable_when_it_is_answered(enc: Encoding) {
    let node = TestNode::start().await;
    let mut alice = node.connect("alice", enc).await;
    let mut bob = node.connect("bob", other(enc)).await;
    alice
        .ok(
            "room.create",
            json!({"room": "door", "kind": "public", "membership_entries": true}),
        )
        .await;
    for round in 0..30 {
        bob.ok("room.join", json!({"room": "door"})).await;
        assert_eq!(
            bob.ok("room.leave", json!({"room": "door"})).await["left"],
            true
        );
        let h = alice
            .ok("history", json!({"channel": "room:door", "limit": 1}))
            .await;
        let last = &h["entries"][0];
        assert_eq!(
            (last["kind"].as_str(), last["sender"].as_str()),
            (Some("left"), Some("bob")),
            "round {round}: {h}"
        );
        assert_eq!(h["head"]["offset"], last["offset"], "round {round}: {h}");
    }
}
