//! Collaborative documents through real sockets: stock-protocol `/doc`
//! clients (y-protocols, as y-websocket speaks it) and `doc.*` on the
//! Chorus socket in both encodings, on one node and across a cluster.

use std::time::Duration;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use chorus_protocol::doc::{Bin, DocBytes};
use chorus_protocol::{close, Encoding};
use chorus_tests::cluster::Sandbox;
use chorus_tests::ydoc::{insert, local_edit, YClient};
use chorus_tests::{both_encodings, eventually, other, test_dir, TestNode};
use futures_util::SinkExt;
use serde::Serialize;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message as WsMessage;
use yrs::sync::{Awareness, AwarenessUpdate, Message, SyncMessage};
use yrs::updates::decoder::Decode;
use yrs::updates::encoder::Encode;
use yrs::{Doc, GetString, Map, ReadTxn, StateVector, Text, Transact, Update, WriteTxn};

fn b64(bytes: &[u8]) -> String {
    STANDARD.encode(bytes)
}

fn unb64(v: &Value) -> Vec<u8> {
    STANDARD
        .decode(v.as_str().expect("base64 string"))
        .expect("base64")
}

/// A Chorus-socket document replica: `doc.open`, then pushes.
struct Replica {
    doc: Doc,
}

impl Replica {
    fn apply(&self, update: &[u8]) {
        let u = Update::decode_v1(update).expect("update");
        self.doc.transact_mut().apply_update(u).expect("apply");
    }
    fn text(&self) -> String {
        let txn = self.doc.transact();
        txn.get_text("body")
            .map(|t| t.get_string(&txn))
            .unwrap_or_default()
    }
}

/// `doc.update` with the bytes as bytes: a MessagePack `bin`, a JSON base64 string.
async fn send_update(
    c: &mut chorus_tests::Client,
    id: u64,
    doc: &str,
    update: Vec<u8>,
) -> Result<Value, chorus_protocol::ErrorBody> {
    #[derive(Serialize)]
    struct Req<'a> {
        id: u64,
        op: &'a str,
        args: DocBytes,
    }
    let req = Req {
        id,
        op: "doc.update",
        args: DocBytes {
            doc: doc.to_string(),
            update: Bin(update),
        },
    };
    c.send_bytes(c.encoding.encode(&req).expect("encode")).await;
    c.reply(id).await
}

// ---- the Chorus socket ----

async fn two_clients_converge_on_the_chorus_socket(enc: Encoding) {
    let node = TestNode::start().await;
    let mut a = node.connect("alice", enc).await;
    let mut b = node.connect("bob", other(enc)).await;
    let (ra, rb) = (Replica { doc: Doc::new() }, Replica { doc: Doc::new() });
    for (c, r) in [(&mut a, &ra), (&mut b, &rb)] {
        let opened = c.ok("doc.open", json!({"doc": "notes-1"})).await;
        assert_eq!(opened["doc"], "notes-1");
        assert_eq!(opened["read_only"], false);
        r.apply(&unb64(&opened["update"]));
    }
    // Concurrent edits from both sides, each acknowledged once durable.
    let mut seqs = Vec::new();
    for i in 0..5u64 {
        let ua = local_edit(&ra.doc, insert("a"));
        let ub = local_edit(&rb.doc, insert("b"));
        seqs.push(
            send_update(&mut a, 1000 + i, "notes-1", ua).await.unwrap()["seq"]
                .as_u64()
                .unwrap(),
        );
        seqs.push(
            send_update(&mut b, 1000 + i, "notes-1", ub).await.unwrap()["seq"]
                .as_u64()
                .unwrap(),
        );
    }
    seqs.sort_unstable();
    assert_eq!(seqs, (1..=10).collect::<Vec<_>>());
    // Each gets the other's five updates as pushes, never its own.
    for (c, r) in [(&mut a, &ra), (&mut b, &rb)] {
        for _ in 0..5 {
            let p = c.push("doc.update", Some("doc:notes-1")).await;
            assert!(!p.ephemeral);
            r.apply(&unb64(&p.data["update"]));
        }
        c.hub_barrier().await;
        assert!(
            !c.has_buffered(|p| p.push == "doc.update"),
            "own updates are not echoed"
        );
    }
    assert_eq!(ra.text(), rb.text());
    assert_eq!(ra.text().len(), 10);
    // Awareness is relayed, and goes when its connection does.
    let mut aw = Awareness::new(ra.doc.clone());
    aw.set_local_state_raw(r#"{"user":"alice"}"#);
    let update = aw.update().unwrap().encode_v1();
    a.ok(
        "doc.awareness",
        json!({"doc": "notes-1", "update": b64(&update)}),
    )
    .await;
    let p = b.push("doc.awareness", Some("doc:notes-1")).await;
    assert!(p.ephemeral);
    let got = AwarenessUpdate::decode_v1(&unb64(&p.data["update"])).unwrap();
    assert!(got.clients.values().any(|e| e.json.contains("alice")));
    a.close().await;
    let p = b.push("doc.awareness", Some("doc:notes-1")).await;
    let gone = AwarenessUpdate::decode_v1(&unb64(&p.data["update"])).unwrap();
    assert!(
        gone.clients.values().all(|e| &*e.json == "null"),
        "{gone:?}"
    );
    // doc.close; then updates are refused until it is opened again.
    b.ok("doc.close", json!({"doc": "notes-1"})).await;
    assert_eq!(b.err("doc.close", json!({"doc": "notes-1"})).await, 3013);
    let e = send_update(&mut b, 2000, "notes-1", local_edit(&rb.doc, insert("x")))
        .await
        .unwrap_err();
    assert_eq!(e.code.code(), 3013);
}

async fn offline_edits_merge_on_reconnect(enc: Encoding) {
    let node = TestNode::start().await;
    let mut a = node.connect("alice", enc).await;
    let ra = Replica { doc: Doc::new() };
    ra.apply(&unb64(
        &a.ok("doc.open", json!({"doc": "trip"})).await["update"],
    ));
    send_update(&mut a, 100, "trip", local_edit(&ra.doc, insert("one ")))
        .await
        .unwrap();
    // Bob was offline: he has the state so far, edits alone, and comes back.
    let rb = Replica { doc: Doc::new() };
    rb.apply(
        &ra.doc
            .transact()
            .encode_state_as_update_v1(&StateVector::default()),
    );
    let offline = local_edit(&rb.doc, insert("bob-offline "));
    send_update(&mut a, 101, "trip", local_edit(&ra.doc, insert("two ")))
        .await
        .unwrap();
    let mut b = node.connect("bob", other(enc)).await;
    let sv = rb.doc.transact().state_vector().encode_v1();
    let opened = b
        .ok("doc.open", json!({"doc": "trip", "state_vector": b64(&sv)}))
        .await;
    // Only what bob lacks comes back: "two ", not "one ".
    rb.apply(&unb64(&opened["update"]));
    send_update(&mut b, 100, "trip", offline).await.unwrap();
    ra.apply(&unb64(
        &a.push("doc.update", Some("doc:trip")).await.data["update"],
    ));
    assert_eq!(ra.text(), rb.text());
    assert!(
        ra.text().contains("bob-offline") && ra.text().contains("two"),
        "{}",
        ra.text()
    );
}

both_encodings!(
    two_clients_converge_on_the_chorus_socket,
    offline_edits_merge_on_reconnect
);

// ---- /doc: the y-websocket protocol ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stock_protocol_clients_converge_and_see_each_others_awareness() {
    let node = TestNode::start().await;
    let mut a = YClient::connect(&node, "pad", &node.token("alice")).await;
    let mut b = YClient::connect(&node, "pad", &node.token("bob")).await;
    a.drain().await;
    b.drain().await;
    for word in ["alpha ", "beta ", "gamma "] {
        a.edit(insert(word)).await;
    }
    b.edit(|txn| {
        txn.get_or_insert_map("meta").insert(txn, "owner", "bob");
    })
    .await;
    a.until("b's map", |c| {
        let txn = c.doc.transact();
        txn.get_map("meta")
            .and_then(|m| m.get(&txn, "owner"))
            .is_some()
    })
    .await;
    b.until("a's text", |c| c.text() == "alpha beta gamma ")
        .await;
    a.set_awareness(r#"{"user":{"name":"alice"}}"#).await;
    b.until("a's awareness", |c| {
        c.states().iter().any(|s| s.contains("alice"))
    })
    .await;
    // A third client connecting later gets everything, awareness included.
    let mut c = YClient::connect(&node, "pad", &node.token("carol")).await;
    c.until("the whole state", |c| c.text() == "alpha beta gamma ")
        .await;
    c.until("the awareness", |c| {
        c.states().iter().any(|s| s.contains("alice"))
    })
    .await;
    // Query awareness is answered too.
    c.send(Message::AwarenessQuery).await;
    c.drain().await;
    // a leaves: its awareness state is removed for the others.
    drop(a);
    b.until("a's awareness gone", |c| {
        !c.states().iter().any(|s| s.contains("alice"))
    })
    .await;
    // A Chorus-socket client of the same document sees the same text.
    let mut s = node.connect("dave", Encoding::MsgPack).await;
    let r = Replica { doc: Doc::new() };
    r.apply(&unb64(
        &s.ok("doc.open", json!({"doc": "pad"})).await["update"],
    ));
    assert_eq!(r.text(), "alpha beta gamma ");
    // And its edit reaches the y-websocket clients.
    send_update(&mut s, 77, "pad", local_edit(&r.doc, insert("delta")))
        .await
        .unwrap();
    b.until("the socket client's edit", |c| c.text().ends_with("delta"))
        .await;
    c.until("the socket client's edit", |c| c.text().ends_with("delta"))
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_keeps_the_document_and_compaction_changes_no_byte() {
    let dir = test_dir();
    let tweak = |c: &mut chorus_node::Config| {
        c.docs.compact_every_updates = 7;
    };
    let node = TestNode::start_with(dir.clone(), tweak).await;
    let mut a = YClient::connect(&node, "log", &node.token("alice")).await;
    a.drain().await;
    // Every update, as sent: replayed alone, they are the whole log.
    let mut log = Vec::new();
    for i in 0..30 {
        let update = local_edit(&a.doc, |txn| {
            let t = txn.get_or_insert_text("body");
            let len = t.len(txn);
            t.insert(txn, len, &format!("w{i} "));
            if i % 4 == 3 {
                t.remove_range(txn, 0, 2);
            }
            txn.get_or_insert_map("meta")
                .insert(txn, format!("k{}", i % 3), i as i64);
        });
        log.push(update.clone());
        a.send(Message::Sync(SyncMessage::Update(update))).await;
    }
    // Compaction runs beside the writes: the last one may finish after the
    // 30th update is durable.
    let state = eventually("30 durable updates, compacted", || async {
        let (s, v) = node.api("GET", "/api/v1/docs/log", None).await;
        let compacted = v["snapshot_seq"].as_u64().is_some_and(|n| n >= 21)
            && v["tail"].as_u64().is_some_and(|t| t < 7);
        (s == 200 && v["seq"] == 30 && compacted).then_some(v)
    })
    .await;
    let replayed = Doc::new();
    for u in &log {
        replayed
            .transact_mut()
            .apply_update(Update::decode_v1(u).unwrap())
            .unwrap();
    }
    let whole = replayed
        .transact()
        .encode_state_as_update_v1(&StateVector::default());
    assert_eq!(
        unb64(&state["update"]),
        whole,
        "snapshot + tail == the whole log, byte for byte"
    );
    assert_eq!(state["json"]["body"], a.text());
    drop(a);
    node.stop().await;
    // After a restart the document loads from its snapshot and tail.
    let node = TestNode::start_with(dir, tweak).await;
    let (s, after) = node.api("GET", "/api/v1/docs/log", None).await;
    assert_eq!(s, 200, "{after}");
    assert_eq!(unb64(&after["update"]), whole);
    let mut b = YClient::connect(&node, "log", &node.token("bob")).await;
    b.until("the state after restart", |c| {
        c.text()
            == replayed
                .transact()
                .get_text("body")
                .unwrap()
                .get_string(&replayed.transact())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forbidden_documents_and_read_only_tokens_are_refused() {
    let node = TestNode::start().await;
    let claims = |v: Value| node.token_with("eve", Duration::from_secs(600), Some(v));
    // /doc: a document outside the `docs` claim is refused at the handshake.
    let only_notes = claims(json!({"docs": ["notes-*"]}));
    assert_eq!(
        YClient::try_connect(node.addr, "secret", &only_notes)
            .await
            .err(),
        Some(403)
    );
    assert!(YClient::try_connect(node.addr, "notes-1", &only_notes)
        .await
        .is_ok());
    assert_eq!(
        YClient::try_connect(node.addr, "notes-1", "garbage")
            .await
            .err(),
        Some(401)
    );
    // Read-only: the update is dropped, the client told (y-protocols
    // permission denied), the connection stays and still gets updates.
    let mut writer = YClient::connect(&node, "notes-1", &node.token("alice")).await;
    let mut reader = YClient::connect(&node, "notes-1", &claims(json!({"doc_write": false}))).await;
    reader.drain().await;
    reader.edit(insert("not allowed")).await;
    reader
        .until("permission denied", |c| c.denied.is_some())
        .await;
    assert!(reader.denied.as_deref().unwrap().contains("read-only"));
    writer.edit(insert("allowed")).await;
    reader
        .until("the writer's update", |c| c.text().contains("allowed"))
        .await;
    assert!(!reader.text().contains("not allowed") || reader.text().starts_with("not allowed"));
    writer
        .until("the writer's own text only", |c| c.text() == "allowed")
        .await;
    writer.drain().await;
    assert_eq!(
        writer.text(),
        "allowed",
        "the read-only edit reached nobody"
    );
    // The Chorus socket: forbidden (3001), read-only (3012), in both encodings.
    for enc in [Encoding::Json, Encoding::MsgPack] {
        let mut c = node.connect_token(&only_notes, enc).await;
        assert_eq!(c.err("doc.open", json!({"doc": "secret"})).await, 3001);
        let mut ro = node
            .connect_token(&claims(json!({"doc_write": ["mine-*"]})), enc)
            .await;
        let opened = ro.ok("doc.open", json!({"doc": "notes-1"})).await;
        assert_eq!(opened["read_only"], true);
        let e = send_update(&mut ro, 50, "notes-1", local_edit(&Doc::new(), insert("x")))
            .await
            .unwrap_err();
        assert_eq!(e.code.code(), 3012);
        ro.ok("doc.open", json!({"doc": "mine-1"})).await;
        send_update(&mut ro, 51, "mine-1", local_edit(&Doc::new(), insert("x")))
            .await
            .unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_updates_and_limits_get_their_codes_and_the_node_stays_up() {
    let node = TestNode::start_with(test_dir(), |c| {
        c.docs.max_update_bytes = 2000;
        c.docs.max_doc_bytes = 5000;
        c.docs.updates_per_sec = 1;
        c.docs.updates_burst = 30;
    })
    .await;
    let mut c = node.connect("alice", Encoding::MsgPack).await;
    c.ok("doc.open", json!({"doc": "lim"})).await;
    let e = send_update(&mut c, 10, "lim", vec![0xff, 0xff, 0xff, 0xff])
        .await
        .unwrap_err();
    assert_eq!(e.code.code(), 1008);
    let big = local_edit(&Doc::new(), |txn| {
        txn.get_or_insert_text("body")
            .insert(txn, 0, &"x".repeat(3000));
    });
    assert_eq!(
        send_update(&mut c, 11, "lim", big)
            .await
            .unwrap_err()
            .code
            .code(),
        1009
    );
    let d = Doc::new();
    let mut code = 0;
    for i in 0..5 {
        let chunk = local_edit(&d, |txn| {
            let t = txn.get_or_insert_text("body");
            let len = t.len(txn);
            t.insert(txn, len, &"y".repeat(1500));
        });
        match send_update(&mut c, 20 + i, "lim", chunk).await {
            Ok(_) => {}
            Err(e) => {
                code = e.code.code();
                break;
            }
        }
    }
    assert_eq!(code, 3014, "the document's size limit");
    assert_eq!(c.err("doc.open", json!({"doc": "bad name!"})).await, 1007);
    assert_eq!(
        c.err(
            "doc.update",
            json!({"doc": "lim", "update": "*not base64*"})
        )
        .await,
        1003
    );
    // /doc: garbage closes with 4010, an oversized update with 4011.
    let mut y = YClient::connect(&node, "lim2", &node.token("bob")).await;
    y.ws.send(WsMessage::Binary(vec![0x07u8, 0xff, 0xff].into()))
        .await
        .unwrap();
    assert_eq!(y.closed_by_server().await.0, close::DOC_INVALID);
    let mut y = YClient::connect(&node, "lim2", &node.token("bob")).await;
    let huge = local_edit(&Doc::new(), |txn| {
        txn.get_or_insert_text("body")
            .insert(txn, 0, &"z".repeat(2500));
    });
    y.send(Message::Sync(SyncMessage::Update(huge))).await;
    assert_eq!(y.closed_by_server().await.0, close::DOC_UPDATE_TOO_LARGE);
    // Rate: the burst, then 4013.
    let mut y = YClient::connect(&node, "lim3", &node.token("carol")).await;
    for _ in 0..40 {
        if y.closed.is_some() {
            break;
        }
        y.edit(insert("r")).await;
    }
    assert_eq!(y.closed_by_server().await.0, close::DOC_RATE_LIMITED);
    // The node still serves.
    c.alive().await;
    let (s, v) = node.api("GET", "/api/v1/docs/nothing-here", None).await;
    assert_eq!((s, v["error"]["code"].as_u64()), (404, Some(3011)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_api_creates_reads_updates_and_deletes() {
    let node = TestNode::start().await;
    let seed = Doc::new();
    let initial = local_edit(&seed, |txn| {
        txn.get_or_insert_text("body").insert(txn, 0, "hello");
        txn.get_or_insert_map("meta")
            .insert(txn, "title", "Greeting");
    });
    let (s, v) = node
        .api(
            "POST",
            "/api/v1/docs/api-1",
            Some(json!({"update": b64(&initial)})),
        )
        .await;
    assert_eq!((s, v["seq"].as_u64()), (200, Some(1)), "{v}");
    let (s, v) = node
        .api("POST", "/api/v1/docs/api-1", Some(json!({})))
        .await;
    assert_eq!((s, v["error"]["code"].as_u64()), (409, Some(3015)));
    let mut y = YClient::connect(&node, "api-1", &node.token("alice")).await;
    y.until("the initial state", |c| c.text() == "hello").await;
    let more = local_edit(&seed, insert(" world"));
    let (s, v) = node
        .api(
            "POST",
            "/api/v1/docs/api-1/updates",
            Some(json!({"update": b64(&more)})),
        )
        .await;
    assert_eq!((s, v["seq"].as_u64()), (200, Some(2)), "{v}");
    y.until("the backend's update", |c| c.text() == "hello world")
        .await;
    let (s, v) = node.api("GET", "/api/v1/docs/api-1", None).await;
    assert_eq!(s, 200);
    assert_eq!(
        v["json"],
        json!({"body": "hello world", "meta": {"title": "Greeting"}})
    );
    assert_eq!(v["clients"], 1);
    let (s, v) = node
        .api(
            "POST",
            "/api/v1/docs/api-1/updates",
            Some(json!({"update": b64(&[0xff, 0xff, 0xff, 0xff])})),
        )
        .await;
    assert_eq!((s, v["error"]["code"].as_u64()), (400, Some(1008)), "{v}");
    let (s, _) = node.api("DELETE", "/api/v1/docs/api-1", None).await;
    assert_eq!(s, 200);
    assert_eq!(y.closed_by_server().await.0, close::DOC_RECONNECT);
    let (s, _) = node.api("GET", "/api/v1/docs/api-1", None).await;
    assert_eq!(s, 404);
    let (s, _) = node.api("DELETE", "/api/v1/docs/api-1", None).await;
    assert_eq!(s, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_on_two_nodes_of_a_cluster_converge() {
    let cluster = Sandbox::start(2).await;
    // The document lives on node 0; one client there, one on node 1.
    let key = cluster.key_owned_by(0, "doc:shared-");
    let name = key.trim_start_matches("doc:").to_string();
    let (n0, n1) = (cluster.node(0), cluster.node(1));
    let mut a = YClient::connect(n0, &name, &n0.token("alice")).await;
    let mut b = YClient::connect(n1, &name, &n1.token("bob")).await;
    let mut s = n1.connect("carol", Encoding::MsgPack).await;
    let r = Replica { doc: Doc::new() };
    r.apply(&unb64(
        &s.ok("doc.open", json!({"doc": name})).await["update"],
    ));
    a.drain().await;
    b.drain().await;
    a.edit(insert("from-0 ")).await;
    b.edit(insert("from-1 ")).await;
    send_update(&mut s, 9, &name, local_edit(&r.doc, insert("socket ")))
        .await
        .unwrap();
    for c in [&mut a, &mut b] {
        c.until("all three edits", |c| {
            let t = c.text();
            t.contains("from-0") && t.contains("from-1") && t.contains("socket")
        })
        .await;
    }
    assert_eq!(a.text(), b.text());
    for _ in 0..2 {
        r.apply(&unb64(
            &s.push("doc.update", Some(&key)).await.data["update"],
        ));
    }
    assert_eq!(r.text(), a.text());
    b.set_awareness(r#"{"user":"bob"}"#).await;
    a.until("remote awareness", |c| {
        c.states().iter().any(|s| s.contains("bob"))
    })
    .await;
}
