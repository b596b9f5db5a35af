//! What a connection may do, as read from its token by the node.

use chorus_protocol::Millis;

use crate::Fail;

/// The verified claims of a connection's token.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Claims {
    /// `sub`: the user id.
    pub user: String,
    /// `exp`, in milliseconds since the epoch.
    pub expires_at: Millis,
    /// `rooms`: room ids (or `prefix*` patterns) the client may join, read and post to; `None`: any.
    pub rooms: Option<Vec<String>>,
    /// `topics`: topics the client may subscribe to; `None`: any.
    pub topics: Option<Vec<String>>,
    /// `publish`: topics the client may publish to; empty: none.
    pub publish: Vec<String>,
    /// `docs`: documents (or `prefix*` patterns) the client may open; `None`: any.
    pub docs: Option<Vec<String>>,
    /// `doc_write`: documents the client may write (of those it may open);
    /// `None`: all of them, `Some([])` (`doc_write: false`): none, read-only.
    pub doc_write: Option<Vec<String>>,
}

fn matches(patterns: &[String], name: &str) -> bool {
    patterns.iter().any(|p| match p.strip_suffix('*') {
        Some(prefix) => name.starts_with(prefix),
        None => p == name,
    })
}

impl Claims {
    pub fn may_use_room(&self, room: &str) -> bool {
        self.rooms.as_ref().is_none_or(|p| matches(p, room))
    }
    pub fn may_subscribe_topic(&self, topic: &str) -> bool {
        self.topics.as_ref().is_none_or(|p| matches(p, topic))
    }
    pub fn may_publish_topic(&self, topic: &str) -> bool {
        matches(&self.publish, topic)
    }
    pub fn may_open_doc(&self, doc: &str) -> bool {
        self.docs.as_ref().is_none_or(|p| matches(p, doc))
    }
    pub fn may_write_doc(&self, doc: &str) -> bool {
        self.may_open_doc(doc) && self.doc_write.as_ref().is_none_or(|p| matches(p, doc))
    }
}

/// Verifies a token (the node implements it with its configured keys).
pub trait TokenVerifier: Send + Sync + 'static {
    fn verify(&self, token: &str) -> Result<Claims, Fail>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns() {
        let c = Claims {
            user: "u".into(),
            expires_at: 0,
            rooms: Some(vec!["team-*".into(), "lobby".into()]),
            topics: None,
            publish: vec!["post:*".into()],
            docs: Some(vec!["notes-*".into()]),
            doc_write: Some(vec!["notes-mine*".into()]),
        };
        assert!(c.may_open_doc("notes-1") && !c.may_open_doc("secret"));
        assert!(c.may_write_doc("notes-mine-2") && !c.may_write_doc("notes-1"));
        assert!(c.may_use_room("team-1"));
        assert!(c.may_use_room("lobby"));
        assert!(!c.may_use_room("lobby2"));
        assert!(c.may_subscribe_topic("anything"));
        assert!(c.may_publish_topic("post:9"));
        assert!(!c.may_publish_topic("poll:9"));
    }
}
