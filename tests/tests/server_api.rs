//! The server API against its contract: the OpenAPI document lists exactly
//! the routes the node serves, and what schemathesis (scripts/schemathesis.sh)
//! found the server accepting against that document stays refused.

use chorus_protocol::ops::{HistoryPage, NotifPage, Published};
use chorus_protocol::*;
use chorus_tests::{TestNode, API_KEY};
use serde_json::{json, Value};

async fn request(
    node: &TestNode,
    method: reqwest::Method,
    path: &str,
    body: Option<String>,
    key: Option<&str>,
) -> (u16, Value) {
    let mut req = reqwest::Client::new().request(method, format!("http://{}{path}", node.addr));
    if let Some(k) = key {
        req = req.header("x-api-key", k);
    }
    if let Some(b) = body {
        req = req.header("content-type", "application/json").body(b);
    }
    let resp = tokio::time::timeout(chorus_tests::WAIT, req.send())
        .await
        .expect("api timeout")
        .expect("api call");
    let status = resp.status().as_u16();
    let text = resp.text().await.unwrap_or_default();
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

fn code(v: &Value) -> Option<u64> {
    v["error"]["code"].as_u64()
}

/// `/rooms/{room}` with every parameter filled in.
fn concrete(path: &str) -> String {
    path.replace("{room}", "r1")
        .replace("{user}", "u1")
        .replace("{topic}", "t1")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openapi_document_lists_exactly_the_served_routes() {
    let node = TestNode::start().await;
    // The document needs no key.
    let (status, doc) = request(
        &node,
        reqwest::Method::GET,
        "/api/v1/openapi.json",
        None,
        None,
    )
    .await;
    assert_eq!(status, 200, "{doc}");
    assert_eq!(doc["openapi"], "3.1.0");
    assert_eq!(
        doc["components"]["securitySchemes"]["api_key"],
        json!({"type": "apiKey", "in": "header", "name": "x-api-key",
               "description": "The node's `auth.api_key`"})
    );

    let mut documented = Vec::new();
    for (path, item) in doc["paths"].as_object().expect("paths") {
        for (method, op) in item.as_object().expect("path item") {
            documented.push((method.to_uppercase(), path.clone()));
            assert!(op["responses"]["200"].is_object(), "{method} {path}: 200");
        }
    }
    documented.sort();
    let mut served: Vec<(String, String)> = chorus_node::api::ROUTES
        .iter()
        .map(|(m, p)| (m.to_uppercase(), format!("/api/v1{p}")))
        .collect();
    // Registered beside the scope, by `chorus_node::api_cluster::routes`.
    served.push(("GET".into(), "/api/v1/cluster".into()));
    served.sort();
    assert_eq!(documented, served, "the document lists exactly api::ROUTES");

    // Every documented operation is served, and checks the key first.
    for (method, path) in &documented {
        let m: reqwest::Method = method.parse().unwrap();
        let (status, v) = request(&node, m, &concrete(path), None, None).await;
        if path == "/api/v1/openapi.json" {
            assert_eq!(status, 200);
            continue;
        }
        assert_eq!(
            (status, code(&v)),
            (401, Some(2008)),
            "{method} {path}: {v}"
        );
        let op = &doc["paths"][path][method.to_lowercase()];
        for status in ["400", "401", "404", "500", "503"] {
            assert!(
                op["responses"][status]["$ref"].is_string(),
                "{method} {path} documents {status}"
            );
        }
    }
    // No method the document leaves out is served on its paths.
    for path in doc["paths"].as_object().unwrap().keys() {
        for method in ["GET", "POST", "PUT", "PATCH", "DELETE"] {
            if documented.contains(&(method.to_string(), path.clone())) {
                continue;
            }
            let (status, _) = request(
                &node,
                method.parse().unwrap(),
                &concrete(path),
                None,
                Some(API_KEY),
            )
            .await;
            assert!(
                status == 404 || status == 405,
                "{method} {path} is not documented but answered {status}"
            );
        }
    }
    // Each error status lists the codes that map to it, as api::status_for does.
    let responses = &doc["components"]["responses"];
    for code in chorus_node::api::openapi::API_ERRORS {
        let status = chorus_node::api::status_for(*code).as_u16();
        let schema = &responses[format!("Error{status}")]["content"]["application/json"]["schema"];
        let codes = &schema["properties"]["error"]["properties"]["code"]["enum"];
        assert!(
            codes.as_array().unwrap().contains(&json!(code.code())),
            "{code:?} under {status}"
        );
    }
}

/// Found by schemathesis: serde's derive reads a struct from a JSON array
/// too (`[null, "k"]` as `{"data": null, "client_id": "k"}`), so every body
/// route accepted arrays the document does not allow.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_must_be_objects() {
    let node = TestNode::start().await;
    let (status, _) = node
        .api(
            "POST",
            "/api/v1/rooms",
            Some(json!({"room": "team", "kind": "public", "created_by": "ann"})),
        )
        .await;
    assert_eq!(status, 200);
    for (path, array) in [
        ("/api/v1/rooms", r#"["team2", "public", null, "ann", []]"#),
        ("/api/v1/rooms/team/members", r#"["bob"]"#),
        ("/api/v1/rooms/team/messages", r#"["ann", "hi"]"#),
        ("/api/v1/notifications", r#"["ann", [], "t", "title"]"#),
        ("/api/v1/topics/t1/publish", r#"[null, null]"#),
        ("/api/v1/feeds", r#"[["ann"], 1]"#),
    ] {
        let (status, v) = request(
            &node,
            reqwest::Method::POST,
            path,
            Some(array.into()),
            Some(API_KEY),
        )
        .await;
        assert_eq!((status, code(&v)), (400, Some(1003)), "{path}: {v}");
    }
    let (_, history) = node.api("GET", "/api/v1/rooms/team/messages", None).await;
    let kinds: Vec<&str> = history["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["kind"].as_str().unwrap())
        .collect();
    // A public room records no joins: empty, as nothing was posted.
    assert_eq!(kinds, Vec::<&str>::new(), "nothing was posted: {history}");
}

/// Found by schemathesis (and fixed in the room, for every path, at the same
/// time on main): the WebSocket refused a `client_id` outside 1..=128 bytes,
/// the server API stored any (an empty one, or megabytes).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_ids_are_bounded_on_the_server_api() {
    let node = TestNode::start().await;
    node.api(
        "POST",
        "/api/v1/rooms",
        Some(json!({"room": "team", "kind": "public", "created_by": "ann"})),
    )
    .await;
    for bad in [String::new(), "x".repeat(129)] {
        let (status, v) = node
            .api(
                "POST",
                "/api/v1/rooms/team/messages",
                Some(json!({"text": "hi", "client_id": bad})),
            )
            .await;
        assert_eq!((status, code(&v)), (400, Some(1007)), "{v}");
        let (status, v) = node
            .api(
                "POST",
                "/api/v1/topics/t1/publish",
                Some(json!({"data": 1, "client_id": bad})),
            )
            .await;
        assert_eq!((status, code(&v)), (400, Some(1007)), "{v}");
    }
    let longest = "x".repeat(128);
    let (status, v) = node
        .api(
            "POST",
            "/api/v1/rooms/team/messages",
            Some(json!({"text": "hi", "client_id": longest})),
        )
        .await;
    assert_eq!(
        (status, v["duplicate"].as_bool()),
        (200, Some(false)),
        "{v}"
    );
    let (status, v) = node
        .api(
            "POST",
            "/api/v1/topics/t1/publish",
            Some(json!({"data": 1, "client_id": longest})),
        )
        .await;
    assert_eq!(
        (status, v["duplicate"].as_bool()),
        (200, Some(false)),
        "{v}"
    );
}

/// Found by schemathesis: `users` naming one user 9,999 times stored 9,999
/// notifications for them, one after the other (the request outlived the
/// client's 10 s timeout). A user named twice is notified, or fed, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recipient_named_twice_is_notified_once() {
    let node = TestNode::start().await;
    let (status, v) = node
        .api(
            "POST",
            "/api/v1/notifications",
            Some(json!({"user": "ann", "users": ["ann", "bob", "ann"], "type": "t", "title": "x"})),
        )
        .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["ids"].as_array().unwrap().len(), 2, "ann, bob: {v}");
    for user in ["ann", "bob"] {
        let (status, page) = node
            .api("GET", &format!("/api/v1/users/{user}/notifications"), None)
            .await;
        assert_eq!(status, 200);
        assert_eq!(page["items"].as_array().unwrap().len(), 1, "{user}: {page}");
        assert_eq!(page["unread"], 1);
    }

    let (status, v) = node
        .api(
            "POST",
            "/api/v1/feeds",
            Some(json!({"users": ["ann", "ann", "bob", "ann"], "data": {"n": 1}})),
        )
        .await;
    assert_eq!(status, 200, "{v}");
    let channels: Vec<&str> = v["published"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["channel"].as_str().unwrap())
        .collect();
    assert_eq!(channels, ["feed:ann", "feed:bob"]);
}

/// The member a removal names is an id like any other: a malformed one is
/// `invalid_value`, not "not a member".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removing_a_malformed_user_id_is_invalid_value() {
    let node = TestNode::start().await;
    node.api(
        "POST",
        "/api/v1/rooms",
        Some(json!({"room": "team", "kind": "group", "created_by": "ann"})),
    )
    .await;
    let (status, v) = node
        .api("DELETE", "/api/v1/rooms/team/members/a%20b", None)
        .await;
    assert_eq!((status, code(&v)), (400, Some(1007)), "{v}");
}

// ---- the mirrored response schemas (node/src/openapi.rs) ----

/// Every optional field set, so the value shows all the keys its type has.
fn samples() -> Vec<(&'static str, Value)> {
    let room = RoomInfo {
        id: "team".into(),
        kind: RoomKind::Group,
        name: Some("Team".into()),
        created_by: "ann".into(),
        created_at: 1,
        membership_entries: Some(true),
    };
    let member = Member {
        user: "ann".into(),
        role: Role::Owner,
        joined_at: 1,
    };
    let head = ChannelHead {
        epoch: "e".into(),
        offset: 2,
        msg_seq: 1,
    };
    let mut entry = Entry::new(2, EntryKind::Message, 1, 1);
    entry.sender = Some("ann".into());
    entry.client_id = Some("c".into());
    entry.text = Some("hi".into());
    entry.attachments = Some(json!({}));
    entry.reply_to = Some(1);
    entry.target = Some(1);
    entry.data = Some(json!(1));
    entry.edited_at = Some(1);
    entry.deleted = true;
    let notification = Notification {
        id: 1,
        user: "ann".into(),
        kind: "like".into(),
        title: "t".into(),
        body: Some("b".into()),
        data: Some(json!(1)),
        priority: Priority::High,
        category: Some("c".into()),
        room: Some("team".into()),
        created_at: 1,
        expires_at: Some(2),
        read: false,
    };
    let published = Published {
        channel: "room:team".into(),
        epoch: "e".into(),
        offset: 2,
        duplicate: false,
    };
    let presence = Presence {
        user: "ann".into(),
        status: Status::Online,
        last_seen: Some(1),
        activity: Some("typing".into()),
        devices: 1,
    };
    vec![
        ("RoomInfo", v(&room)),
        ("Member", v(&member)),
        ("ChannelHead", v(&head)),
        ("Entry", v(&entry)),
        ("Notification", v(&notification)),
        ("Published", v(&published)),
        ("Presence", v(&presence)),
        (
            "HistoryPage",
            v(&HistoryPage {
                channel: "room:team".into(),
                head,
                entries: vec![],
                more: false,
            }),
        ),
        (
            "NotifPage",
            v(&NotifPage {
                items: vec![],
                unread: 0,
                more: false,
            }),
        ),
    ]
}

fn v<T: serde::Serialize>(x: &T) -> Value {
    serde_json::to_value(x).expect("serializes")
}

/// `value` has exactly the fields the schema `name` lists, and every one
/// it requires.
fn has_the_fields_of(doc: &Value, name: &str, value: &Value) {
    let schema = &doc["components"]["schemas"][name];
    let mut props: Vec<&String> = schema["properties"]
        .as_object()
        .unwrap_or_else(|| panic!("{name} is documented"))
        .keys()
        .collect();
    let mut keys: Vec<&String> = value.as_object().expect("an object").keys().collect();
    props.sort();
    keys.sort();
    assert_eq!(props, keys, "{name}");
    for required in schema["required"].as_array().unwrap() {
        assert!(
            value.get(required.as_str().unwrap()).is_some(),
            "{name}.{required}"
        );
    }
}

/// The mirrored response schemas have exactly the fields the real types
/// serialize (every optional one set), and require those always there.
#[test]
fn response_schemas_mirror_the_protocol_types() {
    let doc = serde_json::to_value(chorus_node::api::openapi::document()).unwrap();
    for (name, value) in samples() {
        has_the_fields_of(&doc, name, &value);
    }
}

/// `GET /api/v1/cluster` (a cluster of one) answers what its schemas list.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_status_mirrors_its_schema() {
    let node = TestNode::start().await;
    let doc = serde_json::to_value(chorus_node::api::openapi::document()).unwrap();
    let (status, v) = node
        .api("GET", "/api/v1/cluster?key=room:lobby", None)
        .await;
    assert_eq!(status, 200, "{v}");
    has_the_fields_of(&doc, "ClusterStatus", &v);
    has_the_fields_of(&doc, "ClusterMember", &v["members"][0]);
    has_the_fields_of(&doc, "Load", &v["local"]);
    has_the_fields_of(&doc, "KeyOwner", &v["owner"]);
}

#[test]
fn the_id_pattern_is_valid_id() {
    let doc = serde_json::to_value(chorus_node::api::openapi::document()).unwrap();
    let pattern = doc["components"]["schemas"]["Id"]["pattern"]
        .as_str()
        .unwrap();
    assert_eq!(pattern, "^[A-Za-z0-9_.:@-]{1,128}$");
    for ok in ["a", "team-1", "a.b:c@d_e", &"x".repeat(128)] {
        assert!(valid_id(ok), "{ok}");
    }
    for bad in ["", "a b", "é", "a/b", &"x".repeat(129)] {
        assert!(!valid_id(bad), "{bad}");
    }
}
