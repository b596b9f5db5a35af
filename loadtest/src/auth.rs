//! Who each connection is: tokens minted from the node's key, or given.

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{EncodingKey, Header};
use serde::{Deserialize, Serialize};

/// A user id and the token that authenticates it.
#[derive(Clone, Debug)]
pub struct Identity {
    pub user: String,
    pub token: String,
}

#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("minting a token: {0}")]
    Mint(#[from] jsonwebtoken::errors::Error),
    #[error("reading tokens file {0}: {1}")]
    Read(String, std::io::Error),
    #[error("token {0} of the tokens file has no readable `sub` claim: {1}")]
    NoSubject(usize, String),
    #[error("the scenario needs {needed} distinct users but the tokens file has {have} tokens")]
    TooFew { needed: u64, have: usize },
    #[error("the tokens file is empty")]
    Empty,
}

#[derive(Serialize, Deserialize)]
struct Claims {
    sub: String,
    iat: u64,
    exp: u64,
}

/// All a given token must tell the harness: whose it is.
#[derive(Deserialize)]
struct Subject {
    sub: String,
}

/// Mints an HS256 token for `user`, valid for `ttl`.
pub fn mint(secret: &str, user: &str, ttl: Duration) -> Result<String, TokenError> {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let claims = Claims {
        sub: user.to_string(),
        iat: now,
        exp: now + ttl.as_secs().max(60),
    };
    Ok(jsonwebtoken::encode(
        &Header::default(),
        &claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )?)
}

/// Where identities come from.
pub enum Tokens {
    /// Any user name, signed with the node's key.
    Minted { secret: String, ttl: Duration },
    /// Fixed tokens; identity `i` is token `i`, its user the token's `sub`.
    Given(Vec<Identity>),
}

impl Tokens {
    pub fn from_file(path: &Path) -> Result<Tokens, TokenError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| TokenError::Read(path.display().to_string(), e))?;
        let mut out = Vec::new();
        for (i, line) in text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .enumerate()
        {
            let claims: Subject = jsonwebtoken::dangerous::insecure_decode_claims(line)
                .map_err(|e| TokenError::NoSubject(i + 1, e.to_string()))?;
            out.push(Identity {
                user: claims.sub,
                token: line.to_string(),
            });
        }
        if out.is_empty() {
            return Err(TokenError::Empty);
        }
        Ok(Tokens::Given(out))
    }

    /// Checks that `needed` distinct identities can be had.
    pub fn check_distinct(&self, needed: u64) -> Result<(), TokenError> {
        match self {
            Tokens::Minted { .. } => Ok(()),
            Tokens::Given(list) if (list.len() as u64) < needed => Err(TokenError::TooFew {
                needed,
                have: list.len(),
            }),
            Tokens::Given(_) => Ok(()),
        }
    }

    /// Identity number `index`, named `name` when minted.
    pub fn identity(&self, index: u64, name: &str) -> Result<Identity, TokenError> {
        match self {
            Tokens::Minted { secret, ttl } => Ok(Identity {
                user: name.to_string(),
                token: mint(secret, name, *ttl)?,
            }),
            Tokens::Given(list) => list
                .get((index % list.len() as u64) as usize)
                .cloned()
                .ok_or(TokenError::Empty),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{DecodingKey, Validation};

    #[test]
    fn minted_tokens_verify_with_the_key_and_name_the_user() {
        let t = mint("k", "alice", Duration::from_secs(600)).unwrap();
        let data = jsonwebtoken::decode::<Claims>(
            &t,
            &DecodingKey::from_secret(b"k"),
            &Validation::new(jsonwebtoken::Algorithm::HS256),
        )
        .unwrap();
        assert_eq!(data.claims.sub, "alice");
        assert!(data.claims.exp > data.claims.iat);
    }

    #[test]
    fn given_tokens_take_the_user_from_sub() {
        let dir = std::env::temp_dir().join(format!("lt-tokens-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("tokens");
        let a = mint("x", "u1", Duration::from_secs(600)).unwrap();
        let b = mint("x", "u2", Duration::from_secs(600)).unwrap();
        std::fs::write(&path, format!("{a}\n\n{b}\n")).unwrap();
        let tokens = Tokens::from_file(&path).unwrap();
        assert_eq!(tokens.identity(0, "ignored").unwrap().user, "u1");
        assert_eq!(tokens.identity(3, "ignored").unwrap().user, "u2");
        assert!(tokens.check_distinct(2).is_ok());
        assert!(matches!(
            tokens.check_distinct(3),
            Err(TokenError::TooFew { needed: 3, have: 2 })
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
