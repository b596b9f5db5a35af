//! A document's CRDT state: the `yrs` document, the seq of the last update
//! it holds, and what is stored (for compaction and the size limit).
//!
//! Pure and synchronous: the actor calls it, tests call it directly.

use std::collections::VecDeque;

use chorus_storage::DocRecord;
use serde_json::{json, Map, Value};
use yrs::types::ToJson;
use yrs::updates::decoder::Decode;
use yrs::updates::encoder::Encode;
use yrs::{Array, Doc, GetString, Map as _, ReadTxn, StateVector, Transact, Update};

/// Why bytes were not accepted as a Yjs update.
#[derive(Debug, thiserror::Error)]
#[error("not a valid Yjs update: {0}")]
pub struct BadUpdate(String);

/// Checks that `bytes` decode as a Yjs v1 update (without applying them).
pub fn check_update(bytes: &[u8]) -> Result<(), BadUpdate> {
    Update::decode_v1(bytes)
        .map(|_| ())
        .map_err(|e| BadUpdate(e.to_string()))
}

pub struct DocState {
    doc: Doc,
    /// The seq of the last update applied (the stored head).
    head: u64,
    /// The last snapshot's seq and size.
    snapshot_seq: u64,
    snapshot_bytes: u64,
    /// The seq and size of each update after the snapshot.
    tail: VecDeque<(u64, u64)>,
    tail_bytes: u64,
}

impl Default for DocState {
    fn default() -> Self {
        DocState {
            doc: Doc::new(),
            head: 0,
            snapshot_seq: 0,
            snapshot_bytes: 0,
            tail: VecDeque::new(),
            tail_bytes: 0,
        }
    }
}

impl DocState {
    /// The state a stored record describes: its snapshot, then its tail.
    pub fn load(record: &DocRecord) -> Result<DocState, BadUpdate> {
        let mut state = DocState {
            snapshot_seq: record.snapshot_seq,
            snapshot_bytes: record.snapshot.as_ref().map_or(0, |s| s.len() as u64),
            head: record.snapshot_seq,
            ..DocState::default()
        };
        if let Some(snapshot) = &record.snapshot {
            state.apply_bytes(snapshot)?;
        }
        for u in &record.updates {
            state.apply(u.seq, &u.data)?;
        }
        Ok(state)
    }

    fn apply_bytes(&mut self, bytes: &[u8]) -> Result<(), BadUpdate> {
        let update = Update::decode_v1(bytes).map_err(|e| BadUpdate(e.to_string()))?;
        self.doc
            .transact_mut()
            .apply_update(update)
            .map_err(|e| BadUpdate(e.to_string()))
    }

    /// Applies the durable update `seq`.
    pub fn apply(&mut self, seq: u64, bytes: &[u8]) -> Result<(), BadUpdate> {
        self.head = seq;
        self.tail.push_back((seq, bytes.len() as u64));
        self.tail_bytes += bytes.len() as u64;
        self.apply_bytes(bytes)
    }

    /// Applies updates another writer stored after our head (CRDT merge:
    /// order and repeats do not matter).
    pub fn catch_up(&mut self, record: &DocRecord) -> Result<(), BadUpdate> {
        if record.snapshot_seq > self.head {
            if let Some(s) = &record.snapshot {
                self.apply_bytes(s)?;
            }
            self.head = record.snapshot_seq;
        }
        for u in &record.updates {
            if u.seq > self.head {
                self.apply(u.seq, &u.data)?;
            }
        }
        Ok(())
    }

    pub fn head(&self) -> u64 {
        self.head
    }

    /// Bytes stored for this document: the snapshot plus the tail.
    pub fn stored_bytes(&self) -> u64 {
        self.snapshot_bytes + self.tail_bytes
    }

    /// Whether the tail is long enough to compact.
    pub fn wants_compaction(&self, every_updates: u64, every_bytes: u64) -> bool {
        self.tail.len() as u64 >= every_updates || self.tail_bytes >= every_bytes
    }

    /// The whole state as one update: what a snapshot stores.
    pub fn encode_state(&self) -> Vec<u8> {
        self.doc
            .transact()
            .encode_state_as_update_v1(&StateVector::default())
    }

    /// What a peer with state vector `sv` (v1-encoded) lacks.
    pub fn diff(&self, sv: &StateVector) -> Vec<u8> {
        self.doc.transact().encode_state_as_update_v1(sv)
    }

    pub fn state_vector(&self) -> StateVector {
        self.doc.transact().state_vector()
    }

    /// A snapshot of the updates up to `upto` was stored: they leave the tail.
    pub fn compacted(&mut self, upto: u64, snapshot_bytes: u64) {
        self.snapshot_seq = self.snapshot_seq.max(upto);
        self.snapshot_bytes = snapshot_bytes;
        while self.tail.front().is_some_and(|(seq, _)| *seq <= upto) {
            if let Some((_, bytes)) = self.tail.pop_front() {
                self.tail_bytes -= bytes;
            }
        }
    }

    /// The seq of the last snapshot.
    pub fn snapshot_seq(&self) -> u64 {
        self.snapshot_seq
    }

    /// How many updates are after the snapshot.
    pub fn tail_len(&self) -> usize {
        self.tail.len()
    }

    /// The document's roots as JSON: a root with keys is a map, a root of
    /// strings is a text, any other sequence an array. (A Yjs update does
    /// not say which type a root is; clients decide when they read it.)
    pub fn to_json(&self) -> Value {
        let txn = self.doc.transact();
        let names: Vec<String> = txn.root_refs().map(|(name, _)| name.to_string()).collect();
        let mut out = Map::new();
        for name in names {
            let map = txn.get_map(name.as_str());
            if let Some(m) = map.filter(|m| m.len(&txn) > 0) {
                out.insert(name, any_json(&m.to_json(&txn)));
                continue;
            }
            let items: Vec<Value> = txn
                .get_array(name.as_str())
                .map(|a| a.iter(&txn).map(|v| any_json(&v.to_json(&txn))).collect())
                .unwrap_or_default();
            if !items.is_empty() && !items.iter().all(Value::is_string) {
                out.insert(name, Value::Array(items));
                continue;
            }
            let text = txn
                .get_text(name.as_str())
                .map(|t| t.get_string(&txn))
                .unwrap_or_default();
            out.insert(name, json!(text));
        }
        Value::Object(out)
    }
}

/// A yrs `Any` as JSON.
fn any_json(any: &yrs::Any) -> Value {
    serde_json::to_value(any).unwrap_or(Value::Null)
}

/// A state vector from its v1 encoding.
pub fn decode_state_vector(bytes: &[u8]) -> Result<StateVector, BadUpdate> {
    StateVector::decode_v1(bytes).map_err(|e| BadUpdate(format!("state vector: {e}")))
}

/// The v1 encoding of a state vector.
pub fn encode_state_vector(sv: &StateVector) -> Vec<u8> {
    sv.encode_v1()
}

#[cfg(test)]
mod tests {
    use super::*;
    use chorus_storage::DocUpdate;
    use yrs::{Text, WriteTxn};

    /// Updates of a client editing text, map and array, one update each.
    fn edits(n: usize) -> Vec<Vec<u8>> {
        let doc = Doc::with_client_id(7);
        let mut out = Vec::new();
        for i in 0..n {
            let before = doc.transact().state_vector();
            {
                let mut txn = doc.transact_mut();
                let text = txn.get_or_insert_text("body");
                let len = text.len(&txn);
                text.insert(&mut txn, len, &format!("w{i} "));
                if i % 3 == 0 && len > 2 {
                    text.remove_range(&mut txn, 0, 1);
                }
                let map = txn.get_or_insert_map("meta");
                map.insert(&mut txn, format!("k{}", i % 5), i as f64);
                let arr = txn.get_or_insert_array("items");
                arr.push_back(&mut txn, i as f64);
            }
            out.push(doc.transact().encode_state_as_update_v1(&before));
        }
        out
    }

    fn record(updates: &[Vec<u8>]) -> DocRecord {
        DocRecord {
            snapshot: None,
            snapshot_seq: 0,
            updates: updates
                .iter()
                .enumerate()
                .map(|(i, d)| DocUpdate {
                    seq: i as u64 + 1,
                    data: d.clone(),
                })
                .collect(),
        }
    }

    #[test]
    fn a_snapshot_plus_tail_is_byte_identical_to_the_whole_log() {
        let ups = edits(120);
        let whole = DocState::load(&record(&ups)).unwrap();
        let at = DocState::load(&record(&ups[..80])).unwrap();
        let mut compacted = record(&ups);
        compacted.snapshot = Some(at.encode_state());
        compacted.snapshot_seq = 80;
        compacted.updates.retain(|u| u.seq > 80);
        let loaded = DocState::load(&compacted).unwrap();
        assert_eq!(loaded.head(), 120);
        assert_eq!(loaded.encode_state(), whole.encode_state());
        assert_eq!(loaded.state_vector(), whole.state_vector());
        assert_eq!(loaded.to_json(), whole.to_json());
    }

    #[test]
    fn roots_read_as_json() {
        let state = DocState::load(&record(&edits(4))).unwrap();
        let v = state.to_json();
        // "w0 " … "w3 ", the first character removed by the fourth edit.
        assert_eq!(v["body"], "0 w1 w2 w3 ", "{v}");
        assert_eq!(v["meta"]["k3"].as_f64(), Some(3.0), "{v}");
        let items: Vec<f64> = v["items"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(Value::as_f64)
            .collect();
        assert_eq!(items, vec![0.0, 1.0, 2.0, 3.0], "{v}");
    }

    #[test]
    fn garbage_is_not_an_update() {
        assert!(check_update(&[0xff, 0xff, 0xff]).is_err());
        assert!(check_update(&edits(1)[0]).is_ok());
        // Empty document update: no structs, no deletes.
        assert!(check_update(&[0, 0]).is_ok());
        let _ = Doc::new().transact_mut().get_or_insert_text("x");
    }
}
