//! The baseline's own tests: replies, ordering, slow consumers, sizes.

use super::*;
use tokio::net::TcpSocket;

type Client = WebSocketStream<TcpStream>;

async fn start(state: Arc<State>) -> (SocketAddr, tokio::sync::oneshot::Sender<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(serve_state(
        listener,
        async move {
            let _ = stopped.await;
        },
        state,
    ));
    (addr, stop)
}

async fn client(addr: SocketAddr, recv_buffer: Option<u32>) -> Client {
    let socket = TcpSocket::new_v4().unwrap();
    if let Some(n) = recv_buffer {
        socket.set_recv_buffer_size(n).unwrap();
    }
    let stream = socket.connect(addr).await.unwrap();
    let (ws, _) = tokio_tungstenite::client_async(format!("ws://{addr}/"), stream)
        .await
        .unwrap();
    ws
}

/// Sends a request and waits for its reply, skipping pushes.
async fn request(ws: &mut Client, id: u64, op: &str, args: Value) -> Value {
    let req = json!({"id": id, "op": op, "args": args}).to_string();
    ws.send(Message::text(req)).await.unwrap();
    loop {
        let Some(Ok(Message::Text(t))) = ws.next().await else {
            panic!("connection ended before the reply to {op}");
        };
        let v: Value = serde_json::from_str(t.as_str()).unwrap();
        if v.get("id").and_then(Value::as_u64) == Some(id) {
            return v;
        }
    }
}

#[test]
fn a_push_is_encoded_once_for_all_its_subscribers() {
    let state = State::new(QUEUE);
    let subscribers: Vec<Arc<Outbox>> = (0..3).map(|_| Arc::default()).collect();
    {
        let mut rooms = state.rooms.lock();
        let room = rooms.entry("r".into()).or_default();
        for (i, o) in subscribers.iter().enumerate() {
            room.subscribers
                .insert(i as u64, (Encoding::Json, o.clone()));
        }
    }
    let send = SendMessage {
        room: "r".into(),
        text: "hello".into(),
        attachments: None,
        reply_to: None,
        client_id: None,
    };
    let reply = publish(&state, "u", send, 7);
    assert!(reply.error.is_none());
    let texts: Vec<Utf8Bytes> = subscribers
        .iter()
        .map(|o| match o.pop() {
            Ok(Some(Message::Text(t))) => t,
            _ => panic!("no push queued"),
        })
        .collect();
    assert!(texts[0].contains("hello"));
    for t in &texts[1..] {
        // The same bytes, not a copy.
        assert_eq!(t.as_str().as_ptr(), texts[0].as_str().as_ptr());
    }
}

#[test]
fn a_queue_allocates_nothing_until_used_and_gives_back_a_burst() {
    let o = Outbox::default();
    assert_eq!(o.queue.lock().frames.capacity(), 0);
    for _ in 0..100 {
        assert!(o.push(Message::text("x"), QUEUE));
    }
    while o.pop().unwrap().is_some() {}
    assert!(o.queue.lock().frames.capacity() <= QUEUE_KEEP);
    for _ in 0..3 {
        assert!(o.push(Message::text("x"), 3));
    }
    assert!(!o.push(Message::text("x"), 3), "the fourth frame overflows");
    assert_eq!(o.queue.lock().frames.capacity(), 0);
    assert_eq!(o.pop().err(), Some(Stop::Slow));
}

#[tokio::test]
async fn an_open_connection_is_a_small_task() {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let s = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
    let f = connection(State::new(QUEUE), s);
    // The socket (tokio-tungstenite's stream, ~320 bytes) and little else:
    // the handshake and the close are boxed, nothing else is awaited.
    let size = std::mem::size_of_val(&f);
    assert!(size <= 640, "the connection future is {size} bytes");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_that_does_not_read_is_closed_with_4002() {
    let state = State::new(8);
    let (addr, _stop) = start(state.clone()).await;
    let mut sub = client(addr, Some(16 * 1024)).await;
    let r = request(&mut sub, 1, "subscribe", json!({"room": "r"})).await;
    assert!(r.get("ok").is_some(), "{r}");
    let mut publisher = client(addr, None).await;
    let text = "x".repeat(64 * 1024);
    let mut sent = 0;
    // `sub` reads nothing: the socket fills, then its queue overflows.
    while !state.rooms.lock()["r"].subscribers.is_empty() {
        assert!(sent < 2000, "the subscriber was never dropped");
        sent += 1;
        let r = request(
            &mut publisher,
            sent + 1,
            "room.send",
            json!({"room": "r", "text": text}),
        )
        .await;
        assert!(r.get("ok").is_some(), "{r}");
    }
    let mut pushes = 0;
    let code = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            match sub.next().await {
                Some(Ok(Message::Text(_))) => pushes += 1,
                Some(Ok(Message::Close(Some(f)))) => return Some(u16::from(f.code)),
                Some(Ok(_)) => {}
                Some(Err(_)) | None => return None,
            }
        }
    })
    .await
    .expect("no close within 20 s");
    assert_eq!(code, Some(close::SLOW_CONSUMER));
    assert!(pushes < sent, "{pushes} pushes of {sent} arrived");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replies_and_pushes_keep_their_order() {
    let (addr, _stop) = start(State::new(QUEUE)).await;
    let mut ws = client(addr, None).await;
    request(&mut ws, 1, "subscribe", json!({"room": "r"})).await;
    // Pipelined: the push for each send precedes its reply on the wire.
    for i in 0..50u64 {
        let req = json!({"id": 10 + i, "op": "room.send", "args": {"room": "r", "text": "t"}});
        ws.feed(Message::text(req.to_string())).await.unwrap();
    }
    ws.flush().await.unwrap();
    let mut last_push = 0;
    let mut replies = 0;
    while replies < 50 {
        let Some(Ok(Message::Text(t))) = ws.next().await else {
            panic!("connection ended");
        };
        let v: Value = serde_json::from_str(t.as_str()).unwrap();
        if let Some(offset) = v.get("offset").and_then(Value::as_u64) {
            assert_eq!(offset, last_push + 1);
            last_push = offset;
        } else {
            let offset = v["ok"]["offset"].as_u64().unwrap();
            assert_eq!(offset, last_push, "the reply for {offset} before its push");
            replies += 1;
        }
    }
}

#[tokio::test]
async fn a_close_from_the_client_is_answered() {
    let (addr, _stop) = start(State::new(QUEUE)).await;
    let mut ws = client(addr, None).await;
    request(&mut ws, 1, "subscribe", json!({"room": "r"})).await;
    ws.close(None).await.unwrap();
    let end = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match ws.next().await {
                Some(Ok(Message::Close(_))) => return true,
                Some(Ok(_)) => {}
                Some(Err(_)) | None => return false,
            }
        }
    })
    .await
    .unwrap();
    assert!(
        end,
        "the server dropped the socket without answering the close"
    );
}
