//! The embedded backend (fjall). IMPLEMENTATION IN PROGRESS (helper owns this file).

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// `[storage.embedded]`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EmbeddedConfig {
    /// Directory of the store; created if missing.
    pub path: PathBuf,
    /// Longest time an append waits for other appends to share its fsync, in microseconds.
    /// 0 syncs as soon as the previous sync ends (still grouping whatever arrived meanwhile).
    pub group_commit_window_us: u64,
    /// Block cache size in MiB.
    pub cache_mb: u64,
}

impl Default for EmbeddedConfig {
    fn default() -> Self {
        EmbeddedConfig { path: PathBuf::from("./data"), group_commit_window_us: 0, cache_mb: 64 }
    }
}

pub struct EmbeddedStore {}

impl EmbeddedStore {
    pub fn open(_config: &EmbeddedConfig) -> crate::Result<EmbeddedStore> {
        todo!()
    }
}
