//! Authentication: every rejected handshake has its own code; tokens come in
//! the `Authorization` header or `?token=`; HS256, ES256 and RS256 (public
//! key file) verify; a connection refreshes its token before `exp` or is
//! closed with 4001; the server API needs its key.
//!
//! The key pairs under `tests/fixtures/` exist for these tests only.

use std::time::{Duration, Instant};

use chorus_protocol::{now_ms, Encoding};
use chorus_tests::{
    api_call, both_encodings, other, test_dir, Client, Refused, TestNode, API_KEY, SECRET,
};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::Message;

both_encodings!(
    each_handshake_rejection_has_its_code,
    token_in_the_query_string,
    es256_and_rs256_with_a_public_key_file,
    refresh_keeps_the_connection_and_expiry_closes_it,
    refresh_to_a_shorter_token_expires_sooner,
    subprotocol_negotiation,
);

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures");

fn fixture(name: &str) -> Vec<u8> {
    std::fs::read(format!("{FIXTURES}/{name}")).expect("fixture")
}

fn b64url(bytes: &[u8]) -> String {
    const ABC: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, b)| n | (u32::from(*b) << (16 - 8 * i)));
        for i in 0..=chunk.len() {
            out.push(ABC[((n >> (18 - 6 * i)) & 63) as usize] as char);
        }
    }
    out
}

fn now_s() -> i64 {
    now_ms() / 1000
}

fn sign(alg: Algorithm, key: &EncodingKey, claims: Value) -> String {
    jsonwebtoken::encode(&Header::new(alg), &claims, key).expect("sign")
}

fn hs256(claims: Value) -> String {
    sign(
        Algorithm::HS256,
        &EncodingKey::from_secret(SECRET.as_bytes()),
        claims,
    )
}

async fn refused(node: &TestNode, token: &str, enc: Encoding) -> Refused {
    match Client::connect(&node.ws_url(), token, enc).await {
        Ok(_) => panic!("handshake with {token:?} should be refused"),
        Err(r) => r,
    }
}

/// (HTTP status, error code) of a refused handshake.
async fn rejection(node: &TestNode, token: &str, enc: Encoding) -> (u16, Option<u16>) {
    let r = refused(node, token, enc).await;
    (r.status, r.code)
}

fn request(url: &str, enc: Encoding) -> tokio_tungstenite::tungstenite::handshake::client::Request {
    let mut req = url.into_client_request().expect("request");
    req.headers_mut().insert(
        "sec-websocket-protocol",
        HeaderValue::from_static(enc.subprotocol()),
    );
    req
}

async fn each_handshake_rejection_has_its_code(enc: Encoding) {
    let node = TestNode::start().await;
    let later = now_s() + 600;

    // No token at all (and an Authorization header that is not a bearer token).
    let r = Client::connect_request(request(&node.ws_url(), enc), enc)
        .await
        .err()
        .expect("refused");
    assert_eq!((r.status, r.code), (401, Some(2001)));
    assert!(r.body.contains("token_missing"), "{}", r.body);
    let mut basic = request(&node.ws_url(), enc);
    basic.headers_mut().insert(
        "authorization",
        HeaderValue::from_static("Basic YWxpY2U6cHc="),
    );
    let r = Client::connect_request(basic, enc)
        .await
        .err()
        .expect("refused");
    assert_eq!((r.status, r.code), (401, Some(2001)));

    assert_eq!(rejection(&node, "not-a-jwt", enc).await, (401, Some(2002)));
    assert_eq!(rejection(&node, "a.b.c", enc).await, (401, Some(2002)));

    let wrong_key = chorus_node::auth::mint_token(
        "another-secret-entirely",
        "alice",
        Duration::from_secs(600),
        None,
    )
    .unwrap();
    assert_eq!(rejection(&node, &wrong_key, enc).await, (401, Some(2003)));
    // A valid token whose payload was changed after signing.
    let good = node.token("alice");
    let parts: Vec<&str> = good.split('.').collect();
    let forged = format!(
        "{}.{}.{}",
        parts[0],
        b64url(
            json!({"sub": "mallory", "exp": later})
                .to_string()
                .as_bytes()
        ),
        parts[2]
    );
    assert_eq!(rejection(&node, &forged, enc).await, (401, Some(2003)));

    let expired = hs256(json!({"sub": "alice", "exp": now_s() - 60}));
    assert_eq!(rejection(&node, &expired, enc).await, (401, Some(2004)));

    // Algorithms the node does not accept, `none` first of all.
    let payload = b64url(json!({"sub": "alice", "exp": later}).to_string().as_bytes());
    let none = format!("{}.{payload}.", b64url(br#"{"alg":"none","typ":"JWT"}"#));
    assert_eq!(rejection(&node, &none, enc).await, (401, Some(2005)));
    let none_upper = format!("{}.{payload}.", b64url(br#"{"alg":"NONE","typ":"JWT"}"#));
    assert_eq!(rejection(&node, &none_upper, enc).await, (401, Some(2005)));
    let hs512 = sign(
        Algorithm::HS512,
        &EncodingKey::from_secret(SECRET.as_bytes()),
        json!({"sub": "alice", "exp": later}),
    );
    assert_eq!(rejection(&node, &hs512, enc).await, (401, Some(2005)));
    let rsa = EncodingKey::from_rsa_pem(&fixture("rs256_private.pem")).unwrap();
    let rs256 = sign(
        Algorithm::RS256,
        &rsa,
        json!({"sub": "alice", "exp": later}),
    );
    assert_eq!(
        rejection(&node, &rs256, enc).await,
        (401, Some(2005)),
        "RS256 is not configured on this node"
    );

    // Missing or mistyped claims.
    assert_eq!(
        rejection(&node, &hs256(json!({"exp": later})), enc).await,
        (401, Some(2006))
    );
    assert_eq!(
        rejection(&node, &hs256(json!({"sub": "alice"})), enc).await,
        (401, Some(2006))
    );
    assert_eq!(
        rejection(&node, &hs256(json!({"sub": 42, "exp": later})), enc).await,
        (401, Some(2006))
    );
    assert_eq!(
        rejection(
            &node,
            &hs256(json!({"sub": "not a user id", "exp": later})),
            enc
        )
        .await,
        (401, Some(2006))
    );
    assert_eq!(
        rejection(
            &node,
            &hs256(json!({"sub": "alice", "exp": "tomorrow"})),
            enc
        )
        .await,
        (401, Some(2006))
    );

    // A subprotocol the node does not speak.
    let mut req = request(&node.ws_url(), enc);
    req.headers_mut().insert(
        "sec-websocket-protocol",
        HeaderValue::from_static("chorus.v9.xml"),
    );
    req.headers_mut().insert(
        "authorization",
        HeaderValue::from_str(&format!("Bearer {good}")).unwrap(),
    );
    let r = Client::connect_request(req, enc)
        .await
        .err()
        .expect("refused");
    assert_eq!((r.status, r.code), (400, Some(1006)));

    // After all that, the node still takes good clients, and counted the rejections.
    let mut ok = Client::connect(&node.ws_url(), &good, enc)
        .await
        .expect("good token");
    ok.alive().await;
    let m = node.metrics().await;
    assert_eq!(
        chorus_tests::metric(&m, r#"chorus_errors_total{code="token_algorithm"}"#),
        Some(4.0),
        "{m}"
    );
    assert_eq!(
        chorus_tests::metric(&m, r#"chorus_errors_total{code="token_missing_claim"}"#),
        Some(5.0)
    );
}

async fn token_in_the_query_string(enc: Encoding) {
    let node = TestNode::start().await;
    let url = format!("{}?token={}", node.ws_url(), node.token("alice"));
    let mut c = Client::connect_request(request(&url, enc), enc)
        .await
        .expect("query token accepted");
    c.alive().await;
    let q = c.ok("presence.query", json!({"users": ["alice"]})).await;
    assert_eq!(q["users"][0]["devices"], 1, "connected as the token's user");
    // The header's scheme is case-insensitive (RFC 9110), as clients vary.
    for scheme in ["bearer", "BEARER"] {
        let mut req = request(&node.ws_url(), enc);
        let value = format!("{scheme} {}", node.token("alice"));
        req.headers_mut()
            .insert("authorization", HeaderValue::from_str(&value).unwrap());
        let mut c = Client::connect_request(req, enc)
            .await
            .unwrap_or_else(|r| panic!("{scheme}: {r:?}"));
        c.alive().await;
    }
    let bad = format!(
        "{}?token={}",
        node.ws_url(),
        chorus_node::auth::mint_token("wrong-secret-xyz", "alice", Duration::from_secs(60), None)
            .unwrap()
    );
    let r = Client::connect_request(request(&bad, enc), enc)
        .await
        .err()
        .expect("refused");
    assert_eq!((r.status, r.code), (401, Some(2003)));
}

async fn es256_and_rs256_with_a_public_key_file(enc: Encoding) {
    let later = now_s() + 600;
    let claims = json!({"sub": "alice", "exp": later});

    let es = TestNode::start_with(test_dir(), |c| {
        c.auth.jwt_algorithms = vec!["ES256".into()];
        c.auth.jwt_public_key_file = Some(format!("{FIXTURES}/es256_public.pem").into());
    })
    .await;
    let key = EncodingKey::from_ec_pem(&fixture("es256_private.pem")).unwrap();
    let token = sign(Algorithm::ES256, &key, claims.clone());
    let mut c = es.connect_token(&token, enc).await;
    c.alive().await;
    let other_key = EncodingKey::from_ec_pem(&fixture("es256_other_private.pem")).unwrap();
    assert_eq!(
        rejection(
            &es,
            &sign(Algorithm::ES256, &other_key, claims.clone()),
            enc
        )
        .await,
        (401, Some(2003))
    );
    assert_eq!(
        rejection(
            &es,
            &sign(
                Algorithm::ES256,
                &key,
                json!({"sub": "alice", "exp": now_s() - 60})
            ),
            enc
        )
        .await,
        (401, Some(2004))
    );
    assert_eq!(
        rejection(&es, &hs256(claims.clone()), enc).await,
        (401, Some(2005)),
        "HS256 is not accepted here"
    );

    let rs = TestNode::start_with(test_dir(), |c| {
        c.auth.jwt_algorithms = vec!["RS256".into()];
        c.auth.jwt_public_key_file = Some(format!("{FIXTURES}/rs256_public.pem").into());
    })
    .await;
    let key = EncodingKey::from_rsa_pem(&fixture("rs256_private.pem")).unwrap();
    let token = sign(Algorithm::RS256, &key, claims.clone());
    let mut c = rs.connect_token(&token, other(enc)).await;
    c.alive().await;
    let parts: Vec<&str> = token.split('.').collect();
    let forged = format!(
        "{}.{}.{}",
        parts[0],
        b64url(json!({"sub": "root", "exp": later}).to_string().as_bytes()),
        parts[2]
    );
    assert_eq!(rejection(&rs, &forged, enc).await, (401, Some(2003)));
    assert_eq!(
        rejection(&rs, &sign(Algorithm::ES256, &other_key, claims), enc).await,
        (401, Some(2005))
    );
}

async fn refresh_keeps_the_connection_and_expiry_closes_it(enc: Encoding) {
    let node = TestNode::start().await;
    // Minted first, so it expires no later than the other one.
    let short_a = node.token_with("alice", Duration::from_secs(2), None);
    let short_b = node.token_with("bob", Duration::from_secs(2), None);
    let original_exp = now_s() + 2;
    let started = Instant::now();
    let mut alice = node.connect_token(&short_a, enc).await;
    let mut bob = node.connect_token(&short_b, other(enc)).await;

    // Refusals leave the connection as it was.
    assert_eq!(
        alice
            .err("auth.refresh", json!({"token": node.token("bob")}))
            .await,
        2007
    );
    assert_eq!(
        alice.err("auth.refresh", json!({"token": "garbage"})).await,
        2002
    );
    let expired = hs256(json!({"sub": "alice", "exp": now_s() - 10}));
    assert_eq!(
        alice.err("auth.refresh", json!({"token": expired})).await,
        2004
    );
    assert_eq!(alice.err("auth.refresh", json!({})).await, 1003);
    let r = alice
        .ok("auth.refresh", json!({"token": node.token("alice")}))
        .await;
    let new_exp = r["expires_at"].as_i64().unwrap();
    assert!(new_exp > now_ms() + 3_000_000, "{r}");

    // Bob did not refresh: closed with 4001 when his token expires.
    let (code, reason) = bob.closed_by_server().await;
    assert_eq!(code, 4001, "{reason}");
    assert!(reason.contains("expired"), "{reason}");
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "closed {:?} after connecting",
        started.elapsed()
    );
    assert!(now_s() >= original_exp - 1);

    // Alice's original token has expired by now too; her refreshed one keeps her in.
    let deadline = Instant::now() + Duration::from_secs(5);
    while now_s() <= original_exp && Instant::now() < deadline {
        alice.alive().await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    alice.alive().await;
    assert!(alice.closed.is_none());
    let m = node.metrics().await;
    assert!(
        chorus_tests::metric(&m, r#"chorus_errors_total{code="token_expired"}"#).unwrap_or(0.0)
            >= 2.0,
        "{m}"
    );
}

async fn refresh_to_a_shorter_token_expires_sooner(enc: Encoding) {
    let node = TestNode::start().await;
    let mut alice = node.connect("alice", enc).await;
    // The connection's token is good for an hour; the refreshed one for 2 s.
    let short = node.token_with("alice", Duration::from_secs(2), None);
    let started = Instant::now();
    alice.ok("auth.refresh", json!({"token": short})).await;
    let (code, reason) = alice.closed_by_server().await;
    assert_eq!(code, 4001, "{reason}");
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "closed {:?} after the refresh",
        started.elapsed()
    );
}

async fn subprotocol_negotiation(enc: Encoding) {
    let node = TestNode::start().await;
    // The first subprotocol offered that the node speaks wins, and is echoed.
    for (offer, chosen) in [
        (format!("chorus.v9.xml, {}", enc.subprotocol()), enc),
        (
            format!("{}, {}", enc.subprotocol(), other(enc).subprotocol()),
            enc,
        ),
    ] {
        let mut req = request(
            &format!("{}?token={}", node.ws_url(), node.token("alice")),
            enc,
        );
        req.headers_mut().insert(
            "sec-websocket-protocol",
            HeaderValue::from_str(&offer).unwrap(),
        );
        let (mut ws, resp) = tokio_tungstenite::connect_async(req)
            .await
            .expect("handshake");
        let echoed = resp
            .headers()
            .get("sec-websocket-protocol")
            .map(|v| v.to_str().unwrap().to_string());
        assert_eq!(
            echoed.as_deref(),
            Some(chosen.subprotocol()),
            "offered {offer}"
        );
        use futures_util::{SinkExt, StreamExt};
        let ping = chosen.encode(&json!({"id": 1, "op": "ping"})).unwrap();
        let msg = match chosen {
            Encoding::Json => Message::Text(String::from_utf8(ping).unwrap().into()),
            Encoding::MsgPack => Message::Binary(ping.into()),
        };
        ws.send(msg).await.unwrap();
        let reply = loop {
            match tokio::time::timeout(chorus_tests::WAIT, ws.next())
                .await
                .expect("reply")
                .expect("open")
                .expect("frame")
            {
                Message::Text(t) if chosen == Encoding::Json => {
                    break serde_json::from_str::<Value>(&t).unwrap()
                }
                Message::Binary(b) if chosen == Encoding::MsgPack => {
                    break rmp_serde::from_slice::<Value>(&b).unwrap()
                }
                Message::Ping(_) | Message::Pong(_) => continue,
                other => panic!("a frame of the wrong kind for {chosen:?}: {other:?}"),
            }
        };
        assert_eq!(reply["id"], 1);
        assert!(reply["ok"]["pong"].is_i64(), "{reply}");
    }
    // No subprotocol at all: JSON.
    let url = format!("{}?token={}", node.ws_url(), node.token("alice"));
    let (_, resp) = tokio_tungstenite::connect_async(url.as_str())
        .await
        .expect("handshake");
    assert!(resp
        .headers()
        .get("sec-websocket-protocol")
        .is_none_or(|v| v == "chorus.v1.json"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_api_needs_its_key() {
    let node = TestNode::start().await;
    let body = json!({"user": "alice", "type": "t", "title": "x"});
    for key in [
        None,
        Some("wrong-key-0000000"),
        Some(&API_KEY[..API_KEY.len() - 1]),
        Some(""),
    ] {
        let (status, v) = api_call(
            node.addr,
            "POST",
            "/api/v1/notifications",
            Some(body.clone()),
            key,
        )
        .await;
        assert_eq!(status, 401, "{key:?}: {v}");
        assert_eq!(v["error"]["code"], 2008, "{key:?}: {v}");
        assert_eq!(v["error"]["name"], "api_key_invalid");
        let (status, v) = api_call(
            node.addr,
            "GET",
            "/api/v1/users/alice/notifications",
            None,
            key,
        )
        .await;
        assert_eq!((status, v["error"]["code"].as_u64()), (401, Some(2008)));
        let (status, _) = api_call(
            node.addr,
            "POST",
            "/api/v1/topics/t/publish",
            Some(json!({"data": 1})),
            key,
        )
        .await;
        assert_eq!(status, 401);
    }
    // Nothing was created by the refused calls.
    let (status, v) = api_call(
        node.addr,
        "GET",
        "/api/v1/users/alice/notifications",
        None,
        Some(API_KEY),
    )
    .await;
    assert_eq!((status, v["items"].clone()), (200, json!([])));
    let (_, v) = api_call(
        node.addr,
        "GET",
        "/api/v1/rooms/none/messages",
        None,
        Some(API_KEY),
    )
    .await;
    assert_eq!(v["error"]["code"], 3002);
    let (status, _) = api_call(
        node.addr,
        "POST",
        "/api/v1/notifications",
        Some(body),
        Some(API_KEY),
    )
    .await;
    assert_eq!(status, 200);
    // Health endpoints are open.
    let (status, _) = api_call(node.addr, "GET", "/healthz", None, None).await;
    assert_eq!(status, 200);
}
