//! Token verification (JWT) and the server API key.
//!
//! Each rejection has its own code: a malformed token, a bad signature, an
//! expired token, an algorithm the node does not accept (including `none`,
//! checked on the raw header before any key is used), a missing claim.

use std::time::Duration;

use anyhow::Context;
use base64::Engine;
use chorus_actors::{Claims, Fail, TokenVerifier};
use chorus_protocol::{valid_id, ErrorCode};
use jsonwebtoken::errors::ErrorKind as JwtErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::Deserialize;
use serde_json::Value;
use subtle::ConstantTimeEq;

use crate::config::AuthSection;

/// The claims Chorus reads. `sub` and `exp` are required.
#[derive(Debug, Deserialize)]
struct RawClaims {
    sub: Value,
    exp: Value,
    #[serde(default)]
    rooms: Option<Vec<String>>,
    #[serde(default)]
    topics: Option<Vec<String>>,
    #[serde(default)]
    publish: Option<Vec<String>>,
    #[serde(default)]
    docs: Option<Vec<String>>,
    #[serde(default)]
    doc_write: Option<DocWrite>,
}

/// `doc_write`: `true` (the default), `false` (read-only) or the documents
/// (patterns) the token may write.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum DocWrite {
    All(bool),
    Only(Vec<String>),
}

pub struct JwtVerifier {
    keys: Vec<(Algorithm, DecodingKey)>,
    leeway: u64,
}

impl JwtVerifier {
    pub fn from_config(auth: &AuthSection) -> anyhow::Result<JwtVerifier> {
        let mut keys = Vec::new();
        for alg in &auth.jwt_algorithms {
            let key = match alg.as_str() {
                "HS256" => (
                    Algorithm::HS256,
                    DecodingKey::from_secret(auth.jwt_secret.as_bytes()),
                ),
                "RS256" | "ES256" => {
                    let path = auth
                        .jwt_public_key_file
                        .as_ref()
                        .with_context(|| format!("{alg} needs auth.jwt_public_key_file"))?;
                    let pem = std::fs::read(path)
                        .with_context(|| format!("reading {}", path.display()))?;
                    if alg == "RS256" {
                        (
                            Algorithm::RS256,
                            DecodingKey::from_rsa_pem(&pem).context("RS256 public key")?,
                        )
                    } else {
                        (
                            Algorithm::ES256,
                            DecodingKey::from_ec_pem(&pem).context("ES256 public key")?,
                        )
                    }
                }
                other => anyhow::bail!("unsupported JWT algorithm {other}"),
            };
            keys.push(key);
        }
        Ok(JwtVerifier {
            keys,
            leeway: auth.leeway_secs,
        })
    }
}

fn header_alg(token: &str) -> Result<String, Fail> {
    let malformed = || Fail::new(ErrorCode::TokenMalformed, "token is not a well-formed JWT");
    let mut parts = token.split('.');
    let header = parts.next().ok_or_else(malformed)?;
    if parts.next().is_none() {
        return Err(malformed());
    }
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(header.trim_end_matches('='))
        .map_err(|_| malformed())?;
    let v: Value = serde_json::from_slice(&bytes).map_err(|_| malformed())?;
    v.get("alg")
        .and_then(Value::as_str)
        .map(str::to_string)
        .ok_or_else(malformed)
}

impl TokenVerifier for JwtVerifier {
    fn verify(&self, token: &str) -> Result<Claims, Fail> {
        let alg = header_alg(token)?;
        let Some((algorithm, key)) = self.keys.iter().find(|(a, _)| format!("{a:?}") == alg) else {
            return Err(Fail::new(
                ErrorCode::TokenAlgorithm,
                format!(
                    "algorithm `{}` is not accepted",
                    alg.chars().take(16).collect::<String>()
                ),
            ));
        };
        let mut validation = Validation::new(*algorithm);
        validation.leeway = self.leeway;
        validation.set_required_spec_claims(&["exp", "sub"]);
        validation.validate_aud = false;
        let data =
            jsonwebtoken::decode::<RawClaims>(token, key, &validation).map_err(|e| {
                match e.kind() {
                    JwtErrorKind::InvalidSignature => Fail::new(
                        ErrorCode::TokenBadSignature,
                        "token signature does not verify",
                    ),
                    JwtErrorKind::ExpiredSignature => {
                        Fail::new(ErrorCode::TokenExpired, "token expired")
                    }
                    JwtErrorKind::InvalidAlgorithm
                    | JwtErrorKind::InvalidAlgorithmName
                    | JwtErrorKind::MissingAlgorithm => {
                        Fail::new(ErrorCode::TokenAlgorithm, "token algorithm is not accepted")
                    }
                    JwtErrorKind::MissingRequiredClaim(c) => Fail::new(
                        ErrorCode::TokenMissingClaim,
                        format!("token lacks the `{c}` claim"),
                    ),
                    JwtErrorKind::InvalidClaimFormat(c) => Fail::new(
                        ErrorCode::TokenMissingClaim,
                        format!("token claim `{c}` has the wrong type"),
                    ),
                    JwtErrorKind::Json(_) => Fail::new(
                        ErrorCode::TokenMissingClaim,
                        "token claims lack `sub` or `exp`, or have wrong types",
                    ),
                    _ => Fail::new(ErrorCode::TokenMalformed, "token is not a well-formed JWT"),
                }
            })?;
        let c = data.claims;
        let user = c
            .sub
            .as_str()
            .filter(|s| valid_id(s))
            .ok_or_else(|| {
                Fail::new(
                    ErrorCode::TokenMissingClaim,
                    "`sub` must be a user id string",
                )
            })?
            .to_string();
        let exp = c
            .exp
            .as_i64()
            .ok_or_else(|| Fail::new(ErrorCode::TokenMissingClaim, "`exp` must be a number"))?;
        Ok(Claims {
            user,
            expires_at: exp.saturating_mul(1000),
            rooms: c.rooms,
            topics: c.topics,
            publish: c.publish.unwrap_or_default(),
            docs: c.docs,
            doc_write: match c.doc_write {
                None | Some(DocWrite::All(true)) => None,
                Some(DocWrite::All(false)) => Some(Vec::new()),
                Some(DocWrite::Only(p)) => Some(p),
            },
        })
    }
}

/// Mints an HS256 development token for `user` valid for `ttl`, with extra claims merged in.
pub fn mint_token(
    secret: &str,
    user: &str,
    ttl: Duration,
    extra_claims: Option<Value>,
) -> anyhow::Result<String> {
    let now = chorus_protocol::now_ms() / 1000;
    let mut claims =
        serde_json::json!({"sub": user, "iat": now, "exp": now + ttl.as_secs() as i64});
    if let Some(Value::Object(extra)) = extra_claims {
        if let Value::Object(map) = &mut claims {
            for (k, v) in extra {
                map.insert(k, v);
            }
        }
    } else if extra_claims.is_some() {
        anyhow::bail!("extra claims must be a JSON object");
    }
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .context("signing token")
}

/// Parses `90s`, `15m`, `1h`, `7d` (or plain seconds).
pub fn parse_duration(s: &str) -> anyhow::Result<Duration> {
    let s = s.trim();
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = num
        .parse()
        .with_context(|| format!("`{s}` is not a duration like 90s, 15m, 1h, 7d"))?;
    let secs = match unit {
        "" | "s" => n,
        "m" => n * 60,
        "h" => n * 3600,
        "d" => n * 86400,
        other => anyhow::bail!("unknown duration unit `{other}` (s, m, h, d)"),
    };
    Ok(Duration::from_secs(secs))
}

/// Constant-time comparison of the presented API key with the configured one.
pub fn api_key_matches(presented: &[u8], configured: &str) -> bool {
    presented.ct_eq(configured.as_bytes()).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn verifier() -> JwtVerifier {
        JwtVerifier::from_config(&AuthSection::default()).unwrap()
    }

    fn code(token: &str) -> ErrorCode {
        verifier().verify(token).unwrap_err().code
    }

    #[test]
    fn good_token_gives_claims() {
        let t = mint_token(
            crate::config::DEV_SECRET,
            "alice",
            Duration::from_secs(60),
            Some(serde_json::json!({"rooms": ["a*"], "publish": ["post:*"]})),
        )
        .unwrap();
        let c = verifier().verify(&t).unwrap();
        assert_eq!(c.user, "alice");
        assert!(c.may_use_room("abc") && !c.may_use_room("b"));
        assert!(c.may_publish_topic("post:1"));
    }

    #[test]
    fn each_rejection_has_its_code() {
        let wrong_key = mint_token("other-secret", "alice", Duration::from_secs(60), None).unwrap();
        assert_eq!(code(&wrong_key), ErrorCode::TokenBadSignature);
        let now = chorus_protocol::now_ms() / 1000;
        let expired = jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &serde_json::json!({"sub": "a", "exp": now - 120}),
            &EncodingKey::from_secret(crate::config::DEV_SECRET.as_bytes()),
        )
        .unwrap();
        assert_eq!(code(&expired), ErrorCode::TokenExpired);
        let no_sub = jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &serde_json::json!({"exp": now + 60}),
            &EncodingKey::from_secret(crate::config::DEV_SECRET.as_bytes()),
        )
        .unwrap();
        assert_eq!(code(&no_sub), ErrorCode::TokenMissingClaim);
        let b64 = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
        let none = format!(
            "{}.{}.",
            b64(r#"{"alg":"none","typ":"JWT"}"#),
            b64(&format!(r#"{{"sub":"a","exp":{}}}"#, now + 60))
        );
        assert_eq!(code(&none), ErrorCode::TokenAlgorithm);
        let hs512 = jsonwebtoken::encode(
            &Header::new(Algorithm::HS512),
            &serde_json::json!({"sub": "a", "exp": now + 60}),
            &EncodingKey::from_secret(crate::config::DEV_SECRET.as_bytes()),
        )
        .unwrap();
        assert_eq!(code(&hs512), ErrorCode::TokenAlgorithm);
        assert_eq!(code("not-a-jwt"), ErrorCode::TokenMalformed);
    }

    fn asymmetric(alg: &str, public: &str, private: &str, algorithm: Algorithm) {
        let fixtures = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
        let auth = AuthSection {
            jwt_algorithms: vec![alg.to_string()],
            jwt_public_key_file: Some(fixtures.join(public)),
            ..AuthSection::default()
        };
        let v = JwtVerifier::from_config(&auth).unwrap();
        let pem = std::fs::read(fixtures.join(private)).unwrap();
        let key = match algorithm {
            Algorithm::RS256 => EncodingKey::from_rsa_pem(&pem).unwrap(),
            _ => EncodingKey::from_ec_pem(&pem).unwrap(),
        };
        let now = chorus_protocol::now_ms() / 1000;
        let t = jsonwebtoken::encode(
            &Header::new(algorithm),
            &serde_json::json!({"sub": "dave", "exp": now + 60}),
            &key,
        )
        .unwrap();
        assert_eq!(v.verify(&t).unwrap().user, "dave");
        // An HS256 token is refused by a node that accepts only the asymmetric algorithm.
        let hs = mint_token(
            crate::config::DEV_SECRET,
            "dave",
            Duration::from_secs(60),
            None,
        )
        .unwrap();
        assert_eq!(v.verify(&hs).unwrap_err().code, ErrorCode::TokenAlgorithm);
        // A token signed by another key fails the signature check.
        let forged = format!("{}.{}", t.rsplit_once('.').unwrap().0, "AAAA");
        assert_eq!(
            v.verify(&forged).unwrap_err().code,
            ErrorCode::TokenBadSignature
        );
    }

    #[test]
    fn rs256_with_a_public_key_file() {
        asymmetric("RS256", "rs256.pub.pem", "rs256.key.pem", Algorithm::RS256);
    }

    #[test]
    fn es256_with_a_public_key_file() {
        asymmetric("ES256", "es256.pub.pem", "es256.pk8.pem", Algorithm::ES256);
    }

    #[test]
    fn the_largest_accepted_leeway_verifies_tokens() {
        let auth = AuthSection {
            leeway_secs: crate::config::MAX_LEEWAY_SECS,
            ..AuthSection::default()
        };
        let v = JwtVerifier::from_config(&auth).unwrap();
        let good = mint_token(
            crate::config::DEV_SECRET,
            "alice",
            Duration::from_secs(60),
            None,
        )
        .unwrap();
        assert_eq!(v.verify(&good).unwrap().user, "alice");
        let now = chorus_protocol::now_ms() / 1000;
        let expired = |ago: u64| {
            jsonwebtoken::encode(
                &Header::new(Algorithm::HS256),
                &serde_json::json!({"sub": "a", "exp": now as u64 - ago}),
                &EncodingKey::from_secret(crate::config::DEV_SECRET.as_bytes()),
            )
            .unwrap()
        };
        assert_eq!(v.verify(&expired(60)).unwrap().user, "a");
        let too_old = expired(crate::config::MAX_LEEWAY_SECS + 60);
        assert_eq!(
            v.verify(&too_old).unwrap_err().code,
            ErrorCode::TokenExpired
        );
    }

    #[test]
    fn durations_and_keys() {
        assert_eq!(parse_duration("1h").unwrap(), Duration::from_secs(3600));
        assert_eq!(parse_duration("90").unwrap(), Duration::from_secs(90));
        assert!(parse_duration("1y").is_err());
        assert!(api_key_matches(b"dev-api-key", "dev-api-key"));
        assert!(!api_key_matches(b"dev-api-kez", "dev-api-key"));
    }
}
