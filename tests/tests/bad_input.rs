//! Bad input: malformed JSON / MessagePack, unknown ops, missing fields,
//! oversized frames, too many requests, the wrong frame type, rooms one may
//! not use. Each gets its own error code; the connection stays usable where
//! the error concerns one request; other clients are unaffected; the node
//! stays up; nothing acknowledged is lost. A client that stops reading is
//! closed as a slow consumer (4002) while the others keep receiving.

use std::time::Duration;

use chorus_protocol::Encoding;
use chorus_tests::{both_encodings, eventually, metric, other, test_dir, Client, TestNode};
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;

both_encodings!(
    malformed_and_invalid_requests_get_their_codes,
    invalid_utf8_text_closes_with_1007,
    oversized_frames,
    rate_limit,
    persistent_rate_violation_closes_the_connection,
    slow_consumer_is_closed_others_keep_receiving,
);

async fn send(c: &mut Client, room: &str, text: &str) -> u64 {
    let r = c.ok("room.send", json!({"room": room, "text": text})).await;
    r["offset"].as_u64().unwrap()
}

/// Every message acknowledged, and nothing else, is in the room, in order;
/// the observer saw each of them live.
async fn assert_exactly(observer: &mut Client, room: &str, acked: &[(u64, String)]) {
    for (offset, text) in acked {
        let p = observer
            .push_where(|p| p.push == "entry" && p.offset == Some(*offset))
            .await;
        assert_eq!(p.data["text"], text.as_str());
    }
    let h = observer
        .ok("history", json!({"channel": format!("room:{room}")}))
        .await;
    let messages: Vec<(u64, String)> = h["entries"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["kind"] == "message")
        .map(|e| {
            (
                e["offset"].as_u64().unwrap(),
                e["text"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(messages, acked);
}

/// `{"id": 1, "op": "ping", "args": [[[…]]]}` nested `depth` deep, encoded by hand
/// (a serializer would recurse as deep).
fn deeply_nested(enc: Encoding, depth: usize) -> Vec<u8> {
    match enc {
        Encoding::Json => format!(
            "{{\"id\":1,\"op\":\"ping\",\"args\":{}{}}}",
            "[".repeat(depth),
            "]".repeat(depth)
        )
        .into_bytes(),
        Encoding::MsgPack => {
            let mut b = vec![
                0x83, 0xa2, b'i', b'd', 0x01, 0xa2, b'o', b'p', 0xa4, b'p', b'i', b'n', b'g',
            ];
            b.extend([0xa4, b'a', b'r', b'g', b's']);
            b.extend(std::iter::repeat_n(0x91, depth));
            b.push(0xc0);
            b
        }
    }
}

async fn node_is_up(node: &TestNode) {
    let (status, _) = node.api("GET", "/healthz", None).await;
    assert_eq!(status, 200);
}

async fn malformed_and_invalid_requests_get_their_codes(enc: Encoding) {
    let node = TestNode::start().await;
    let mut alice = node.connect("alice", enc).await;
    let mut bob = node.connect("bob", other(enc)).await;
    alice
        .ok("room.create", json!({"room": "safe", "kind": "public"}))
        .await;
    bob.ok("room.join", json!({"room": "safe"})).await;
    let mut acked = vec![(
        send(&mut alice, "safe", "before").await,
        "before".to_string(),
    )];

    // Not JSON / not MessagePack at all: answered with id 0.
    let garbage = match enc {
        Encoding::Json => b"{not json".to_vec(),
        Encoding::MsgPack => vec![0xc1, 0x00, 0xff],
    };
    alice.send_bytes(garbage).await;
    let e = alice.reply(0).await.unwrap_err();
    assert_eq!(
        (e.code.code(), e.name.as_str(), e.retryable),
        (1001, "malformed_frame", false)
    );
    alice.alive().await;
    // A document that is not a request envelope; its id is salvaged when readable.
    alice
        .send_bytes(enc.encode(&json!({"id": 77, "op": 5})).unwrap())
        .await;
    assert_eq!(alice.reply(77).await.unwrap_err().code.code(), 1001);
    alice
        .send_bytes(enc.encode(&json!([1, 2, 3])).unwrap())
        .await;
    assert_eq!(alice.reply(0).await.unwrap_err().code.code(), 1001);
    // Deeply nested arguments (30 000 levels, under 64 KiB) are refused
    // without exhausting the reader's stack.
    alice.send_bytes(deeply_nested(enc, 30_000)).await;
    assert_eq!(alice.reply(0).await.unwrap_err().code.code(), 1001);
    // Nesting that both encodings accept still works.
    let mut nested = json!("leaf");
    for _ in 0..100 {
        nested = json!([nested]);
    }
    alice.ok("ping", nested).await;
    acked.push((
        send(&mut alice, "safe", "between").await,
        "between".to_string(),
    ));

    // Unknown op, missing or mistyped arguments, values out of range.
    let e = alice.err_body("room.fly", json!({"room": "safe"})).await;
    assert_eq!((e.code.code(), e.name.as_str()), (1002, "unknown_op"));
    let e = alice.err_body("room.send", json!({"room": "safe"})).await;
    assert_eq!(e.code.code(), 1003);
    assert!(
        e.message.contains("text"),
        "names the missing field: {}",
        e.message
    );
    for (args, field) in [
        (json!({"room": 5, "text": "x"}), "room"),
        (json!({"room": "safe", "text": 5}), "text"),
    ] {
        let e = alice.err_body("room.send", args).await;
        assert_eq!(e.code.code(), 1003);
        assert!(
            e.message
                .starts_with(&format!("room.send: {field}: invalid type")),
            "names the mistyped field: {}",
            e.message
        );
    }
    assert_eq!(alice.err("room.send", json!([1, 2])).await, 1003);
    assert_eq!(alice.err("history", json!({})).await, 1003);
    assert_eq!(
        alice
            .err("history", json!({"channel": "room:safe", "limit": "ten"}))
            .await,
        1003
    );
    assert_eq!(
        alice
            .err("room.join", json!({"room": "no spaces allowed"}))
            .await,
        1007
    );
    assert_eq!(
        alice
            .err("room.create", json!({"room": "r", "kind": "secret"}))
            .await,
        1003
    );

    // The wrong frame type for the connection's encoding.
    let ping = json!({"id": 500, "op": "ping"});
    let wrong = match enc {
        Encoding::Json => Message::Binary(Encoding::MsgPack.encode(&ping).unwrap().into()),
        Encoding::MsgPack => Message::Text(
            String::from_utf8(Encoding::Json.encode(&ping).unwrap())
                .unwrap()
                .into(),
        ),
    };
    alice.send_message(wrong).await;
    let e = alice.reply(0).await.unwrap_err();
    assert_eq!((e.code.code(), e.name.as_str()), (1006, "wrong_encoding"));

    // Rooms one may not use.
    alice
        .ok("room.create", json!({"room": "private", "kind": "group"}))
        .await;
    assert_eq!(
        bob.err("history", json!({"channel": "room:private"})).await,
        3003
    );
    assert_eq!(
        bob.err("room.send", json!({"room": "private", "text": "x"}))
            .await,
        3003
    );
    assert_eq!(
        bob.err("subscribe", json!({"channel": "room:private"}))
            .await,
        3003
    );

    // The connection is still usable and nothing acknowledged was lost.
    alice.alive().await;
    acked.push((send(&mut alice, "safe", "after").await, "after".to_string()));
    bob.alive().await;
    assert_exactly(&mut bob, "safe", &acked).await;
    node_is_up(&node).await;
    let m = node.metrics().await;
    assert_eq!(
        metric(&m, r#"chorus_errors_total{code="malformed_frame"}"#),
        Some(4.0),
        "{m}"
    );
    assert_eq!(
        metric(&m, r#"chorus_errors_total{code="wrong_encoding"}"#),
        Some(1.0)
    );
}

async fn oversized_frames(enc: Encoding) {
    let node = TestNode::start_with(test_dir(), |c| {
        c.limits.max_frame_bytes = 1024;
        c.limits.hard_max_frame_bytes = 8192;
    })
    .await;
    let mut alice = node.connect("alice", enc).await;
    let mut bob = node.connect("bob", other(enc)).await;
    alice
        .ok("room.create", json!({"room": "big", "kind": "public"}))
        .await;
    bob.ok("room.join", json!({"room": "big"})).await;
    let mut acked = Vec::new();

    for size in [1500, 5000] {
        alice
            .send(
                "room.send",
                json!({"room": "big", "text": "x".repeat(size)}),
            )
            .await;
        let e = alice.reply(0).await.unwrap_err();
        assert_eq!((e.code.code(), e.name.as_str()), (1004, "frame_too_large"));
        assert!(e.message.contains("1024"), "{}", e.message);
        alice.alive().await;
    }
    // Just under the limit is fine.
    let text = "y".repeat(900);
    acked.push((send(&mut alice, "big", &text).await, text));

    // Above the hard limit the frame is not even read: the socket is closed (1009).
    let _ = alice
        .send(
            "room.send",
            json!({"room": "big", "text": "z".repeat(10_000)}),
        )
        .await;
    let (code, _) = alice.closed_by_server().await;
    assert_eq!(code, 1009);

    bob.alive().await;
    assert_exactly(&mut bob, "big", &acked).await;
    let mut again = node.connect("alice", enc).await;
    again.alive().await;
    node_is_up(&node).await;
}

async fn rate_limit(enc: Encoding) {
    let node = TestNode::start_with(test_dir(), |c| {
        c.limits.rate_per_sec = 1;
        c.limits.rate_burst = 6;
    })
    .await;
    let mut bob = node.connect("bob", other(enc)).await;
    bob.ok("room.create", json!({"room": "rl", "kind": "public"}))
        .await;
    bob.ok("room.join", json!({"room": "rl"})).await;
    let mut alice = node.connect("alice", enc).await;

    // A burst of 6 passes; what follows at once is refused, and has no effect.
    let mut ids = Vec::new();
    ids.push(alice.send("room.join", json!({"room": "rl"})).await);
    ids.push(
        alice
            .send("room.send", json!({"room": "rl", "text": "allowed"}))
            .await,
    );
    for _ in 0..4 {
        ids.push(alice.send("ping", json!({})).await);
    }
    let refused_send = alice
        .send("room.send", json!({"room": "rl", "text": "refused"}))
        .await;
    let refused_ping = alice.send("ping", json!({})).await;
    let mut acked = Vec::new();
    for id in ids {
        let r = alice.reply(id).await.expect("within the burst");
        if let Some(o) = r.get("offset").filter(|_| r.get("duplicate").is_some()) {
            acked.push((o.as_u64().unwrap(), "allowed".to_string()));
        }
    }
    for id in [refused_send, refused_ping] {
        let e = alice.reply(id).await.unwrap_err();
        assert_eq!(
            (e.code.code(), e.name.as_str(), e.retryable),
            (1005, "rate_limited", true)
        );
    }

    // Others have their own budget.
    for _ in 0..3 {
        bob.alive().await;
    }
    // The connection recovers as the bucket refills (1 per second).
    let recovered = tokio::time::Instant::now();
    loop {
        match alice.request("ping", json!({})).await {
            Ok(_) => break,
            Err(e) => assert_eq!(e.code.code(), 1005),
        }
        assert!(
            recovered.elapsed() < Duration::from_secs(5),
            "no token after 5 s"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_exactly(&mut bob, "rl", &acked).await;
    assert!(alice.closed.is_none());
    node_is_up(&node).await;
}

async fn persistent_rate_violation_closes_the_connection(enc: Encoding) {
    let node = TestNode::start_with(test_dir(), |c| {
        c.limits.rate_per_sec = 1;
        c.limits.rate_burst = 2;
    })
    .await;
    let mut bob = node.connect("bob", other(enc)).await;
    let mut alice = node.connect("alice", enc).await;
    // 2 allowed, then more than max(burst, 10) refusals in a row.
    for _ in 0..13 {
        alice.send("ping", json!({})).await;
    }
    let (code, reason) = alice.closed_by_server().await;
    assert_eq!(code, 4003, "{reason}");
    bob.alive().await;
    let mut alice = node.connect("alice", enc).await;
    alice.alive().await;
    node_is_up(&node).await;
}

/// Whether `v` is `first, first+1, …` with no gap or repeat.
fn contiguous(v: &[u64]) -> bool {
    v.windows(2).all(|w| w[1] == w[0] + 1)
}

async fn slow_consumer_is_closed_others_keep_receiving(enc: Encoding) {
    const TEXT: usize = 12_000;
    let node = TestNode::start_with(test_dir(), |c| c.limits.outbound_queue = 64).await;
    let mut fast = node.connect("fast", other(enc)).await;
    fast.ok("room.create", json!({"room": "firehose", "kind": "public"}))
        .await;
    fast.ok("room.join", json!({"room": "firehose"})).await;
    let mut slow =
        Client::connect_small_buffer(&node.ws_url(), &node.token("slow"), enc, 4096).await;
    slow.ok("room.join", json!({"room": "firehose"})).await;

    // The fast client reads everything, in its own task, up to the END marker.
    let reader = tokio::spawn(async move {
        let mut seen: Vec<u64> = Vec::new();
        loop {
            let p = fast.push("entry", Some("room:firehose")).await;
            if p.data["kind"] != "message" {
                continue;
            }
            seen.push(p.offset.unwrap());
            if p.data["text"] == "END" {
                return (fast, seen);
            }
        }
    });

    // Publish large messages until the slow client, who reads nothing, is cut off.
    let text = "s".repeat(TEXT);
    let mut acked = Vec::new();
    loop {
        let batch = (0..16).map(|_| {
            node.api(
                "POST",
                "/api/v1/rooms/firehose/messages",
                Some(json!({"sender": "bot", "text": text})),
            )
        });
        for (status, v) in futures_util::future::join_all(batch).await {
            assert_eq!(status, 200, "{v}");
            acked.push(v["offset"].as_u64().unwrap());
        }
        let m = node.metrics().await;
        if metric(&m, "chorus_slow_consumer_disconnects_total").unwrap_or(0.0) >= 1.0 {
            break;
        }
        assert!(
            acked.len() < 5_000,
            "the slow consumer was never disconnected"
        );
    }
    let (_, end) = node
        .api(
            "POST",
            "/api/v1/rooms/firehose/messages",
            Some(json!({"sender": "bot", "text": "END"})),
        )
        .await;
    acked.push(end["offset"].as_u64().unwrap());
    acked.sort_unstable();
    assert!(contiguous(&acked));

    // The fast client got every message, once, in order.
    let (mut fast, seen) = reader.await.expect("reader");
    assert!(
        seen == acked,
        "fast client saw {} messages ({}..={}), {} were acknowledged",
        seen.len(),
        seen[0],
        seen[seen.len() - 1],
        acked.len()
    );
    fast.alive().await;

    // The slow one, reading at last, finds what was queued and then the close:
    // a prefix of the room without a gap, never a silently skipped message.
    let (code, reason) = slow.closed_by_server().await;
    assert_eq!(code, 4002, "{reason}");
    let got: Vec<u64> = slow
        .buffered()
        .into_iter()
        .filter(|p| p.push == "entry" && p.data["kind"] == "message")
        .map(|p| p.offset.unwrap())
        .collect();
    assert!(
        got.len() < acked.len(),
        "the slow client cannot have received everything"
    );
    assert!(
        got.first().is_none_or(|o| *o == acked[0]) && contiguous(&got),
        "slow client's entries have a gap"
    );
    let m = eventually("the slow connection to be released", || {
        let node = &node;
        async move {
            let m = node.metrics().await;
            (metric(&m, "chorus_connections") == Some(1.0)).then_some(m)
        }
    })
    .await;
    assert_eq!(
        metric(&m, "chorus_slow_consumer_disconnects_total"),
        Some(1.0),
        "only the slow client"
    );

    // Everything acknowledged is stored.
    let mut stored: Vec<u64> = Vec::new();
    let mut after = acked[0] - 1;
    loop {
        let h = fast
            .ok(
                "history",
                json!({"channel": "room:firehose", "after": after, "limit": 200}),
            )
            .await;
        let page: Vec<u64> = h["entries"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["offset"].as_u64().unwrap())
            .collect();
        stored.extend(&page);
        match page.last() {
            Some(last) if h["more"] == true => after = *last,
            _ => break,
        }
    }
    assert!(
        stored == acked,
        "stored {} entries, {} acknowledged",
        stored.len(),
        acked.len()
    );
}

/// The server API answers bad bodies and query strings with the same
/// documented error bodies, and checks the key before looking at the body.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_api_bad_input_gets_codes() {
    let node = TestNode::start().await;
    let http = reqwest::Client::new();
    let url = |path: &str| format!("http://{}{path}", node.addr);
    let post = |body: String, key: Option<&'static str>| {
        let mut req = http
            .post(url("/api/v1/notifications"))
            .header("content-type", "application/json")
            .body(body);
        if let Some(k) = key {
            req = req.header("x-api-key", k);
        }
        async move {
            let resp = req.send().await.expect("api");
            let status = resp.status().as_u16();
            let v: serde_json::Value = resp.json().await.expect("an error body in JSON");
            (status, v["error"]["code"].as_u64(), v)
        }
    };
    let key = Some(chorus_tests::API_KEY);
    let (status, code, v) = post("not json".into(), key).await;
    assert_eq!((status, code), (400, Some(1001)), "{v}");
    let (status, code, v) = post(r#"{"user": "a"}"#.into(), key).await;
    assert_eq!((status, code), (400, Some(1003)), "{v}");
    assert!(
        v["error"]["message"].as_str().unwrap().contains("type"),
        "names the field: {v}"
    );
    let (status, code, _) = post(
        r#"{"user": "a", "type": "t", "title": "x", "priority": "meh"}"#.into(),
        key,
    )
    .await;
    assert_eq!((status, code), (400, Some(1003)));
    let big = format!(
        r#"{{"user": "a", "type": "t", "title": "x", "body": "{}"}}"#,
        "x".repeat(1_100_000)
    );
    let (status, code, _) = post(big, key).await;
    assert_eq!((status, code), (413, Some(1004)));
    // Without the key, the body is not even looked at.
    let (status, code, _) = post("not json".into(), None).await;
    assert_eq!((status, code), (401, Some(2008)));
    let (status, code, _) = post(r#"{"user": "a"}"#.into(), Some("wrong-key-123456")).await;
    assert_eq!((status, code), (401, Some(2008)));

    let resp = http
        .get(url("/api/v1/rooms/r/messages?limit=ten"))
        .header("x-api-key", chorus_tests::API_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 400);
    let v: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(v["error"]["code"], 1003);
    let resp = http
        .post(url("/api/v1/notifications"))
        .header("x-api-key", chorus_tests::API_KEY)
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 400, "no content type");
    let v: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(v["error"]["code"], 1001);
    node_is_up(&node).await;
}

/// A text frame that is not UTF-8 cannot be read as JSON or anything else:
/// RFC 6455 closes it with 1007, and only that socket.
async fn invalid_utf8_text_closes_with_1007(enc: Encoding) {
    use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};
    use tokio_tungstenite::tungstenite::protocol::frame::Frame;

    let node = TestNode::start().await;
    let mut alice = node.connect("alice", enc).await;
    let mut bob = node.connect("bob", other(enc)).await;
    let bytes = b"{\"id\":1,\"op\":\"ping\",\"args\":\"\xff\xfe\"}".to_vec();
    alice
        .send_message(Message::Frame(Frame::message(
            bytes,
            OpCode::Data(Data::Text),
            true,
        )))
        .await;
    let (code, reason) = alice.closed_by_server().await;
    assert_eq!(code, 1007, "{reason}");
    bob.alive().await;
    node_is_up(&node).await;
    let m = node.metrics().await;
    assert_eq!(
        metric(&m, "chorus_errors_total{code=\"malformed_frame\"}"),
        Some(1.0),
        "{m}"
    );
}
