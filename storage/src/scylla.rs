//! The ScyllaDB / Apache Cassandra backend, on the official `scylla` driver.
//!
//! A cluster of Chorus nodes shares one ScyllaDB (or Cassandra) cluster through
//! this backend. `docs/storage.md` is the long form of what follows.
//!
//! # Data model
//!
//! | table | partition | clustering | holds |
//! |---|---|---|---|
//! | `channels` | `channel` | | epoch, a hint of the newest bucket |
//! | `messages` | `(channel, bucket)` | `msg_offset DESC` | one entry (MessagePack) per row; static `top`, `top_seq` |
//! | `client_ids` | `(channel, client_id)` | | offset and writer id of the append that recorded a client message id; `client_id` holds `sender \0 id` ([`crate::client_key`]) |
//! | `rooms` | `room_id` | | room metadata |
//! | `members` / `user_rooms` | `room_id` / `user_id` | `user_id` / `room_id` | membership, both ways |
//! | `read_markers` | `channel` | `user_id` | read marker offsets |
//! | `notifications` | `user_id` | `id DESC` | inbox, `USING TTL` from `expires_at` |
//! | `notification_prefs`, `last_seen` | `user_id` | | |
//! | `schema_migrations`, `schema_lock` | | | migrations Chorus applied, and who is applying |
//!
//! # Buckets and the write path
//!
//! An append goes, whole, into the partition of its first entry's bucket
//! `b = first_offset / bucket_size`, as one lightweight transaction (a
//! conditional batch when it has several entries) whose condition is on the
//! partition's static `top` column (the last offset stored in it):
//! `IF top = first_offset - 1`, or `IF top = null` for the first append into
//! a partition, which is allowed only if the previous partition's `top` is
//! exactly `first_offset - 1` (read at SERIAL consistency). So:
//!
//! - every partition holds a contiguous run of offsets and the runs of
//!   consecutive partitions follow each other with no gap and no overlap;
//! - an offset is written once: a second writer's condition fails and it gets
//!   [`ErrorKind::Conflict`] having written no entry;
//! - an append is all or nothing, also when it crosses a bucket boundary: its
//!   tail "spills" into the first partition's row set instead of being split.
//!
//! An append holds at most `bucket_size` entries, so a spill stays below the
//! end of the next bucket and an offset `o` lives in bucket `o / bucket_size`
//! or the one before. A partition holds at most `2 * bucket_size - 1` entries.
//!
//! Reads go to those one or two partitions per bucket; a history page is
//! typically one or two partition reads. The head of a channel is the `top`
//! of its newest non-empty partition, found from the `channels.head_bucket`
//! hint, which only ever moves forward (`IF head_bucket < ?`).
//!
//! # Requests
//!
//! Every query is a prepared statement; reads, plain upserts and deletes are
//! marked idempotent, lightweight transactions are not. The driver's default
//! retry policy retries only what it deems safe. A semaphore bounds the
//! requests one store has in flight (`max_in_flight`); waiting for a permit
//! longer than the request timeout fails with [`ErrorKind::Unavailable`].
//! Within one process, lightweight transactions on one key (a channel, a
//! room) are serialized by a local async lock, so concurrent callers in one
//! node never make Paxos rounds contend with each other.

use std::collections::{HashMap, HashSet};
use std::ops::ControlFlow;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use scylla::client::execution_profile::ExecutionProfile;
use scylla::client::session::Session;
use scylla::client::session_builder::SessionBuilder;
use scylla::client::Compression;
use scylla::deserialize::row::DeserializeRow;
use scylla::errors::{DbError, ExecutionError, RequestAttemptError};
use scylla::policies::load_balancing::DefaultPolicy;
use scylla::policies::retry::DefaultRetryPolicy;
use scylla::policies::timestamp_generator::MonotonicTimestampGenerator;
use scylla::response::query_result::QueryResult;
use scylla::response::PagingState;
use scylla::serialize::row::SerializeRow;
use scylla::statement::batch::{Batch, BatchType};
use scylla::statement::prepared::PreparedStatement;
use scylla::statement::{Consistency, SerialConsistency, Statement};
use scylla::value::{CqlValue, MaybeUnset, Row};
use serde::{Deserialize, Serialize};
use tokio::sync::{Semaphore, SemaphorePermit};

use crate::{
    ChannelHead, DocRecord, DocUpdate, Entry, ErrorKind, Member, Millis, Notification,
    NotificationPrefs, Result, RoomInfo, StorageError, MAX_PAGE,
};

/// `[storage.scylla]`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ScyllaConfig {
    /// `host:port` of one or more nodes of the cluster.
    pub contact_points: Vec<String>,
    pub keyspace: String,
    /// `SimpleStrategy` or `NetworkTopologyStrategy` (used when Chorus creates the keyspace).
    pub replication_strategy: String,
    pub replication_factor: u32,
    /// Datacenter name for `NetworkTopologyStrategy` and for DC-aware load balancing.
    pub datacenter: Option<String>,
    /// `one`, `local_one`, `quorum`, `local_quorum`, `all`, …
    pub read_consistency: String,
    pub write_consistency: String,
    /// Consistency of the Paxos phase of lightweight transactions (appends,
    /// room and channel creation): `local_serial` (default) or `serial`. Use
    /// `serial` when several datacenters may write the same room.
    pub serial_consistency: String,
    pub request_timeout_ms: u64,
    pub username: Option<String>,
    pub password: Option<String>,
    /// PEM file of the certificate authority that signed the nodes'
    /// certificates. Setting it turns TLS on (needs the `scylla-tls` cargo
    /// feature). Default: none, plain TCP.
    pub tls_ca_file: Option<PathBuf>,
    /// PEM client certificate chain and private key, for clusters that
    /// require client certificates. Default: none.
    pub tls_cert_file: Option<PathBuf>,
    pub tls_key_file: Option<PathBuf>,
    /// Run pending schema migrations when the node starts.
    pub migrate_on_start: bool,
    /// Messages per history bucket (partition): bounds partition size. Also
    /// the most entries one append may carry. Never change it for a keyspace
    /// that already holds messages: it decides where every offset is stored.
    pub bucket_size: u64,
    /// Most requests in flight from this node at once.
    pub max_in_flight: usize,
}

impl Default for ScyllaConfig {
    fn default() -> Self {
        ScyllaConfig {
            contact_points: vec!["127.0.0.1:9042".to_string()],
            keyspace: "chorus".to_string(),
            replication_strategy: "SimpleStrategy".to_string(),
            replication_factor: 1,
            datacenter: None,
            read_consistency: "local_quorum".to_string(),
            write_consistency: "local_quorum".to_string(),
            serial_consistency: "local_serial".to_string(),
            request_timeout_ms: 5000,
            username: None,
            password: None,
            tls_ca_file: None,
            tls_cert_file: None,
            tls_key_file: None,
            migrate_on_start: true,
            bucket_size: 1000,
            max_in_flight: 1024,
        }
    }
}

impl ScyllaConfig {
    /// Checks everything that can be checked without a cluster.
    pub fn validate(&self) -> Result<()> {
        let invalid = |m: String| Err(StorageError::internal(format!("[storage.scylla] {m}")));
        if self.contact_points.is_empty() {
            return invalid("contact_points is empty".into());
        }
        if !valid_keyspace(&self.keyspace) {
            return invalid(format!(
                "keyspace {:?} must be 1 to 48 of [A-Za-z0-9_], starting with a letter",
                self.keyspace
            ));
        }
        replication(self)?;
        parse_consistency(&self.read_consistency)?;
        parse_consistency(&self.write_consistency)?;
        parse_serial(&self.serial_consistency)?;
        if self.request_timeout_ms == 0 {
            return invalid("request_timeout_ms must be at least 1".into());
        }
        if self.username.is_some() != self.password.is_some() {
            return invalid("username and password go together".into());
        }
        if self.tls_cert_file.is_some() != self.tls_key_file.is_some() {
            return invalid("tls_cert_file and tls_key_file go together".into());
        }
        if self.bucket_size == 0 || self.bucket_size > i64::MAX as u64 / 4 {
            return invalid(format!("bucket_size {} is out of range", self.bucket_size));
        }
        if self.max_in_flight == 0 {
            return invalid("max_in_flight must be at least 1".into());
        }
        Ok(())
    }
}

fn valid_keyspace(ks: &str) -> bool {
    let mut bytes = ks.bytes();
    matches!(bytes.next(), Some(b) if b.is_ascii_alphabetic())
        && ks.len() <= 48
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

/// The replication map of `CREATE KEYSPACE`.
fn replication(config: &ScyllaConfig) -> Result<String> {
    let rf = config.replication_factor;
    if rf == 0 {
        return Err(StorageError::internal(
            "[storage.scylla] replication_factor must be at least 1",
        ));
    }
    match config.replication_strategy.to_ascii_lowercase().as_str() {
        "simplestrategy" => {
            Ok(format!("{{'class': 'SimpleStrategy', 'replication_factor': {rf}}}"))
        }
        "networktopologystrategy" => {
            let Some(dc) = config.datacenter.as_deref() else {
                return Err(StorageError::internal(
                    "[storage.scylla] NetworkTopologyStrategy needs `datacenter`",
                ));
            };
            if dc.is_empty() || dc.contains('\'') {
                return Err(StorageError::internal(format!(
                    "[storage.scylla] datacenter {dc:?} is not a valid name"
                )));
            }
            Ok(format!("{{'class': 'NetworkTopologyStrategy', '{dc}': {rf}}}"))
        }
        other => Err(StorageError::internal(format!(
            "[storage.scylla] replication_strategy {other:?}: use SimpleStrategy or NetworkTopologyStrategy"
        ))),
    }
}

fn parse_consistency(s: &str) -> Result<Consistency> {
    Ok(match s.to_ascii_lowercase().as_str() {
        "any" => Consistency::Any,
        "one" => Consistency::One,
        "two" => Consistency::Two,
        "three" => Consistency::Three,
        "quorum" => Consistency::Quorum,
        "all" => Consistency::All,
        "local_quorum" => Consistency::LocalQuorum,
        "each_quorum" => Consistency::EachQuorum,
        "local_one" => Consistency::LocalOne,
        other => {
            return Err(StorageError::internal(format!(
                "[storage.scylla] unknown consistency level {other:?}"
            )))
        }
    })
}

fn parse_serial(s: &str) -> Result<SerialConsistency> {
    match s.to_ascii_lowercase().as_str() {
        "serial" => Ok(SerialConsistency::Serial),
        "local_serial" => Ok(SerialConsistency::LocalSerial),
        other => Err(StorageError::internal(format!(
            "[storage.scylla] serial_consistency {other:?}: use serial or local_serial"
        ))),
    }
}

// ---- errors ----

/// Maps a driver error to the storage error kinds: whatever a later attempt
/// may cure is `Unavailable`, the rest is `Internal` (our bug or a rejected
/// request) or `Corrupt` (a response that cannot be decoded).
fn exec_error(e: ExecutionError) -> StorageError {
    let kind = match &e {
        ExecutionError::EmptyPlan
        | ExecutionError::ConnectionPoolError(_)
        | ExecutionError::RequestTimeout(_)
        | ExecutionError::UseKeyspaceError(_)
        | ExecutionError::SchemaAgreementError(_)
        | ExecutionError::MetadataError(_)
        | ExecutionError::PrepareError(_) => ErrorKind::Unavailable,
        ExecutionError::BadQuery(_) => ErrorKind::Internal,
        ExecutionError::LastAttemptError(a) => attempt_kind(a),
        _ => ErrorKind::Internal,
    };
    StorageError::new(kind, format!("scylla: {e}"))
}

fn attempt_kind(e: &RequestAttemptError) -> ErrorKind {
    match e {
        RequestAttemptError::UnableToAllocStreamId
        | RequestAttemptError::BrokenConnectionError(_) => ErrorKind::Unavailable,
        RequestAttemptError::DbError(
            DbError::Unavailable { .. }
            | DbError::Overloaded
            | DbError::IsBootstrapping
            | DbError::ReadTimeout { .. }
            | DbError::WriteTimeout { .. }
            | DbError::RateLimitReached { .. }
            | DbError::TruncateError
            | DbError::Unprepared { .. },
            _,
        ) => ErrorKind::Unavailable,
        RequestAttemptError::CqlResultParseError(_)
        | RequestAttemptError::CqlErrorParseError(_)
        | RequestAttemptError::BodyExtensionsParseError(_)
        | RequestAttemptError::UnexpectedResponse(_) => ErrorKind::Corrupt,
        _ => ErrorKind::Internal,
    }
}

fn corrupt(e: impl std::fmt::Display) -> StorageError {
    StorageError::corrupt(format!("scylla: cannot decode a result: {e}"))
}

fn new_session_error(e: impl std::fmt::Display) -> StorageError {
    StorageError::unavailable(format!("scylla: cannot connect: {e}"))
}

fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>> {
    rmp_serde::to_vec_named(value)
        .map_err(|e| StorageError::internal(format!("cannot encode a record: {e}")))
}

fn decode<T: for<'de> Deserialize<'de>>(bytes: &[u8], what: &str) -> Result<T> {
    rmp_serde::from_slice(bytes)
        .map_err(|e| StorageError::corrupt(format!("stored {what} cannot be decoded: {e}")))
}

/// CQL has no unsigned integers: offsets and ids are stored as `bigint`.
fn to_i64(v: u64, what: &str) -> Result<i64> {
    i64::try_from(v)
        .map_err(|_| StorageError::corrupt(format!("{what} {v} exceeds the stored range")))
}

fn to_u64(v: i64, what: &str) -> Result<u64> {
    u64::try_from(v).map_err(|_| StorageError::corrupt(format!("stored {what} {v} is negative")))
}

// ---- migrations ----

/// One versioned step of the schema. Statements are idempotent DDL
/// (`IF NOT EXISTS`) with `{ks}` for the keyspace; never a drop.
struct Migration {
    version: u32,
    name: &'static str,
    statements: &'static [&'static str],
}

const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "initial schema",
        statements: &[
            "CREATE TABLE IF NOT EXISTS {ks}.channels (
            channel text PRIMARY KEY,
            epoch text,
            head_bucket bigint)",
            "CREATE TABLE IF NOT EXISTS {ks}.messages (
            channel text,
            bucket bigint,
            msg_offset bigint,
            top bigint STATIC,
            top_seq bigint STATIC,
            entry blob,
            writer bigint,
            PRIMARY KEY ((channel, bucket), msg_offset))
          WITH CLUSTERING ORDER BY (msg_offset DESC)",
            "CREATE TABLE IF NOT EXISTS {ks}.client_ids (
            channel text,
            client_id text,
            msg_offset bigint,
            writer bigint,
            PRIMARY KEY ((channel, client_id)))",
            "CREATE TABLE IF NOT EXISTS {ks}.rooms (
            room_id text PRIMARY KEY,
            info blob)",
            "CREATE TABLE IF NOT EXISTS {ks}.members (
            room_id text,
            user_id text,
            member blob,
            PRIMARY KEY (room_id, user_id))",
            "CREATE TABLE IF NOT EXISTS {ks}.user_rooms (
            user_id text,
            room_id text,
            PRIMARY KEY (user_id, room_id))",
            "CREATE TABLE IF NOT EXISTS {ks}.read_markers (
            channel text,
            user_id text,
            msg_offset bigint,
            PRIMARY KEY (channel, user_id))",
            "CREATE TABLE IF NOT EXISTS {ks}.notifications (
            user_id text,
            id bigint,
            body blob,
            is_read boolean,
            expires_at bigint,
            PRIMARY KEY (user_id, id))
          WITH CLUSTERING ORDER BY (id DESC)",
            "CREATE TABLE IF NOT EXISTS {ks}.notification_prefs (
            user_id text PRIMARY KEY,
            prefs blob)",
            "CREATE TABLE IF NOT EXISTS {ks}.last_seen (
            user_id text PRIMARY KEY,
            seen_at bigint)",
        ],
    },
    Migration {
        version: 2,
        name: "collaborative documents",
        statements: &[
            // One partition per document: its log since the last compaction
            // (compaction deletes the prefix, so the partition stays small);
            // `top`, the last seq, is what an append's condition checks.
            "CREATE TABLE IF NOT EXISTS {ks}.doc_updates (
            doc text,
            seq bigint,
            top bigint STATIC,
            data blob,
            PRIMARY KEY (doc, seq))",
            "CREATE TABLE IF NOT EXISTS {ks}.doc_snapshots (
            doc text PRIMARY KEY,
            seq bigint,
            data blob)",
        ],
    },
];

/// The schema version this build reads and writes.
pub const SCHEMA_VERSION: u32 = 2;

/// How long a migration lock lives if its holder dies without releasing it.
const LOCK_TTL_SECS: i32 = 120;
/// How long `migrate` waits for another node's migration before giving up.
const LOCK_WAIT: Duration = Duration::from_secs(180);
const LOCK_POLL: Duration = Duration::from_millis(500);

/// Creates the keyspace if needed and applies every pending migration, safe
/// to run from several nodes at once (an LWT lock row, idempotent DDL,
/// version rows written with LWT). Returns the schema version afterwards.
/// This is what `chorus migrate` runs.
pub async fn migrate(config: &ScyllaConfig) -> Result<u32> {
    config.validate()?;
    let session = build_session(config).await?;
    run_migrations(&session, config).await
}

async fn ddl(session: &Session, config: &ScyllaConfig, cql: &str) -> Result<()> {
    let mut st = Statement::new(cql.replace("{ks}", &config.keyspace));
    // Schema changes wait for agreement across the cluster: give them longer.
    st.set_request_timeout(Some(Duration::from_millis(
        config.request_timeout_ms.max(60_000),
    )));
    st.set_is_idempotent(true);
    session.query_unpaged(st, &[]).await.map_err(exec_error)?;
    Ok(())
}

async fn applied_versions(session: &Session, config: &ScyllaConfig) -> Result<Vec<u32>> {
    let mut st = Statement::new(format!(
        "SELECT version FROM {}.schema_migrations",
        config.keyspace
    ));
    st.set_consistency(parse_consistency(&config.read_consistency)?);
    st.set_is_idempotent(true);
    st.set_page_size(1000);
    let result = session.query_unpaged(st, &[]).await.map_err(exec_error)?;
    let rows = result.into_rows_result().map_err(corrupt)?;
    let mut versions = Vec::new();
    for row in rows.rows::<(i32,)>().map_err(corrupt)? {
        let (v,) = row.map_err(corrupt)?;
        versions.push(u32::try_from(v).map_err(corrupt)?);
    }
    Ok(versions)
}

fn pending(applied: &[u32]) -> Vec<&'static Migration> {
    MIGRATIONS
        .iter()
        .filter(|m| !applied.contains(&m.version))
        .collect()
}

fn schema_version(applied: &[u32]) -> u32 {
    applied.iter().copied().max().unwrap_or(0)
}

async fn run_migrations(session: &Session, config: &ScyllaConfig) -> Result<u32> {
    let ks = &config.keyspace;
    ddl(
        session,
        config,
        &format!(
            "CREATE KEYSPACE IF NOT EXISTS {ks} WITH replication = {} AND durable_writes = true",
            replication(config)?
        ),
    )
    .await?;
    ddl(
        session,
        config,
        "CREATE TABLE IF NOT EXISTS {ks}.schema_migrations (
            version int PRIMARY KEY, name text, applied_at bigint, applied_by text)",
    )
    .await?;
    ddl(
        session,
        config,
        "CREATE TABLE IF NOT EXISTS {ks}.schema_lock (
            name text PRIMARY KEY, owner text, since bigint)",
    )
    .await?;

    let applied = applied_versions(session, config).await?;
    if pending(&applied).is_empty() {
        return Ok(warn_if_newer(schema_version(&applied)));
    }

    let write_cl = parse_consistency(&config.write_consistency)?;
    let serial = parse_serial(&config.serial_consistency)?;
    let lwt = |cql: String| {
        let mut st = Statement::new(cql);
        st.set_consistency(write_cl);
        st.set_serial_consistency(Some(serial));
        st
    };
    let lock = lwt(format!(
        "INSERT INTO {ks}.schema_lock (name, owner, since) VALUES ('migrations', ?, ?) \
         IF NOT EXISTS USING TTL {LOCK_TTL_SECS}"
    ));
    let unlock = lwt(format!(
        "DELETE FROM {ks}.schema_lock WHERE name = 'migrations' IF owner = ?"
    ));
    let record = lwt(format!(
        "INSERT INTO {ks}.schema_migrations (version, name, applied_at, applied_by) \
         VALUES (?, ?, ?, ?) IF NOT EXISTS"
    ));
    let owner = format!("{}-{:016x}", std::process::id(), rand::random::<u64>());

    let deadline = tokio::time::Instant::now() + LOCK_WAIT;
    loop {
        match session
            .query_unpaged(lock.clone(), (&owner, chorus_protocol::now_ms()))
            .await
        {
            Ok(result) => {
                if lwt_applied(result)?.0 {
                    break;
                }
            }
            // An ambiguous attempt may have taken the lock for us: it expires by itself.
            Err(e) => tracing::warn!("schema migration lock attempt failed: {e}"),
        }
        let applied = applied_versions(session, config).await?;
        if pending(&applied).is_empty() {
            return Ok(warn_if_newer(schema_version(&applied)));
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(StorageError::unavailable(format!(
                "another node has held the schema migration lock of keyspace {ks} for over {}s",
                LOCK_WAIT.as_secs()
            )));
        }
        tokio::time::sleep(LOCK_POLL).await;
    }

    let outcome = async {
        let applied = applied_versions(session, config).await?;
        for m in pending(&applied) {
            tracing::info!(version = m.version, name = m.name, keyspace = %ks, "applying schema migration");
            for cql in m.statements {
                ddl(session, config, cql).await?;
            }
            let values = (m.version as i32, m.name, chorus_protocol::now_ms(), &owner);
            session.query_unpaged(record.clone(), values).await.map_err(exec_error)?;
        }
        Ok(warn_if_newer(schema_version(&applied_versions(session, config).await?)))
    }
    .await;
    if let Err(e) = session.query_unpaged(unlock, (&owner,)).await {
        tracing::warn!(
            "could not release the schema migration lock (it expires in {LOCK_TTL_SECS}s): {e}"
        );
    }
    outcome
}

fn warn_if_newer(version: u32) -> u32 {
    if version > SCHEMA_VERSION {
        tracing::warn!(
            version,
            known = SCHEMA_VERSION,
            "the keyspace was migrated by a newer Chorus; this node uses the tables it knows"
        );
    }
    version
}

/// Read markers are written with timestamp `MARKER_TIMESTAMP_BASE + offset`:
/// 2^52 µs is the year 2112, so every marker written this way outranks the
/// wall-clock timestamps of markers written before, and the highest offset
/// always wins (last-write-wins on the timestamp is a max register).
const MARKER_TIMESTAMP_BASE: i64 = 1 << 52;

/// `[applied]` of a lightweight transaction's result, and the row it returns
/// (the current values of the columns in the condition when not applied).
fn lwt_applied(result: QueryResult) -> Result<(bool, HashMap<String, CqlValue>)> {
    let rows = result.into_rows_result().map_err(corrupt)?;
    let names: Vec<String> = rows
        .column_specs()
        .iter()
        .map(|c| c.name().to_string())
        .collect();
    let mut applied = None;
    let mut values = HashMap::new();
    for row in rows.rows::<Row>().map_err(corrupt)? {
        let row = row.map_err(corrupt)?;
        for (name, value) in names.iter().zip(row.columns) {
            match (name.as_str(), value) {
                ("[applied]", Some(CqlValue::Boolean(b))) => {
                    applied.get_or_insert(b);
                }
                (_, Some(v)) => {
                    values.entry(name.clone()).or_insert(v);
                }
                _ => {}
            }
        }
    }
    let applied = applied.ok_or_else(|| corrupt("a conditional write returned no [applied]"))?;
    Ok((applied, values))
}

fn bigint(values: &HashMap<String, CqlValue>, name: &str) -> Option<i64> {
    match values.get(name) {
        Some(CqlValue::BigInt(v)) => Some(*v),
        _ => None,
    }
}

// ---- the store ----

/// Per-key async locks, removed when nobody holds or waits for them.
#[derive(Default)]
struct KeyLocks {
    map: parking_lot::Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

struct KeyGuard<'a> {
    locks: &'a KeyLocks,
    key: String,
    lock: Arc<tokio::sync::Mutex<()>>,
    guard: Option<tokio::sync::OwnedMutexGuard<()>>,
}

impl KeyLocks {
    async fn lock(&self, key: &str) -> KeyGuard<'_> {
        let lock = Arc::clone(self.map.lock().entry(key.to_string()).or_default());
        let guard = Arc::clone(&lock).lock_owned().await;
        KeyGuard {
            locks: self,
            key: key.to_string(),
            lock,
            guard: Some(guard),
        }
    }
}

impl Drop for KeyGuard<'_> {
    fn drop(&mut self) {
        self.guard.take();
        let mut map = self.locks.map.lock();
        // Ours and the map's: nobody else waits.
        if Arc::strong_count(&self.lock) == 2 {
            map.remove(&self.key);
        }
    }
}

/// Every statement this backend runs, prepared once at connect.
struct Statements {
    channel_get: PreparedStatement,
    channel_create: PreparedStatement,
    channel_hint: PreparedStatement,
    top_get: PreparedStatement,
    top_get_serial: PreparedStatement,
    entry_cas: PreparedStatement,
    entries_asc: PreparedStatement,
    entries_before: PreparedStatement,
    entry_get: PreparedStatement,
    writer_get: PreparedStatement,
    writer_get_serial: PreparedStatement,
    entry_update: PreparedStatement,
    client_id_put: PreparedStatement,
    client_id_get: PreparedStatement,
    room_create: PreparedStatement,
    room_get: PreparedStatement,
    room_get_serial: PreparedStatement,
    member_put: PreparedStatement,
    user_room_put: PreparedStatement,
    member_delete: PreparedStatement,
    user_room_delete: PreparedStatement,
    members_list: PreparedStatement,
    member_get: PreparedStatement,
    user_rooms_list: PreparedStatement,
    marker_set: PreparedStatement,
    marker_get: PreparedStatement,
    markers_list: PreparedStatement,
    notification_put: PreparedStatement,
    notifications_all: PreparedStatement,
    notifications_before: PreparedStatement,
    notifications_by_id: PreparedStatement,
    notification_mark: PreparedStatement,
    notification_flags: PreparedStatement,
    prefs_put: PreparedStatement,
    prefs_get: PreparedStatement,
    seen_put: PreparedStatement,
    seen_get: PreparedStatement,
    doc_top_serial: PreparedStatement,
    doc_cas: PreparedStatement,
    doc_updates_after: PreparedStatement,
    doc_update_get_serial: PreparedStatement,
    doc_snapshot_get: PreparedStatement,
    doc_snapshot_insert: PreparedStatement,
    doc_snapshot_advance: PreparedStatement,
    doc_trim: PreparedStatement,
    doc_drop_updates: PreparedStatement,
    doc_drop_snapshot: PreparedStatement,
}

#[derive(Clone, Copy)]
enum Kind {
    /// A read at the read consistency.
    Read,
    /// A read at SERIAL / LOCAL_SERIAL: sees (and completes) in-flight Paxos rounds.
    SerialRead,
    /// A plain write at the write consistency; safe to retry.
    Write,
    /// A lightweight transaction; not idempotent unless the caller says so.
    Lwt,
}

impl Statements {
    async fn prepare(session: &Session, config: &ScyllaConfig) -> Result<Statements> {
        let read_cl = parse_consistency(&config.read_consistency)?;
        let write_cl = parse_consistency(&config.write_consistency)?;
        let serial = parse_serial(&config.serial_consistency)?;
        let serial_cl = match serial {
            SerialConsistency::Serial => Consistency::Serial,
            SerialConsistency::LocalSerial => Consistency::LocalSerial,
        };
        let ks = &config.keyspace;
        let prep = |kind: Kind, cql: String| async move {
            let mut st = session
                .prepare(cql.replace("{ks}", ks))
                .await
                .map_err(|e| {
                    StorageError::unavailable(format!("scylla: cannot prepare {cql:?}: {e}"))
                })?;
            match kind {
                Kind::Read => {
                    st.set_consistency(read_cl);
                    st.set_is_idempotent(true);
                }
                Kind::SerialRead => {
                    st.set_consistency(serial_cl);
                    st.set_is_idempotent(true);
                }
                Kind::Write => {
                    st.set_consistency(write_cl);
                    st.set_is_idempotent(true);
                }
                Kind::Lwt => {
                    st.set_consistency(write_cl);
                    st.set_serial_consistency(Some(serial));
                    st.set_is_idempotent(false);
                }
            }
            Ok::<_, StorageError>(st)
        };
        let top = "SELECT top, top_seq FROM {ks}.messages WHERE channel = ? AND bucket = ? LIMIT 1";
        let writer =
            "SELECT writer FROM {ks}.messages WHERE channel = ? AND bucket = ? AND msg_offset = ?";
        let room = "SELECT info FROM {ks}.rooms WHERE room_id = ?";
        let mut entry_update = prep(
            Kind::Lwt,
            "UPDATE {ks}.messages SET entry = ? WHERE channel = ? AND bucket = ? AND msg_offset = ? \
             IF EXISTS"
                .into(),
        )
        .await?;
        // Rewriting the same entry twice is harmless, so the driver may retry it.
        entry_update.set_is_idempotent(true);
        Ok(Statements {
            channel_get: prep(Kind::Read, "SELECT epoch, head_bucket FROM {ks}.channels WHERE channel = ?".into()).await?,
            channel_create: prep(
                Kind::Lwt,
                "INSERT INTO {ks}.channels (channel, epoch, head_bucket) VALUES (?, ?, 0) IF NOT EXISTS".into(),
            )
            .await?,
            channel_hint: prep(
                Kind::Lwt,
                "UPDATE {ks}.channels SET head_bucket = ? WHERE channel = ? IF head_bucket < ?".into(),
            )
            .await?,
            top_get: prep(Kind::Read, top.into()).await?,
            top_get_serial: prep(Kind::SerialRead, top.into()).await?,
            entry_cas: prep(
                Kind::Lwt,
                "UPDATE {ks}.messages SET entry = ?, writer = ?, top = ?, top_seq = ? \
                 WHERE channel = ? AND bucket = ? AND msg_offset = ? IF top = ?"
                    .into(),
            )
            .await?,
            entries_asc: prep(
                Kind::Read,
                "SELECT msg_offset, entry FROM {ks}.messages WHERE channel = ? AND bucket = ? \
                 AND msg_offset >= ? AND msg_offset <= ? ORDER BY msg_offset ASC LIMIT ?"
                    .into(),
            )
            .await?,
            entries_before: prep(
                Kind::Read,
                "SELECT msg_offset, entry FROM {ks}.messages WHERE channel = ? AND bucket = ? \
                 AND msg_offset < ? ORDER BY msg_offset DESC LIMIT ?"
                    .into(),
            )
            .await?,
            entry_get: prep(
                Kind::Read,
                "SELECT msg_offset, entry FROM {ks}.messages WHERE channel = ? AND bucket = ? AND msg_offset = ?"
                    .into(),
            )
            .await?,
            writer_get: prep(Kind::Read, writer.into()).await?,
            writer_get_serial: prep(Kind::SerialRead, writer.into()).await?,
            entry_update,
            client_id_put: prep(
                Kind::Write,
                "INSERT INTO {ks}.client_ids (channel, client_id, msg_offset, writer) VALUES (?, ?, ?, ?)"
                    .into(),
            )
            .await?,
            client_id_get: prep(
                Kind::Read,
                "SELECT msg_offset, writer FROM {ks}.client_ids WHERE channel = ? AND client_id = ?"
                    .into(),
            )
            .await?,
            room_create: prep(
                Kind::Lwt,
                "INSERT INTO {ks}.rooms (room_id, info) VALUES (?, ?) IF NOT EXISTS".into(),
            )
            .await?,
            room_get: prep(Kind::Read, room.into()).await?,
            room_get_serial: prep(Kind::SerialRead, room.into()).await?,
            member_put: prep(
                Kind::Write,
                "INSERT INTO {ks}.members (room_id, user_id, member) VALUES (?, ?, ?)".into(),
            )
            .await?,
            user_room_put: prep(
                Kind::Write,
                "INSERT INTO {ks}.user_rooms (user_id, room_id) VALUES (?, ?)".into(),
            )
            .await?,
            member_delete: prep(
                Kind::Write,
                "DELETE FROM {ks}.members WHERE room_id = ? AND user_id = ?".into(),
            )
            .await?,
            user_room_delete: prep(
                Kind::Write,
                "DELETE FROM {ks}.user_rooms WHERE user_id = ? AND room_id = ?".into(),
            )
            .await?,
            members_list: prep(Kind::Read, "SELECT member FROM {ks}.members WHERE room_id = ?".into()).await?,
            member_get: prep(
                Kind::Read,
                "SELECT member FROM {ks}.members WHERE room_id = ? AND user_id = ?".into(),
            )
            .await?,
            user_rooms_list: prep(
                Kind::Read,
                "SELECT room_id FROM {ks}.user_rooms WHERE user_id = ?".into(),
            )
            .await?,
            marker_set: prep(
                Kind::Write,
                "INSERT INTO {ks}.read_markers (channel, user_id, msg_offset) VALUES (?, ?, ?) \
                 USING TIMESTAMP ?"
                    .into(),
            )
            .await?,
            marker_get: prep(
                Kind::Read,
                "SELECT msg_offset FROM {ks}.read_markers WHERE channel = ? AND user_id = ?".into(),
            )
            .await?,
            markers_list: prep(
                Kind::Read,
                "SELECT user_id, msg_offset FROM {ks}.read_markers WHERE channel = ?".into(),
            )
            .await?,
            notification_put: prep(
                Kind::Lwt,
                "INSERT INTO {ks}.notifications (user_id, id, body, is_read, expires_at) \
                 VALUES (?, ?, ?, ?, ?) IF NOT EXISTS USING TTL ?"
                    .into(),
            )
            .await?,
            notifications_all: prep(
                Kind::Read,
                "SELECT id, body, is_read, expires_at FROM {ks}.notifications WHERE user_id = ?".into(),
            )
            .await?,
            notifications_before: prep(
                Kind::Read,
                "SELECT id, body, is_read, expires_at FROM {ks}.notifications WHERE user_id = ? AND id < ?"
                    .into(),
            )
            .await?,
            notifications_by_id: prep(
                Kind::Read,
                "SELECT id, body, is_read, expires_at FROM {ks}.notifications WHERE user_id = ? AND id IN ?"
                    .into(),
            )
            .await?,
            notification_mark: prep(
                Kind::Write,
                "UPDATE {ks}.notifications USING TTL ? SET is_read = true WHERE user_id = ? AND id = ?".into(),
            )
            .await?,
            notification_flags: prep(
                Kind::Read,
                "SELECT id, is_read, expires_at FROM {ks}.notifications WHERE user_id = ?".into(),
            )
            .await?,
            prefs_put: prep(
                Kind::Write,
                "INSERT INTO {ks}.notification_prefs (user_id, prefs) VALUES (?, ?)".into(),
            )
            .await?,
            prefs_get: prep(
                Kind::Read,
                "SELECT prefs FROM {ks}.notification_prefs WHERE user_id = ?".into(),
            )
            .await?,
            seen_put: prep(
                Kind::Write,
                "INSERT INTO {ks}.last_seen (user_id, seen_at) VALUES (?, ?)".into(),
            )
            .await?,
            seen_get: prep(Kind::Read, "SELECT seen_at FROM {ks}.last_seen WHERE user_id = ?".into()).await?,
            doc_top_serial: prep(
                Kind::SerialRead,
                "SELECT top FROM {ks}.doc_updates WHERE doc = ? LIMIT 1".into(),
            )
            .await?,
            doc_cas: prep(
                Kind::Lwt,
                "UPDATE {ks}.doc_updates SET data = ?, top = ? WHERE doc = ? AND seq = ? IF top = ?"
                    .into(),
            )
            .await?,
            doc_updates_after: prep(
                Kind::Read,
                "SELECT seq, data FROM {ks}.doc_updates WHERE doc = ? AND seq > ?".into(),
            )
            .await?,
            doc_update_get_serial: prep(
                Kind::SerialRead,
                "SELECT data FROM {ks}.doc_updates WHERE doc = ? AND seq = ?".into(),
            )
            .await?,
            doc_snapshot_get: prep(
                Kind::Read,
                "SELECT seq, data FROM {ks}.doc_snapshots WHERE doc = ?".into(),
            )
            .await?,
            doc_snapshot_insert: prep(
                Kind::Lwt,
                "INSERT INTO {ks}.doc_snapshots (doc, seq, data) VALUES (?, ?, ?) IF NOT EXISTS".into(),
            )
            .await?,
            doc_snapshot_advance: prep(
                Kind::Lwt,
                "UPDATE {ks}.doc_snapshots SET seq = ?, data = ? WHERE doc = ? IF seq < ?".into(),
            )
            .await?,
            doc_trim: prep(
                Kind::Write,
                "DELETE FROM {ks}.doc_updates WHERE doc = ? AND seq <= ?".into(),
            )
            .await?,
            doc_drop_updates: prep(Kind::Write, "DELETE FROM {ks}.doc_updates WHERE doc = ?".into()).await?,
            doc_drop_snapshot: prep(Kind::Write, "DELETE FROM {ks}.doc_snapshots WHERE doc = ?".into()).await?,
        })
    }
}

async fn build_session(config: &ScyllaConfig) -> Result<Session> {
    let timeout = Duration::from_millis(config.request_timeout_ms);
    let mut policy = DefaultPolicy::builder().token_aware(true);
    if let Some(dc) = &config.datacenter {
        policy = policy
            .prefer_datacenter(dc.clone())
            .permit_dc_failover(false);
    }
    let profile = ExecutionProfile::builder()
        .consistency(parse_consistency(&config.read_consistency)?)
        .serial_consistency(Some(parse_serial(&config.serial_consistency)?))
        .request_timeout(Some(timeout))
        .load_balancing_policy(policy.build())
        .retry_policy(Arc::new(DefaultRetryPolicy::new()))
        .build();
    let mut builder = SessionBuilder::new()
        .known_nodes(&config.contact_points)
        .default_execution_profile_handle(profile.into_handle())
        .compression(Some(Compression::Lz4))
        .connection_timeout(timeout)
        // Only our keyspace's metadata: a shared cluster may hold many.
        .keyspaces_to_fetch([config.keyspace.clone()])
        // Writes from one node (a marker, then a newer marker) keep their order
        // whichever coordinator takes them.
        .timestamp_generator(Arc::new(MonotonicTimestampGenerator::new()));
    if let (Some(user), Some(password)) = (&config.username, &config.password) {
        builder = builder.user(user, password);
    }
    builder = tls::apply(builder, config)?;
    builder.build().await.map_err(new_session_error)
}

#[cfg(feature = "scylla-tls")]
mod tls {
    use std::sync::Arc;

    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    use scylla::client::session_builder::SessionBuilder;

    use super::ScyllaConfig;
    use crate::{Result, StorageError};

    fn bad(file: &std::path::Path, e: impl std::fmt::Display) -> StorageError {
        StorageError::internal(format!("[storage.scylla] TLS file {}: {e}", file.display()))
    }

    pub(super) fn apply(builder: SessionBuilder, config: &ScyllaConfig) -> Result<SessionBuilder> {
        let Some(ca) = &config.tls_ca_file else {
            return Ok(builder);
        };
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_file_iter(ca).map_err(|e| bad(ca, e))? {
            roots
                .add(cert.map_err(|e| bad(ca, e))?)
                .map_err(|e| bad(ca, e))?;
        }
        let tls = rustls::ClientConfig::builder().with_root_certificates(roots);
        let tls = match (&config.tls_cert_file, &config.tls_key_file) {
            (Some(cert), Some(key)) => {
                let chain = CertificateDer::pem_file_iter(cert)
                    .map_err(|e| bad(cert, e))?
                    .collect::<std::result::Result<Vec<_>, _>>()
                    .map_err(|e| bad(cert, e))?;
                let key_der = PrivateKeyDer::from_pem_file(key).map_err(|e| bad(key, e))?;
                tls.with_client_auth_cert(chain, key_der)
                    .map_err(|e| bad(key, e))?
            }
            _ => tls.with_no_client_auth(),
        };
        Ok(builder.tls_context(Some(Arc::new(tls))))
    }
}

#[cfg(not(feature = "scylla-tls"))]
mod tls {
    use scylla::client::session_builder::SessionBuilder;

    use super::ScyllaConfig;
    use crate::{Result, StorageError};

    pub(super) fn apply(builder: SessionBuilder, config: &ScyllaConfig) -> Result<SessionBuilder> {
        if config.tls_ca_file.is_some() || config.tls_cert_file.is_some() {
            return Err(StorageError::internal(
                "[storage.scylla] TLS is configured but this build lacks the `scylla-tls` feature",
            ));
        }
        Ok(builder)
    }
}

/// Most channels whose existence this node remembers (channels are never
/// deleted, so a channel seen once exists forever).
const KNOWN_CHANNELS: usize = 100_000;

/// The ScyllaDB / Cassandra store. See the module docs for the model.
pub struct ScyllaStore {
    session: Session,
    st: Statements,
    bucket_size: u64,
    in_flight: Semaphore,
    timeout: Duration,
    locks: KeyLocks,
    known_channels: parking_lot::Mutex<HashSet<String>>,
}

/// What a conditional append did.
enum Cas {
    Applied,
    /// Not applied; the partition's `top` at that moment (`None`: empty partition).
    Taken(Option<i64>),
}

impl ScyllaStore {
    /// Connects, runs pending migrations when `migrate_on_start` (otherwise
    /// checks the schema is current) and prepares every statement.
    pub async fn connect(config: &ScyllaConfig) -> Result<ScyllaStore> {
        config.validate()?;
        let session = build_session(config).await?;
        if config.migrate_on_start {
            run_migrations(&session, config).await?;
        } else {
            let applied = applied_versions(&session, config).await.map_err(|e| {
                StorageError::new(
                    e.kind,
                    format!(
                        "keyspace {} has no Chorus schema ({}): run `chorus migrate`",
                        config.keyspace, e.message
                    ),
                )
            })?;
            if !pending(&applied).is_empty() {
                return Err(StorageError::internal(format!(
                    "keyspace {} is at schema version {}, this node needs {SCHEMA_VERSION}: run `chorus migrate`",
                    config.keyspace,
                    schema_version(&applied)
                )));
            }
        }
        let st = Statements::prepare(&session, config).await?;
        Ok(ScyllaStore {
            session,
            st,
            bucket_size: config.bucket_size,
            in_flight: Semaphore::new(config.max_in_flight),
            timeout: Duration::from_millis(config.request_timeout_ms),
            locks: KeyLocks::default(),
            known_channels: parking_lot::Mutex::new(HashSet::new()),
        })
    }

    /// The driver session, for tools and tests that need raw CQL.
    pub fn session(&self) -> &Session {
        &self.session
    }

    async fn permit(&self) -> Result<SemaphorePermit<'_>> {
        match tokio::time::timeout(self.timeout, self.in_flight.acquire()).await {
            Ok(Ok(permit)) => Ok(permit),
            Ok(Err(_)) => Err(StorageError::internal("scylla: request semaphore closed")),
            Err(_) => Err(StorageError::unavailable(
                "scylla: too many storage requests in flight (max_in_flight)",
            )),
        }
    }

    /// Runs a statement with its error left unmapped (for lightweight
    /// transactions, whose errors may leave the outcome unknown).
    async fn exec_raw(
        &self,
        st: &PreparedStatement,
        values: impl SerializeRow,
    ) -> Result<std::result::Result<QueryResult, ExecutionError>> {
        let _permit = self.permit().await?;
        Ok(self.session.execute_unpaged(st, values).await)
    }

    async fn exec(&self, st: &PreparedStatement, values: impl SerializeRow) -> Result<QueryResult> {
        self.exec_raw(st, values).await?.map_err(exec_error)
    }

    async fn batch_raw<V: SerializeRow>(
        &self,
        batch: &Batch,
        values: &[V],
    ) -> Result<std::result::Result<QueryResult, ExecutionError>> {
        let _permit = self.permit().await?;
        Ok(self.session.batch(batch, values).await)
    }

    /// Builds a batch of `st` repeated `n` times, with `st`'s settings.
    fn batch_of(&self, kind: BatchType, parts: &[&PreparedStatement]) -> Batch {
        let mut batch = Batch::new(kind);
        for st in parts {
            batch.append_statement((*st).clone());
        }
        if let Some(first) = parts.first() {
            if let Some(c) = first.get_consistency() {
                batch.set_consistency(c);
            }
            batch.set_serial_consistency(first.get_serial_consistency());
            batch.set_is_idempotent(parts.iter().all(|st| st.get_is_idempotent()));
        }
        batch
    }

    /// The first row, if any.
    async fn one<R>(&self, st: &PreparedStatement, values: impl SerializeRow) -> Result<Option<R>>
    where
        R: for<'f, 'm> DeserializeRow<'f, 'm>,
    {
        let rows = self
            .exec(st, values)
            .await?
            .into_rows_result()
            .map_err(corrupt)?;
        rows.maybe_first_row::<R>().map_err(corrupt)
    }

    /// Every row of a statement bounded by a `LIMIT`.
    async fn all<R>(&self, st: &PreparedStatement, values: impl SerializeRow) -> Result<Vec<R>>
    where
        R: for<'f, 'm> DeserializeRow<'f, 'm>,
    {
        let rows = self
            .exec(st, values)
            .await?
            .into_rows_result()
            .map_err(corrupt)?;
        let mut out = Vec::with_capacity(rows.rows_num());
        for row in rows.rows::<R>().map_err(corrupt)? {
            out.push(row.map_err(corrupt)?);
        }
        Ok(out)
    }

    /// Visits the rows of a statement page by page until `visit` breaks.
    async fn scan<R, V>(
        &self,
        st: &PreparedStatement,
        values: &V,
        mut visit: impl FnMut(R) -> Result<ControlFlow<()>>,
    ) -> Result<()>
    where
        R: for<'f, 'm> DeserializeRow<'f, 'm>,
        V: SerializeRow,
    {
        let mut paging = PagingState::start();
        loop {
            let (result, next) = {
                let _permit = self.permit().await?;
                self.session
                    .execute_single_page(st, values, paging)
                    .await
                    .map_err(exec_error)?
            };
            let rows = result.into_rows_result().map_err(corrupt)?;
            for row in rows.rows::<R>().map_err(corrupt)? {
                if visit(row.map_err(corrupt)?)?.is_break() {
                    return Ok(());
                }
            }
            match next.into_paging_control_flow() {
                ControlFlow::Break(()) => return Ok(()),
                ControlFlow::Continue(state) => paging = state,
            }
        }
    }

    // ---- channels ----

    fn bucket(&self, offset: u64) -> u64 {
        offset / self.bucket_size
    }

    /// The last offset of bucket `b`'s own range.
    fn bucket_end(&self, b: u64) -> u64 {
        b.saturating_mul(self.bucket_size)
            .saturating_add(self.bucket_size - 1)
    }

    async fn channel_row(&self, channel: &str) -> Result<Option<(String, u64)>> {
        let row: Option<(Option<String>, Option<i64>)> =
            self.one(&self.st.channel_get, (channel,)).await?;
        match row {
            Some((Some(epoch), hint)) => {
                Ok(Some((epoch, to_u64(hint.unwrap_or(0), "head bucket")?)))
            }
            _ => Ok(None),
        }
    }

    /// `NotFound` unless the channel was created (remembered once seen).
    async fn ensure_channel(&self, channel: &str) -> Result<()> {
        if self.known_channels.lock().contains(channel) {
            return Ok(());
        }
        if self.channel_row(channel).await?.is_none() {
            return Err(StorageError::not_found(format!(
                "channel {channel} does not exist"
            )));
        }
        self.remember(channel);
        Ok(())
    }

    fn remember(&self, channel: &str) {
        let mut known = self.known_channels.lock();
        if known.len() >= KNOWN_CHANNELS {
            known.clear();
        }
        known.insert(channel.to_string());
    }

    /// `(top, top_seq)` of one partition, `None` when it is empty.
    async fn top(&self, channel: &str, bucket: u64, serial: bool) -> Result<Option<(u64, u64)>> {
        let st = if serial {
            &self.st.top_get_serial
        } else {
            &self.st.top_get
        };
        let row: Option<(Option<i64>, Option<i64>)> =
            self.one(st, (channel, to_i64(bucket, "bucket")?)).await?;
        match row {
            Some((Some(top), seq)) => Ok(Some((
                to_u64(top, "top")?,
                to_u64(seq.unwrap_or(0), "top_seq")?,
            ))),
            _ => Ok(None),
        }
    }

    /// The newest `(offset, msg_seq)`, walking up from the hinted bucket. A
    /// partition whose `top` is below its bucket's end is the last one: the
    /// next can only start once this bucket's range is complete.
    async fn find_head(&self, channel: &str, hint: u64) -> Result<(u64, u64)> {
        let mut bucket = hint;
        let mut head = (0, 0);
        while let Some((top, seq)) = self.top(channel, bucket, false).await? {
            head = (top, seq);
            if top < self.bucket_end(bucket) {
                break;
            }
            bucket += 1;
        }
        Ok(head)
    }

    /// Records the client ids of an append with the append's `writer` id,
    /// which [`Store::find_client_id`] checks against the stored entry.
    async fn record_client_ids(&self, channel: &str, entries: &[Entry], writer: i64) -> Result<()> {
        let writes = entries.iter().filter_map(|e| {
            let cid = crate::client_key(e.sender.as_deref(), e.client_id.as_deref()?);
            Some(async move {
                let offset = to_i64(e.offset, "offset")?;
                self.exec(&self.st.client_id_put, (channel, cid, offset, writer))
                    .await
                    .map(|_| ())
            })
        });
        futures::future::try_join_all(writes).await.map(|_| ())
    }

    /// One conditional write of the whole append into partition `bucket`.
    async fn cas_append(
        &self,
        channel: &str,
        bucket: u64,
        expected_top: Option<u64>,
        entries: &[Entry],
        encoded: &[Vec<u8>],
        writer: i64,
    ) -> Result<Cas> {
        let last = entries
            .last()
            .ok_or_else(|| StorageError::internal("empty append"))?;
        let bucket_i = to_i64(bucket, "bucket")?;
        let top = to_i64(last.offset, "offset")?;
        let top_seq = to_i64(last.msg_seq, "msg_seq")?;
        let expected = expected_top.map(|t| to_i64(t, "offset")).transpose()?;
        let mut values = Vec::with_capacity(entries.len());
        for (e, bytes) in entries.iter().zip(encoded) {
            let offset = to_i64(e.offset, "offset")?;
            values.push((
                bytes.as_slice(),
                writer,
                top,
                top_seq,
                channel,
                bucket_i,
                offset,
                expected,
            ));
        }
        let outcome = if values.len() == 1 {
            self.exec_raw(&self.st.entry_cas, &values[0]).await?
        } else {
            // One partition: the batch is one Paxos round, atomic and isolated.
            let parts = vec![&self.st.entry_cas; values.len()];
            let batch = self.batch_of(BatchType::Unlogged, &parts);
            self.batch_raw(&batch, &values).await?
        };
        match outcome {
            Ok(result) => {
                let (applied, current) = lwt_applied(result)?;
                Ok(if applied {
                    Cas::Applied
                } else {
                    Cas::Taken(bigint(&current, "top"))
                })
            }
            Err(e) => {
                // Timeouts and broken connections leave the outcome unknown. A
                // SERIAL read completes any round still in flight and shows
                // whose write holds the first offset.
                let first = to_i64(entries[0].offset, "offset")?;
                let seen: Option<(Option<i64>,)> = match self
                    .one(&self.st.writer_get_serial, (channel, bucket_i, first))
                    .await
                {
                    Ok(seen) => seen,
                    Err(_) => return Err(exec_error(e)),
                };
                match seen {
                    Some((Some(w),)) if w == writer => Ok(Cas::Applied),
                    Some(_) => Ok(Cas::Taken(Some(first))),
                    None => Err(exec_error(e)),
                }
            }
        }
    }

    /// Moves the newest-bucket hint forward; a lost update only costs a
    /// longer walk in [`Self::find_head`].
    async fn advance_hint(&self, channel: &str, bucket: u64) {
        let Ok(b) = to_i64(bucket, "bucket") else {
            return;
        };
        match self.exec(&self.st.channel_hint, (b, channel, b)).await {
            Ok(_) => {}
            Err(e) => tracing::debug!(channel, bucket, "head bucket hint not updated: {e}"),
        }
    }

    /// Rows of partition `bucket` with `from <= offset <= to`, oldest first.
    async fn rows_asc(
        &self,
        channel: &str,
        bucket: u64,
        from: u64,
        to: u64,
        limit: usize,
    ) -> Result<Vec<Entry>> {
        let rows: Vec<(i64, Option<Vec<u8>>)> = self
            .all(
                &self.st.entries_asc,
                (
                    channel,
                    to_i64(bucket, "bucket")?,
                    to_i64(from, "offset")?,
                    to_i64(to, "offset")?,
                    limit as i32,
                ),
            )
            .await?;
        rows.into_iter().map(decode_entry).collect()
    }

    /// Rows of partition `bucket` with `offset < before`, newest first.
    async fn rows_desc(
        &self,
        channel: &str,
        bucket: u64,
        before: u64,
        limit: usize,
    ) -> Result<Vec<Entry>> {
        let rows: Vec<(i64, Option<Vec<u8>>)> = self
            .all(
                &self.st.entries_before,
                (
                    channel,
                    to_i64(bucket, "bucket")?,
                    to_i64(before, "offset")?,
                    limit as i32,
                ),
            )
            .await?;
        rows.into_iter().map(decode_entry).collect()
    }

    /// The `writer` id of the append that stored `offset`, if it is stored.
    async fn locate_writer(&self, channel: &str, offset: u64) -> Result<Option<i64>> {
        let Ok(o) = to_i64(offset, "offset") else {
            return Ok(None);
        };
        let bucket = self.bucket(offset);
        for b in [Some(bucket), bucket.checked_sub(1)].into_iter().flatten() {
            let row: Option<(Option<i64>,)> = self
                .one(&self.st.writer_get, (channel, to_i64(b, "bucket")?, o))
                .await?;
            if let Some((writer,)) = row {
                return Ok(writer);
            }
        }
        Ok(None)
    }

    /// Where `offset` is stored: its bucket, or the previous one's spill.
    async fn locate(&self, channel: &str, offset: u64) -> Result<Option<Entry>> {
        let Ok(o) = to_i64(offset, "offset") else {
            return Ok(None);
        };
        let bucket = self.bucket(offset);
        for b in [Some(bucket), bucket.checked_sub(1)].into_iter().flatten() {
            let row: Option<(i64, Option<Vec<u8>>)> = self
                .one(&self.st.entry_get, (channel, to_i64(b, "bucket")?, o))
                .await?;
            if let Some(row) = row {
                return decode_entry(row).map(Some);
            }
        }
        Ok(None)
    }

    async fn notification_rows(
        &self,
        user: &str,
        before: Option<u64>,
        mut visit: impl FnMut(Notification) -> ControlFlow<()>,
    ) -> Result<()> {
        let on_row = |row: NotificationRow| -> Result<ControlFlow<()>> {
            Ok(match notification_from_row(row)? {
                Some(n) => visit(n),
                None => ControlFlow::Continue(()),
            })
        };
        // Ids above the stored range bound nothing.
        match before.and_then(|b| i64::try_from(b).ok()) {
            Some(b) => {
                self.scan(&self.st.notifications_before, &(user, b), on_row)
                    .await
            }
            None => {
                self.scan(&self.st.notifications_all, &(user,), on_row)
                    .await
            }
        }
    }
}

type NotificationRow = (i64, Option<Vec<u8>>, Option<bool>, Option<i64>);

/// A stored notification; `None` for a row whose body already expired.
fn notification_from_row((id, body, read, _): NotificationRow) -> Result<Option<Notification>> {
    let Some(body) = body else { return Ok(None) };
    let mut n: Notification = decode(&body, "notification")?;
    if n.id != to_u64(id, "notification id")? {
        return Err(StorageError::corrupt(format!(
            "notification {id} holds id {}",
            n.id
        )));
    }
    n.read = read.unwrap_or(false);
    Ok(Some(n))
}

fn decode_entry((offset, bytes): (i64, Option<Vec<u8>>)) -> Result<Entry> {
    let bytes =
        bytes.ok_or_else(|| StorageError::corrupt(format!("entry {offset} has no body")))?;
    let entry: Entry = decode(&bytes, "entry")?;
    if entry.offset != to_u64(offset, "offset")? {
        return Err(StorageError::corrupt(format!(
            "row {offset} holds entry {}",
            entry.offset
        )));
    }
    Ok(entry)
}

/// Seconds until `expires_at` by this node's clock, for `USING TTL`
/// (0 = never). Reads still filter by the caller's `now`; TTL only lets the
/// database drop what no read would return. `floor` rounds down so a cell
/// rewritten later never outlives the row it belongs to.
fn ttl_secs(expires_at: Option<Millis>, floor: bool) -> i32 {
    const MAX_TTL: i64 = 630_720_000; // Cassandra's limit: 20 years.
    let Some(at) = expires_at else { return 0 };
    let left = at.saturating_sub(chorus_protocol::now_ms());
    let secs = if floor {
        left.div_euclid(1000)
    } else {
        left.saturating_add(999).div_euclid(1000)
    };
    secs.clamp(1, MAX_TTL) as i32
}

fn expired(expires_at: Option<i64>, now: Millis) -> bool {
    expires_at.is_some_and(|e| e <= now)
}

#[async_trait::async_trait]
impl crate::Store for ScyllaStore {
    async fn channel_head(&self, channel: &str) -> Result<Option<ChannelHead>> {
        let Some((epoch, hint)) = self.channel_row(channel).await? else {
            return Ok(None);
        };
        self.remember(channel);
        let (offset, msg_seq) = self.find_head(channel, hint).await?;
        Ok(Some(ChannelHead {
            epoch,
            offset,
            msg_seq,
        }))
    }

    async fn create_channel(&self, channel: &str, epoch: &str) -> Result<ChannelHead> {
        let _local = self.locks.lock(channel).await;
        match self
            .exec_raw(&self.st.channel_create, (channel, epoch))
            .await?
        {
            Ok(result) => {
                if lwt_applied(result)?.0 {
                    self.remember(channel);
                    return Ok(ChannelHead {
                        epoch: epoch.to_string(),
                        offset: 0,
                        msg_seq: 0,
                    });
                }
            }
            Err(e) => {
                // Unknown outcome: whichever epoch is stored now is the channel's.
                tracing::debug!(channel, "create_channel outcome unknown: {e}");
            }
        }
        self.channel_head(channel).await?.ok_or_else(|| {
            StorageError::unavailable(format!(
                "creating channel {channel} did not complete; retry"
            ))
        })
    }

    async fn append(&self, channel: &str, entries: &[Entry]) -> Result<()> {
        let Some(first) = entries.first() else {
            return Ok(());
        };
        let o1 = first.offset;
        if o1 == 0 {
            return Err(StorageError::conflict("offsets start at 1"));
        }
        for (i, e) in entries.iter().enumerate() {
            let expected = o1.saturating_add(i as u64);
            if e.offset != expected {
                return Err(StorageError::conflict(format!(
                    "offsets must be consecutive: entry {i} has offset {}, not {expected}",
                    e.offset
                )));
            }
        }
        if entries.len() as u64 > self.bucket_size {
            return Err(StorageError::corrupt(format!(
                "an append carries at most bucket_size ({}) entries, got {}",
                self.bucket_size,
                entries.len()
            )));
        }
        let encoded = entries.iter().map(encode).collect::<Result<Vec<_>>>()?;
        let writer: i64 = rand::random();

        let _local = self.locks.lock(channel).await;
        self.ensure_channel(channel).await?;
        // Before the entries, so an acknowledged entry always has its client
        // id recorded; a lookup checks the entry, so ids of a refused append
        // lead nowhere.
        self.record_client_ids(channel, entries, writer).await?;

        let bucket = self.bucket(o1);
        let taken = |top: Option<i64>| {
            StorageError::conflict(match top {
                Some(top) => {
                    format!("channel {channel}: offset {o1} does not follow the head {top}")
                }
                None => format!("channel {channel}: offset {o1} does not follow the head"),
            })
        };
        // The previous partition must end right before us before we open a new one.
        let previous_ends_before = |bucket: u64| async move {
            match bucket.checked_sub(1) {
                None => Ok::<bool, StorageError>(o1 == 1),
                Some(prev) => Ok(self.top(channel, prev, true).await?.map(|t| t.0) == Some(o1 - 1)),
            }
        };
        let opens_partition = o1 == 1 || o1 == bucket.saturating_mul(self.bucket_size);
        if opens_partition {
            if !previous_ends_before(bucket).await? {
                return Err(taken(None));
            }
            match self
                .cas_append(channel, bucket, None, entries, &encoded, writer)
                .await?
            {
                Cas::Applied => {}
                Cas::Taken(top) => return Err(taken(top)),
            }
            if bucket > 0 {
                self.advance_hint(channel, bucket).await;
            }
            return Ok(());
        }
        match self
            .cas_append(channel, bucket, Some(o1 - 1), entries, &encoded, writer)
            .await?
        {
            Cas::Applied => Ok(()),
            Cas::Taken(Some(top)) => Err(taken(Some(top))),
            Cas::Taken(None) => {
                // Our bucket is empty: the previous one's last append spilled
                // past its end and must end right before us.
                if !previous_ends_before(bucket).await? {
                    return Err(taken(None));
                }
                match self
                    .cas_append(channel, bucket, None, entries, &encoded, writer)
                    .await?
                {
                    Cas::Applied => {
                        self.advance_hint(channel, bucket).await;
                        Ok(())
                    }
                    Cas::Taken(top) => Err(taken(top)),
                }
            }
        }
    }

    async fn read_range(
        &self,
        channel: &str,
        from: u64,
        to: u64,
        limit: usize,
    ) -> Result<Vec<Entry>> {
        let limit = limit.min(MAX_PAGE);
        let from = from.max(1);
        let to = to.min(i64::MAX as u64);
        if limit == 0 || from > to {
            return Ok(Vec::new());
        }
        let mut bucket = self.bucket(from);
        let mut out = self.rows_asc(channel, bucket, from, to, limit).await?;
        // The start of the range may be the previous partition's spill.
        if bucket > 0 && out.first().is_none_or(|e| e.offset > from) {
            let spill_to = out.first().map_or(to, |e| e.offset - 1);
            let mut spill = self
                .rows_asc(channel, bucket - 1, from, spill_to, limit)
                .await?;
            spill.append(&mut out);
            out = spill;
            out.truncate(limit);
        }
        loop {
            let next = match out.last() {
                Some(e) => e.offset + 1,
                None => return Ok(out),
            };
            // A partition whose rows stop before its bucket's end is the last one.
            if out.len() >= limit || next > to || next <= self.bucket_end(bucket) {
                return Ok(out);
            }
            bucket += 1;
            let mut more = self
                .rows_asc(channel, bucket, next, to, limit - out.len())
                .await?;
            if more.is_empty() {
                return Ok(out);
            }
            out.append(&mut more);
        }
    }

    async fn read_before(&self, channel: &str, before: u64, limit: usize) -> Result<Vec<Entry>> {
        let limit = limit.min(MAX_PAGE);
        let mut upper = before.min(i64::MAX as u64);
        if limit == 0 || upper <= 1 {
            return Ok(Vec::new());
        }
        let mut bucket = self.bucket(upper - 1);
        let mut out: Vec<Entry> = Vec::new();
        let mut head_checked = false;
        loop {
            let rows = self
                .rows_desc(channel, bucket, upper, limit - out.len())
                .await?;
            if rows.is_empty() && out.is_empty() && !head_checked {
                // `before` may lie far past the head (u64::MAX asks for the
                // newest page): start from the head's bucket instead.
                head_checked = true;
                let Some((_, hint)) = self.channel_row(channel).await? else {
                    return Ok(out);
                };
                let (head, _) = self.find_head(channel, hint).await?;
                if head == 0 {
                    return Ok(out);
                }
                if head < upper - 1 {
                    upper = head + 1;
                    bucket = self.bucket(head);
                    continue;
                }
            }
            if let Some(oldest) = rows.last() {
                upper = oldest.offset;
            }
            out.extend(rows);
            if out.len() >= limit || bucket == 0 || upper <= 1 {
                break;
            }
            bucket -= 1;
        }
        out.reverse();
        Ok(out)
    }

    async fn get_entry(&self, channel: &str, offset: u64) -> Result<Option<Entry>> {
        self.locate(channel, offset).await
    }

    async fn update_entry(&self, channel: &str, entry: &Entry) -> Result<()> {
        let bytes = encode(entry)?;
        let not_found =
            || StorageError::not_found(format!("channel {channel} has no entry {}", entry.offset));
        let Ok(offset) = to_i64(entry.offset, "offset") else {
            return Err(not_found());
        };
        let bucket = self.bucket(entry.offset);
        for b in [Some(bucket), bucket.checked_sub(1)].into_iter().flatten() {
            let values = (bytes.as_slice(), channel, to_i64(b, "bucket")?, offset);
            let result = self.exec(&self.st.entry_update, values).await?;
            if lwt_applied(result)?.0 {
                return Ok(());
            }
        }
        Err(not_found())
    }

    async fn find_client_id(
        &self,
        channel: &str,
        sender: Option<&str>,
        client_id: &str,
    ) -> Result<Option<u64>> {
        let key = crate::client_key(sender, client_id);
        let row: Option<(Option<i64>, Option<i64>)> = self
            .one(&self.st.client_id_get, (channel, key.as_str()))
            .await?;
        let Some((Some(offset), Some(writer))) = row else {
            return Ok(None);
        };
        let offset = to_u64(offset, "offset")?;
        // Recorded before the append: only the entry written by the same
        // append call (same writer id) proves it landed. Edits keep the id.
        match self.locate_writer(channel, offset).await? {
            Some(stored) if stored == writer => Ok(Some(offset)),
            _ => Ok(None),
        }
    }

    async fn create_room(&self, room: &RoomInfo) -> Result<bool> {
        let info = encode(room)?;
        let _local = self.locks.lock(&format!("\u{0}room:{}", room.id)).await;
        match self
            .exec_raw(&self.st.room_create, (&room.id, info.as_slice()))
            .await?
        {
            Ok(result) => Ok(lwt_applied(result)?.0),
            Err(e) => {
                // Unknown outcome: ours if the stored room is byte for byte ours.
                let seen: Option<(Option<Vec<u8>>,)> = self
                    .one(&self.st.room_get_serial, (&room.id,))
                    .await
                    .map_err(|_| exec_error(e))?;
                match seen {
                    Some((Some(stored),)) => Ok(stored == info),
                    _ => Err(StorageError::unavailable(format!(
                        "creating room {} did not complete; retry",
                        room.id
                    ))),
                }
            }
        }
    }

    async fn get_room(&self, room: &str) -> Result<Option<RoomInfo>> {
        let row: Option<(Option<Vec<u8>>,)> = self.one(&self.st.room_get, (room,)).await?;
        row.and_then(|(info,)| info)
            .map(|b| decode(&b, "room"))
            .transpose()
    }

    async fn put_member(&self, room: &str, member: &Member) -> Result<()> {
        let bytes = encode(member)?;
        let batch = self.batch_of(
            BatchType::Logged,
            &[&self.st.member_put, &self.st.user_room_put],
        );
        let _permit = self.permit().await?;
        self.session
            .batch(
                &batch,
                ((room, &member.user, bytes.as_slice()), (&member.user, room)),
            )
            .await
            .map_err(exec_error)?;
        Ok(())
    }

    async fn remove_member(&self, room: &str, user: &str) -> Result<()> {
        let batch = self.batch_of(
            BatchType::Logged,
            &[&self.st.member_delete, &self.st.user_room_delete],
        );
        let _permit = self.permit().await?;
        self.session
            .batch(&batch, ((room, user), (user, room)))
            .await
            .map_err(exec_error)?;
        Ok(())
    }

    async fn members(&self, room: &str) -> Result<Vec<Member>> {
        let mut out = Vec::new();
        self.scan(
            &self.st.members_list,
            &(room,),
            |(bytes,): (Option<Vec<u8>>,)| {
                if let Some(bytes) = bytes {
                    out.push(decode(&bytes, "member")?);
                }
                Ok(ControlFlow::Continue(()))
            },
        )
        .await?;
        Ok(out)
    }

    async fn get_member(&self, room: &str, user: &str) -> Result<Option<Member>> {
        let row: Option<(Option<Vec<u8>>,)> = self.one(&self.st.member_get, (room, user)).await?;
        row.and_then(|(m,)| m)
            .map(|b| decode(&b, "member"))
            .transpose()
    }

    async fn user_rooms(&self, user: &str) -> Result<Vec<String>> {
        let mut out = Vec::new();
        self.scan(&self.st.user_rooms_list, &(user,), |(room,): (String,)| {
            out.push(room);
            Ok(ControlFlow::Continue(()))
        })
        .await?;
        Ok(out)
    }

    async fn set_read_marker(&self, channel: &str, user: &str, offset: u64) -> Result<()> {
        // The write timestamp is the offset (above any wall-clock one, which
        // markers written before this rule carry): of two writers the higher
        // offset wins in whatever order they land, with no read first.
        let offset = to_i64(offset, "offset")?;
        let timestamp = MARKER_TIMESTAMP_BASE
            .checked_add(offset)
            .ok_or_else(|| StorageError::internal("read marker offset too large"))?;
        self.exec(&self.st.marker_set, (channel, user, offset, timestamp))
            .await
            .map(|_| ())
    }

    async fn read_marker(&self, channel: &str, user: &str) -> Result<Option<u64>> {
        let row: Option<(Option<i64>,)> = self.one(&self.st.marker_get, (channel, user)).await?;
        row.and_then(|(o,)| o)
            .map(|o| to_u64(o, "read marker"))
            .transpose()
    }

    async fn read_markers(&self, channel: &str) -> Result<Vec<(String, u64)>> {
        let mut out = Vec::new();
        self.scan(
            &self.st.markers_list,
            &(channel,),
            |(user, offset): (String, Option<i64>)| {
                if let Some(offset) = offset {
                    out.push((user, to_u64(offset, "read marker")?));
                }
                Ok(ControlFlow::Continue(()))
            },
        )
        .await?;
        Ok(out)
    }

    async fn put_notification(&self, n: &Notification) -> Result<bool> {
        let body = encode(n)?;
        let values = (
            &n.user,
            to_i64(n.id, "notification id")?,
            body.as_slice(),
            n.read,
            // Unset, not null: a null would write a tombstone into every row.
            n.expires_at.map_or(MaybeUnset::Unset, MaybeUnset::Set),
            ttl_secs(n.expires_at, false),
        );
        let result = self.exec(&self.st.notification_put, values).await?;
        Ok(lwt_applied(result)?.0)
    }

    async fn list_notifications(
        &self,
        user: &str,
        before: Option<u64>,
        limit: usize,
        unread_only: bool,
        now: Millis,
    ) -> Result<Vec<Notification>> {
        let limit = limit.min(MAX_PAGE);
        let mut out = Vec::new();
        if limit == 0 {
            return Ok(out);
        }
        self.notification_rows(user, before, |n| {
            if !(n.expired(now) || unread_only && n.read) {
                out.push(n);
            }
            if out.len() >= limit {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            }
        })
        .await?;
        Ok(out)
    }

    async fn mark_notifications_read(
        &self,
        user: &str,
        ids: Option<&[u64]>,
        now: Millis,
    ) -> Result<Vec<u64>> {
        // (id, expires_at) of every unread, unexpired target.
        let mut targets: Vec<(i64, Option<i64>)> = Vec::new();
        let mut consider =
            |(id, body_present, read, expires_at): (i64, bool, Option<bool>, Option<i64>)| {
                if body_present && read != Some(true) && !expired(expires_at, now) {
                    targets.push((id, expires_at));
                }
            };
        match ids {
            Some(ids) => {
                let mut wanted: Vec<i64> = ids
                    .iter()
                    .filter_map(|&id| i64::try_from(id).ok())
                    .collect();
                wanted.sort_unstable();
                wanted.dedup();
                for chunk in wanted.chunks(MAX_PAGE) {
                    let rows: Vec<NotificationRow> = self
                        .all(&self.st.notifications_by_id, (user, chunk.to_vec()))
                        .await?;
                    for (id, body, read, expires_at) in rows {
                        consider((id, body.is_some(), read, expires_at));
                    }
                }
            }
            None => {
                self.scan(
                    &self.st.notification_flags,
                    &(user,),
                    |(id, read, expires_at): (i64, Option<bool>, Option<i64>)| {
                        // A row whose flag outlived its body reads as read: skipped.
                        consider((id, true, read, expires_at));
                        Ok(ControlFlow::Continue(()))
                    },
                )
                .await?;
            }
        }
        let marks = targets.iter().map(|&(id, expires_at)| async move {
            self.exec(
                &self.st.notification_mark,
                (ttl_secs(expires_at, true), user, id),
            )
            .await?;
            to_u64(id, "notification id")
        });
        futures::future::try_join_all(marks).await
    }

    async fn unread_notifications(&self, user: &str, now: Millis) -> Result<u64> {
        let mut unread = 0u64;
        self.scan(
            &self.st.notification_flags,
            &(user,),
            |(_, read, expires_at): (i64, Option<bool>, Option<i64>)| {
                if read == Some(false) && !expired(expires_at, now) {
                    unread += 1;
                }
                Ok(ControlFlow::Continue(()))
            },
        )
        .await?;
        Ok(unread)
    }

    async fn purge_expired(&self, _now: Millis) -> Result<u64> {
        // `USING TTL` expires notifications in the database itself.
        Ok(0)
    }

    async fn get_prefs(&self, user: &str) -> Result<Option<NotificationPrefs>> {
        let row: Option<(Option<Vec<u8>>,)> = self.one(&self.st.prefs_get, (user,)).await?;
        row.and_then(|(p,)| p)
            .map(|b| decode(&b, "preferences"))
            .transpose()
    }

    async fn put_prefs(&self, user: &str, prefs: &NotificationPrefs) -> Result<()> {
        let bytes = encode(prefs)?;
        self.exec(&self.st.prefs_put, (user, bytes.as_slice()))
            .await
            .map(|_| ())
    }

    async fn set_last_seen(&self, user: &str, at: Millis) -> Result<()> {
        self.exec(&self.st.seen_put, (user, at)).await.map(|_| ())
    }

    async fn last_seen(&self, user: &str) -> Result<Option<Millis>> {
        let row: Option<(Option<i64>,)> = self.one(&self.st.seen_get, (user,)).await?;
        Ok(row.and_then(|(at,)| at))
    }

    async fn doc_load(&self, doc: &str) -> Result<Option<DocRecord>> {
        let snapshot: Option<(Option<i64>, Option<Vec<u8>>)> =
            self.one(&self.st.doc_snapshot_get, (doc,)).await?;
        let (snapshot_seq, snapshot) = match snapshot {
            Some((seq, data)) => (
                to_u64(seq.unwrap_or(0), "seq")?,
                Some(data.unwrap_or_default()),
            ),
            None => (0, None),
        };
        let mut updates = Vec::new();
        let mut bad = None;
        let after = to_i64(snapshot_seq, "seq")?;
        self.scan(
            &self.st.doc_updates_after,
            &(doc, after),
            |(seq, data): (Option<i64>, Option<Vec<u8>>)| {
                // A partition trimmed to its static `top` has no rows to show.
                let Some(seq) = seq else {
                    return Ok(ControlFlow::Continue(()));
                };
                match to_u64(seq, "seq") {
                    Ok(seq) => updates.push(DocUpdate {
                        seq,
                        data: data.unwrap_or_default(),
                    }),
                    Err(e) => {
                        bad = Some(e);
                        return Ok(ControlFlow::Break(()));
                    }
                }
                Ok(ControlFlow::Continue(()))
            },
        )
        .await?;
        if let Some(e) = bad {
            return Err(e);
        }
        if snapshot.is_none() && updates.is_empty() {
            return Ok(None);
        }
        Ok(Some(DocRecord {
            snapshot,
            snapshot_seq,
            updates,
        }))
    }

    async fn doc_append(&self, doc: &str, updates: &[DocUpdate]) -> Result<()> {
        let (Some(first), Some(last)) = (updates.first(), updates.last()) else {
            return Ok(());
        };
        for (i, u) in updates.iter().enumerate() {
            if u.seq != first.seq.saturating_add(i as u64) || u.seq == 0 {
                return Err(StorageError::conflict(format!(
                    "document {doc}: seqs must be consecutive from 1"
                )));
            }
        }
        let top = to_i64(last.seq, "seq")?;
        // The first seq of a document (or after a delete) expects no `top`.
        let expected = match first.seq {
            1 => None,
            s => Some(to_i64(s - 1, "seq")?),
        };
        let mut values = Vec::with_capacity(updates.len());
        for u in updates {
            values.push((u.data.as_slice(), top, doc, to_i64(u.seq, "seq")?, expected));
        }
        let _local = self.locks.lock(&format!("doc\0{doc}")).await;
        let outcome = if values.len() == 1 {
            self.exec_raw(&self.st.doc_cas, &values[0]).await?
        } else {
            // One partition: one Paxos round, atomic and isolated.
            let parts = vec![&self.st.doc_cas; values.len()];
            let batch = self.batch_of(BatchType::Unlogged, &parts);
            self.batch_raw(&batch, &values).await?
        };
        let conflict = |top: Option<i64>| {
            StorageError::conflict(format!(
                "document {doc}: seq {} does not follow the head {}",
                first.seq,
                top.map_or("(none)".to_string(), |t| t.to_string())
            ))
        };
        match outcome {
            Ok(result) => {
                let (applied, current) = lwt_applied(result)?;
                if applied {
                    Ok(())
                } else {
                    Err(conflict(bigint(&current, "top")))
                }
            }
            Err(e) => {
                // Unknown outcome: a SERIAL read completes any round in
                // flight; our bytes at our first seq mean it was applied.
                let seen: Option<(Option<Vec<u8>>,)> = match self
                    .one(
                        &self.st.doc_update_get_serial,
                        (doc, to_i64(first.seq, "seq")?),
                    )
                    .await
                {
                    Ok(seen) => seen,
                    Err(_) => return Err(exec_error(e)),
                };
                match seen {
                    Some((Some(data),)) if data == first.data => Ok(()),
                    Some(_) => Err(conflict(None)),
                    None => Err(exec_error(e)),
                }
            }
        }
    }

    async fn doc_compact(&self, doc: &str, upto: u64, snapshot: &[u8]) -> Result<()> {
        let _local = self.locks.lock(&format!("doc\0{doc}")).await;
        let top: Option<(Option<i64>,)> = self.one(&self.st.doc_top_serial, (doc,)).await?;
        let current: Option<(Option<i64>, Option<Vec<u8>>)> =
            self.one(&self.st.doc_snapshot_get, (doc,)).await?;
        let snapshot_seq = current
            .as_ref()
            .map_or(Ok(0), |(s, _)| to_u64(s.unwrap_or(0), "seq"))?;
        let head = match top {
            Some((Some(t),)) => to_u64(t, "seq")?,
            _ if current.is_some() => snapshot_seq,
            _ => {
                return Err(StorageError::not_found(format!(
                    "document {doc} does not exist"
                )))
            }
        };
        if upto > head {
            return Err(StorageError::conflict(format!(
                "document {doc}: cannot compact up to {upto} past the head {head}"
            )));
        }
        if upto <= snapshot_seq {
            return Ok(());
        }
        let seq = to_i64(upto, "seq")?;
        // The snapshot first, then the prefix it covers: a crash between the
        // two leaves updates that a load skips (they are at or below `seq`).
        let inserted = self
            .exec(&self.st.doc_snapshot_insert, (doc, seq, snapshot))
            .await
            .and_then(lwt_applied)?
            .0;
        if !inserted {
            // Only moves forward: a slower, older compaction never wins.
            self.exec(&self.st.doc_snapshot_advance, (seq, snapshot, doc, seq))
                .await?;
        }
        self.exec(&self.st.doc_trim, (doc, seq)).await?;
        Ok(())
    }

    async fn doc_delete(&self, doc: &str) -> Result<bool> {
        let _local = self.locks.lock(&format!("doc\0{doc}")).await;
        let top: Option<(Option<i64>,)> = self.one(&self.st.doc_top_serial, (doc,)).await?;
        let snap: Option<(Option<i64>, Option<Vec<u8>>)> =
            self.one(&self.st.doc_snapshot_get, (doc,)).await?;
        let existed = matches!(top, Some((Some(_),))) || snap.is_some();
        self.exec(&self.st.doc_drop_updates, (doc,)).await?;
        self.exec(&self.st.doc_drop_snapshot, (doc,)).await?;
        Ok(existed)
    }

    async fn flush(&self) -> Result<()> {
        // Every acknowledged write already reached its consistency level's replicas.
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn db(e: DbError) -> StorageError {
        exec_error(ExecutionError::LastAttemptError(
            RequestAttemptError::DbError(e, "m".into()),
        ))
    }

    #[test]
    fn driver_errors_map_to_kinds() {
        let timeout = exec_error(ExecutionError::RequestTimeout(Duration::from_secs(1)));
        assert_eq!(timeout.kind, ErrorKind::Unavailable);
        assert_eq!(db(DbError::Overloaded).kind, ErrorKind::Unavailable);
        assert_eq!(
            db(DbError::WriteTimeout {
                consistency: Consistency::LocalQuorum,
                received: 1,
                required: 2,
                write_type: scylla::errors::WriteType::Cas,
            })
            .kind,
            ErrorKind::Unavailable
        );
        assert_eq!(
            db(DbError::Unavailable {
                consistency: Consistency::Quorum,
                required: 2,
                alive: 1
            })
            .kind,
            ErrorKind::Unavailable
        );
        assert_eq!(db(DbError::SyntaxError).kind, ErrorKind::Internal);
        assert_eq!(db(DbError::Unauthorized).kind, ErrorKind::Internal);
        assert_eq!(
            exec_error(ExecutionError::EmptyPlan).kind,
            ErrorKind::Unavailable
        );
        let stream = RequestAttemptError::UnableToAllocStreamId;
        assert_eq!(
            exec_error(ExecutionError::LastAttemptError(stream)).kind,
            ErrorKind::Unavailable
        );
        assert!(decode::<Entry>(&[0xc1], "entry").is_err_and(|e| e.kind == ErrorKind::Corrupt));
    }

    #[test]
    fn ttl_follows_expiry() {
        let now = chorus_protocol::now_ms();
        assert_eq!(ttl_secs(None, false), 0, "no expiry: no TTL");
        assert_eq!(
            ttl_secs(Some(now - 5_000), false),
            1,
            "already expired: the shortest TTL"
        );
        let up = ttl_secs(Some(now + 10_500), false);
        assert!((10..=11).contains(&up), "{up}");
        let down = ttl_secs(Some(now + 10_500), true);
        assert!((9..=10).contains(&down) && down <= up, "{down}");
        assert_eq!(ttl_secs(Some(i64::MAX), false), 630_720_000);
    }

    #[test]
    fn keyspace_names_are_checked() {
        assert!(valid_keyspace("chorus_1"));
        assert!(!valid_keyspace("1chorus"));
        assert!(!valid_keyspace("a-b"));
        assert!(!valid_keyspace(&"a".repeat(49)));
        let nts = ScyllaConfig {
            replication_strategy: "NetworkTopologyStrategy".into(),
            datacenter: Some("dc1".into()),
            replication_factor: 3,
            ..ScyllaConfig::default()
        };
        assert_eq!(
            replication(&nts).ok().as_deref(),
            Some("{'class': 'NetworkTopologyStrategy', 'dc1': 3}")
        );
    }
}
