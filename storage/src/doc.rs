//! The stored form of a collaborative document: an append-only log of Yjs
//! updates, numbered `1, 2, …` by the document's only writer (its actor),
//! and a snapshot (the merged state up to some `seq`) that replaces the
//! log's prefix when the actor compacts it. A document loads from its
//! snapshot plus the updates after it ([`DocRecord`]).
//!
//! The bytes are opaque to the store: Yjs v1 updates, merged or not.

use serde::{Deserialize, Serialize};

/// One stored update of a document.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DocUpdate {
    /// Its position in the document's log, from 1.
    pub seq: u64,
    /// A Yjs (v1) update.
    pub data: Vec<u8>,
}

/// What a document loads from: its snapshot, if it was ever compacted, and
/// every update after the snapshot, oldest first.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DocRecord {
    /// The merged state of updates `1..=snapshot_seq` (`None`: never compacted).
    pub snapshot: Option<Vec<u8>>,
    /// The last update the snapshot covers (0 without a snapshot).
    pub snapshot_seq: u64,
    /// The updates after `snapshot_seq`, in `seq` order, gap-free.
    pub updates: Vec<DocUpdate>,
}

impl DocRecord {
    /// The seq of the last stored update: the next append starts after it.
    pub fn head(&self) -> u64 {
        self.updates.last().map_or(self.snapshot_seq, |u| u.seq)
    }

    /// Bytes held: the snapshot plus the tail of the log.
    pub fn stored_bytes(&self) -> u64 {
        let snapshot = self.snapshot.as_ref().map_or(0, Vec::len);
        let tail: usize = self.updates.iter().map(|u| u.data.len()).sum();
        (snapshot + tail) as u64
    }
}
