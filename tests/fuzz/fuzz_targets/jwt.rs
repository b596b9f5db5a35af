//! A bearer token, as the handshake and `auth.refresh` verify it: the raw
//! header pre-check (`alg`, refusing `none` before any key is used), then
//! signature and claims, with the HS256 development secret, an RS256 key and
//! an ES256 key (the fixtures in `node/tests/fixtures`).
//!
//! First byte even: the rest is the token as sent. Odd: the rest is
//! `<header JSON>\n<claims JSON>`, signed here with the HS256 secret, so the
//! claims parser behind the signature check is reached too.
#![no_main]

use std::path::Path;
use std::sync::OnceLock;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use chorus_actors::TokenVerifier;
use chorus_node::auth::JwtVerifier;
use chorus_node::config::{AuthSection, DEV_SECRET};
use chorus_protocol::valid_id;
use jsonwebtoken::{Algorithm, EncodingKey};
use libfuzzer_sys::fuzz_target;

fn verifiers() -> &'static [JwtVerifier] {
    static V: OnceLock<Vec<JwtVerifier>> = OnceLock::new();
    V.get_or_init(|| {
        let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../node/tests/fixtures");
        let with_key = |alg: &str, file: &str| AuthSection {
            jwt_algorithms: vec!["HS256".into(), alg.into()],
            jwt_public_key_file: Some(fixtures.join(file)),
            ..AuthSection::default()
        };
        [
            with_key("RS256", "rs256.pub.pem"),
            with_key("ES256", "es256.pub.pem"),
        ]
        .iter()
        .map(|auth| JwtVerifier::from_config(auth).expect("fixture keys load"))
        .collect()
    })
}

fuzz_target!(|data: &[u8]| {
    let [mode, rest @ ..] = data else { return };
    // Tokens arrive as text: a header value or a decoded query parameter.
    let Ok(text) = std::str::from_utf8(rest) else {
        return;
    };
    let token = if mode & 1 == 0 {
        text.to_string()
    } else {
        let (header, claims) = text.split_once('\n').unwrap_or((text, ""));
        let signed = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header),
            URL_SAFE_NO_PAD.encode(claims)
        );
        let key = EncodingKey::from_secret(DEV_SECRET.as_bytes());
        let signature = jsonwebtoken::crypto::sign(signed.as_bytes(), &key, Algorithm::HS256)
            .expect("HS256 signs any message");
        format!("{signed}.{signature}")
    };
    for verifier in verifiers() {
        if let Ok(claims) = verifier.verify(&token) {
            assert!(valid_id(&claims.user), "{:?}", claims.user);
            claims.may_use_room("team-1");
            claims.may_subscribe_topic("post:1");
            claims.may_publish_topic("post:1");
        }
    }
});
