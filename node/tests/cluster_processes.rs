//! Three real `chorus` processes on the shared store (Cassandra in CI):
//! `chorus start --seed`, `chorus status`, and a node leaving on SIGTERM
//! while the other two keep serving its keys with nothing acknowledged lost.
//!
//! Needs `CHORUS_CQL=host:port` (`scripts/cassandra.sh start`); without it
//! the test says how to run it (and fails under `CHORUS_REQUIRE_CQL=1`).

mod procs;

use futures_util::StreamExt;
use procs::*;
use serde_json::json;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::Message;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_processes_join_report_status_and_survive_a_leave() {
    let Some(cql) = cql() else { return };
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &cql, &keyspace());

    let first = Node::start(&config, "proc-a", None);
    let s = status(&config, &first.addr, None);
    let seed = s["members"][0]["gossip"].as_str().unwrap().to_string();
    let second = Node::start(&config, "proc-b", Some(&seed));
    let third = Node::start(&config, "proc-c", Some(&seed));
    let mut nodes = vec![first, second, third];
    for n in &nodes {
        wait_for("every node to see three up members", || {
            up_members(&status(&config, &n.addr, None)) == ["proc-a", "proc-b", "proc-c"]
        });
    }
    // The table names every member and the owner of a key.
    let out = chorus()
        .args([
            "status",
            "--key",
            "room:town",
            "--target",
            &nodes[1].addr,
            "--config",
        ])
        .arg(&config)
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&out.stdout);
    for id in ["proc-a", "proc-b", "proc-c", "owner of room:town: proc-"] {
        assert!(table.contains(id), "{table}");
    }

    // The room's owner is the node that will leave.
    let owner = status(&config, &nodes[0].addr, Some("room:town"))["owner"]["node"]
        .as_str()
        .unwrap()
        .to_string();
    let leaving = nodes
        .iter()
        .position(|n| status(&config, &n.addr, None)["node"] == owner.as_str())
        .unwrap();
    let survivor = nodes[(leaving + 1) % 3].addr.clone();
    let (st, v) = api(
        &survivor,
        "POST",
        "/api/v1/rooms",
        Some(json!({"room": "town", "kind": "public", "created_by": "mayor"})),
    )
    .await;
    assert_eq!(st, 200, "{v}");
    let mut acked = Vec::new();
    for i in 0..20 {
        let via = &nodes[i % 3].addr;
        let body =
            json!({"sender": "mayor", "text": format!("m{i}"), "client_id": format!("c{i}")});
        let (st, v) = api(via, "POST", "/api/v1/rooms/town/messages", Some(body)).await;
        assert_eq!(st, 200, "{v}");
        acked.push((v["offset"].as_u64().unwrap(), format!("m{i}")));
    }

    // A client of the leaving node is told to reconnect elsewhere (1001).
    let mut req = format!("ws://{}/ws", nodes[leaving].addr)
        .into_client_request()
        .unwrap();
    req.headers_mut().insert(
        "authorization",
        HeaderValue::from_str(&format!("Bearer {}", token(&config, "resident"))).unwrap(),
    );
    let (mut ws, _) = tokio_tungstenite::connect_async(req).await.expect("ws");
    let gone = nodes.remove(leaving);
    let exit = tokio::task::spawn_blocking(move || gone.terminate());
    let close = tokio::time::timeout(WAIT, async {
        while let Some(Ok(m)) = ws.next().await {
            if let Message::Close(c) = m {
                return c.map(|c| u16::from(c.code));
            }
        }
        None
    })
    .await
    .expect("close frame in time");
    assert_eq!(close, Some(1001));
    assert!(exit.await.unwrap().success(), "clean exit");

    // The two others serve the room: it moved, nothing acknowledged is lost.
    for n in &nodes {
        wait_for("the leaver to be gone from the owners", || {
            !status(&config, &n.addr, None)["view"]
                .as_array()
                .unwrap()
                .iter()
                .any(|v| v == owner.as_str())
        });
    }
    let new_owner = status(&config, &nodes[0].addr, Some("room:town"))["owner"]["node"].clone();
    assert_ne!(new_owner, owner.as_str());
    for (i, n) in nodes.iter().enumerate() {
        let body = json!({"sender": "mayor", "text": format!("after{i}")});
        let (st, v) = api(&n.addr, "POST", "/api/v1/rooms/town/messages", Some(body)).await;
        assert_eq!(st, 200, "{v}");
        acked.push((v["offset"].as_u64().unwrap(), format!("after{i}")));
    }
    // A retry of an acknowledged send, at the new owner, is still a duplicate.
    let body = json!({"sender": "mayor", "text": "m3", "client_id": "c3"});
    let (_, v) = api(
        &nodes[1].addr,
        "POST",
        "/api/v1/rooms/town/messages",
        Some(body),
    )
    .await;
    assert_eq!(
        (v["offset"].as_u64(), v["duplicate"].as_bool()),
        (Some(acked[3].0), Some(true)),
        "{v}"
    );
    let (st, h) = api(
        &nodes[1].addr,
        "GET",
        "/api/v1/rooms/town/messages?limit=100",
        None,
    )
    .await;
    assert_eq!(st, 200, "{h}");
    let stored: Vec<(u64, String)> = h["entries"]
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
    assert_eq!(stored, acked, "every acknowledged message, once, in order");
}
