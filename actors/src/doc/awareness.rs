//! A document's awareness (cursors, names, who is here): ephemeral, never
//! stored. Each awareness client id is owned by the connection that last set
//! it, so when a connection leaves, the states it set are removed and every
//! other client is told, as the reference y-websocket server does.

use std::collections::{HashMap, HashSet};

use yrs::sync::{Awareness, AwarenessUpdate};
use yrs::updates::decoder::Decode;
use yrs::updates::encoder::Encode;
use yrs::Doc;

use crate::hub::ConnAddr;

/// Largest number of awareness clients one document tracks: a bound on
/// what a client sending random ids can make the server hold.
const MAX_CLIENTS: usize = 10_000;

pub struct DocAwareness {
    inner: Awareness,
    owners: HashMap<u64, ConnAddr>,
    by_conn: HashMap<ConnAddr, HashSet<u64>>,
}

impl Default for DocAwareness {
    fn default() -> Self {
        DocAwareness {
            // Its own doc only gives the server a client id it never uses.
            inner: Awareness::new(Doc::new()),
            owners: HashMap::new(),
            by_conn: HashMap::new(),
        }
    }
}

/// Why an awareness update was refused.
#[derive(Debug, thiserror::Error)]
pub enum AwarenessError {
    #[error("not a valid awareness update")]
    Invalid,
    #[error("too many awareness clients in this document")]
    TooMany,
}

impl DocAwareness {
    /// Applies an encoded awareness update from `conn`; returns it re-encoded
    /// with only what changed (nothing when nothing did).
    pub fn apply(
        &mut self,
        conn: &ConnAddr,
        bytes: &[u8],
    ) -> Result<Option<Vec<u8>>, AwarenessError> {
        let update = AwarenessUpdate::decode_v1(bytes).map_err(|_| AwarenessError::Invalid)?;
        let new = update
            .clients
            .keys()
            .filter(|c| !self.owners.contains_key(&c.get()))
            .count();
        if self.owners.len() + new > MAX_CLIENTS {
            return Err(AwarenessError::TooMany);
        }
        let summary = self
            .inner
            .apply_update_summary(update)
            .map_err(|_| AwarenessError::Invalid)?;
        let Some(summary) = summary else {
            return Ok(None);
        };
        for c in summary.added.iter().chain(&summary.updated) {
            self.own(c.get(), conn);
        }
        for c in &summary.removed {
            self.disown(c.get());
        }
        let changed = summary.all_changes();
        if changed.is_empty() {
            return Ok(None);
        }
        Ok(self
            .inner
            .update_with_clients(changed)
            .ok()
            .map(|u| u.encode_v1()))
    }

    fn own(&mut self, client: u64, conn: &ConnAddr) {
        if let Some(old) = self.owners.insert(client, conn.clone()) {
            if old != *conn {
                if let Some(set) = self.by_conn.get_mut(&old) {
                    set.remove(&client);
                }
            }
        }
        self.by_conn.entry(conn.clone()).or_default().insert(client);
    }

    fn disown(&mut self, client: u64) {
        if let Some(conn) = self.owners.remove(&client) {
            if let Some(set) = self.by_conn.get_mut(&conn) {
                set.remove(&client);
                if set.is_empty() {
                    self.by_conn.remove(&conn);
                }
            }
        }
    }

    /// Removes the states `conn` set; returns the update that tells the
    /// others (nothing if it had set none).
    pub fn remove_conn(&mut self, conn: &ConnAddr) -> Option<Vec<u8>> {
        let clients = self.by_conn.remove(conn)?;
        let mut ids = Vec::with_capacity(clients.len());
        for c in clients {
            self.owners.remove(&c);
            let id = yrs::block::ClientID::new(c);
            self.inner.remove_state(id);
            ids.push(id);
        }
        self.inner
            .update_with_clients(ids)
            .ok()
            .map(|u| u.encode_v1())
    }

    /// Every live state, as one update (for a client that just arrived, or
    /// asked with query-awareness). `None` when there is none.
    pub fn full(&self) -> Option<Vec<u8>> {
        let update = self.inner.update().ok()?;
        if update.clients.is_empty() {
            return None;
        }
        Some(update.encode_v1())
    }

    /// [`DocAwareness::full`], or an update of zero clients.
    pub fn full_or_empty(&self) -> Vec<u8> {
        self.full().unwrap_or_else(|| vec![0])
    }

    pub fn is_empty(&self) -> bool {
        self.owners.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::placement::NodeId;
    use std::sync::Arc;
    use yrs::sync::awareness::AwarenessUpdateEntry;

    fn conn(n: u64) -> ConnAddr {
        ConnAddr {
            node: NodeId::new("n"),
            conn: n,
        }
    }

    fn update(client: u64, clock: u32, json: &str) -> Vec<u8> {
        let mut clients = HashMap::new();
        clients.insert(
            yrs::block::ClientID::new(client),
            AwarenessUpdateEntry {
                clock,
                json: Arc::from(json),
            },
        );
        AwarenessUpdate { clients }.encode_v1()
    }

    #[test]
    fn a_connection_that_leaves_takes_its_states_with_it() {
        let mut a = DocAwareness::default();
        assert!(a
            .apply(&conn(1), &update(11, 1, r#"{"user":"a"}"#))
            .unwrap()
            .is_some());
        assert!(a
            .apply(&conn(2), &update(22, 1, r#"{"user":"b"}"#))
            .unwrap()
            .is_some());
        // An old clock changes nothing.
        assert!(a
            .apply(&conn(1), &update(11, 1, r#"{"user":"a"}"#))
            .unwrap()
            .is_none());
        let gone = a.remove_conn(&conn(1)).expect("removal");
        let gone = AwarenessUpdate::decode_v1(&gone).unwrap();
        let e = &gone.clients[&yrs::block::ClientID::new(11)];
        assert_eq!(&*e.json, "null");
        assert!(a.remove_conn(&conn(1)).is_none());
        let full = AwarenessUpdate::decode_v1(&a.full().unwrap()).unwrap();
        assert_eq!(full.clients.len(), 1);
        assert!(a.apply(&conn(3), &[0xff, 0xff]).is_err());
    }
}
