//! The ScyllaDB backend against a real CQL server: the shared conformance
//! suite, then what only this backend has (buckets, TTL, two nodes writing one
//! channel, migrations, reconnecting).
//!
//! The server's address comes from `CHORUS_CQL` (`scripts/cassandra.sh start`,
//! then `CHORUS_CQL=127.0.0.1:9042`). Without it every test says how to run it
//! and returns, unless `CHORUS_REQUIRE_CQL=1` (CI), where a missing server is
//! a failure. Each test gets a fresh keyspace, `chorus_t<unix secs>_<random>`;
//! keyspaces of this kind older than an hour (left by earlier runs) are dropped
//! once per test process.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chorus_protocol::{now_ms, Priority, Role, RoomKind};
use chorus_storage::scylla::{migrate, ScyllaConfig, ScyllaStore, SCHEMA_VERSION};
use chorus_storage::{
    ChannelHead, Entry, EntryKind, ErrorKind, Member, Notification, NotificationPrefs, RoomInfo,
    Store,
};
use tokio::sync::OnceCell;

const SKIP: &str = "skipped: set CHORUS_CQL=127.0.0.1:9042 (scripts/cassandra.sh start) to run";

/// The CQL address, `None` (with the skip message) when unset; a failure
/// instead when `CHORUS_REQUIRE_CQL=1`.
fn cql_address() -> Option<String> {
    match std::env::var("CHORUS_CQL") {
        Ok(addr) if !addr.trim().is_empty() => Some(addr.trim().to_string()),
        _ => {
            assert_ne!(
                std::env::var("CHORUS_REQUIRE_CQL").as_deref(),
                Ok("1"),
                "CHORUS_REQUIRE_CQL=1 but CHORUS_CQL is not set: {SKIP}"
            );
            eprintln!("{SKIP}");
            None
        }
    }
}

fn fresh_keyspace() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    format!("chorus_t{secs}_{:012x}", rand::random::<u64>() >> 16)
}

fn config(addr: &str, keyspace: &str, bucket_size: u64) -> ScyllaConfig {
    ScyllaConfig {
        contact_points: vec![addr.to_string()],
        keyspace: keyspace.to_string(),
        // A single local node under test load on two cores: be patient.
        request_timeout_ms: 20_000,
        bucket_size,
        ..ScyllaConfig::default()
    }
}

static STALE_DROPPED: OnceCell<()> = OnceCell::const_new();

/// Drops test keyspaces older than an hour, once per process.
async fn drop_stale_keyspaces(store: &ScyllaStore) {
    STALE_DROPPED
        .get_or_init(|| async {
            let cutoff = now_ms() / 1000 - 3600;
            let Ok(result) = store
                .session()
                .query_unpaged("SELECT keyspace_name FROM system_schema.keyspaces", &[])
                .await
            else {
                return;
            };
            let Ok(rows) = result.into_rows_result() else {
                return;
            };
            let Ok(names) = rows.rows::<(String,)>() else {
                return;
            };
            for (name,) in names.flatten() {
                let secs = name
                    .strip_prefix("chorus_t")
                    .and_then(|rest| rest.split('_').next())
                    .and_then(|s| s.parse::<i64>().ok());
                if secs.is_some_and(|s| s < cutoff) {
                    let drop = format!("DROP KEYSPACE IF EXISTS {name}");
                    if let Err(e) = store.session().query_unpaged(drop, &[]).await {
                        eprintln!("could not drop stale keyspace {name}: {e}");
                    }
                }
            }
        })
        .await;
}

/// A store on a fresh keyspace, or `None` when no server is configured.
async fn fresh(bucket_size: u64) -> Option<(ScyllaStore, ScyllaConfig)> {
    let addr = cql_address()?;
    let config = config(&addr, &fresh_keyspace(), bucket_size);
    let store = ScyllaStore::connect(&config)
        .await
        .expect("connect to the CQL server");
    drop_stale_keyspaces(&store).await;
    Some((store, config))
}

async fn drop_keyspace(store: &ScyllaStore, config: &ScyllaConfig) {
    let cql = format!("DROP KEYSPACE IF EXISTS {}", config.keyspace);
    store
        .session()
        .query_unpaged(cql, &[])
        .await
        .expect("drop the test keyspace");
}

/// The conformance suite's factory. A bucket size below the suite's batches
/// of 250 would be refused; 300 makes its 2500-entry channels cross buckets
/// with appends that spill over bucket ends.
async fn conformance_store() -> Option<Arc<dyn Store>> {
    let (store, _) = fresh(300).await?;
    Some(Arc::new(store))
}

mod conformance {
    chorus_storage::conformance_tests!(super::conformance_store());
}

// ---- helpers ----

fn entry(offset: u64, sender: &str) -> Entry {
    let mut e = Entry::new(
        offset,
        EntryKind::Message,
        offset,
        1_700_000_000_000 + offset as i64,
    );
    e.sender = Some(sender.to_string());
    e.text = Some(format!("{offset} from {sender}"));
    e
}

fn batch(from: u64, len: u64, sender: &str) -> Vec<Entry> {
    (from..from + len).map(|o| entry(o, sender)).collect()
}

fn offsets(entries: &[Entry]) -> Vec<u64> {
    entries.iter().map(|e| e.offset).collect()
}

fn notification(user: &str, id: u64, expires_at: Option<i64>) -> Notification {
    Notification {
        id,
        user: user.to_string(),
        kind: "mention".into(),
        title: format!("n{id}"),
        body: Some("body".into()),
        data: None,
        priority: Priority::Normal,
        category: Some("chat".into()),
        room: None,
        created_at: now_ms(),
        expires_at,
        read: false,
    }
}

/// Polls `check` until it returns true or `limit` passes; the wait is on a
/// condition, never a fixed sleep.
async fn eventually<F, Fut>(limit: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + limit;
    loop {
        if check().await {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {limit:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// `(bucket, offsets)` of every `messages` row of `channel`, read raw.
async fn partitions(store: &ScyllaStore, keyspace: &str, channel: &str) -> BTreeMap<i64, Vec<i64>> {
    let cql = format!(
        "SELECT bucket, msg_offset FROM {keyspace}.messages WHERE channel = ? ALLOW FILTERING"
    );
    let result = store
        .session()
        .query_unpaged(cql, (channel,))
        .await
        .expect("raw select");
    let rows = result.into_rows_result().expect("rows");
    let mut out: BTreeMap<i64, Vec<i64>> = BTreeMap::new();
    for row in rows.rows::<(i64, i64)>().expect("typed rows") {
        let (bucket, offset) = row.expect("row");
        out.entry(bucket).or_default().push(offset);
    }
    for offsets in out.values_mut() {
        offsets.sort_unstable();
    }
    out
}

// ---- buckets ----

/// Appends of 1..=4 entries with bucket_size 4 cross bucket ends and spill;
/// every read (range from any offset, before any offset, any page size) sees
/// exactly the history, partitions hold contiguous runs of at most
/// 2 * bucket_size - 1 entries, and an append longer than a bucket is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_pages_across_buckets() {
    const S: u64 = 4;
    let Some((store, config)) = fresh(S).await else {
        return;
    };
    let ch = "room:buckets";
    store
        .create_channel(ch, "e1")
        .await
        .expect("create_channel");
    let sizes = [1, 3, 4, 2, 4, 4, 1, 1, 3, 4, 2, 3, 4, 1];
    let mut next = 1;
    for (i, len) in sizes.into_iter().enumerate() {
        store
            .append(ch, &batch(next, len, "a"))
            .await
            .unwrap_or_else(|e| panic!("append {i}: {e}"));
        next += len;
    }
    let n = next - 1;
    let all: Vec<Entry> = (1..=n).map(|o| entry(o, "a")).collect();
    let head = store.channel_head(ch).await.expect("head").expect("exists");
    assert_eq!(
        head,
        ChannelHead {
            epoch: "e1".into(),
            offset: n,
            msg_seq: n
        }
    );

    let parts = partitions(&store, &config.keyspace, ch).await;
    let mut expected_next = 1;
    for (bucket, offs) in &parts {
        assert!(
            (offs.len() as u64) < 2 * S,
            "bucket {bucket} holds {offs:?}"
        );
        assert_eq!(
            offs[0] as u64 / S,
            *bucket as u64,
            "a partition starts in its own bucket"
        );
        assert_eq!(offs[0], expected_next, "partitions follow each other");
        assert!(
            offs.windows(2).all(|w| w[1] == w[0] + 1),
            "contiguous: {offs:?}"
        );
        expected_next = offs[offs.len() - 1] + 1;
    }
    assert_eq!(expected_next as u64, n + 1);
    assert!(
        parts.values().any(|o| o.len() as u64 > S),
        "some append spilled: {parts:?}"
    );
    let cql = format!(
        "SELECT head_bucket FROM {}.channels WHERE channel = ?",
        config.keyspace
    );
    let result = store
        .session()
        .query_unpaged(cql, (ch,))
        .await
        .expect("raw select");
    let (hint,) = result
        .into_rows_result()
        .expect("rows")
        .single_row::<(i64,)>()
        .expect("one channel row");
    assert_eq!(
        Some(&hint),
        parts.keys().last(),
        "the head bucket hint follows the newest partition"
    );

    for from in 1..=n + 1 {
        for limit in [1, 2, 3, 5, 9, 100] {
            let page = store
                .read_range(ch, from, u64::MAX, limit)
                .await
                .expect("read_range");
            let want: Vec<Entry> = all
                .iter()
                .filter(|e| e.offset >= from)
                .take(limit)
                .cloned()
                .collect();
            assert_eq!(page, want, "read_range from {from} limit {limit}");
            let to = from + 5;
            let page = store
                .read_range(ch, from, to, limit)
                .await
                .expect("read_range");
            let want: Vec<Entry> = all
                .iter()
                .filter(|e| e.offset >= from && e.offset <= to)
                .take(limit)
                .cloned()
                .collect();
            assert_eq!(page, want, "read_range {from}..={to} limit {limit}");
        }
    }
    for before in 0..=n + 2 {
        for limit in [1, 2, 3, 5, 9, 100] {
            let page = store
                .read_before(ch, before, limit)
                .await
                .expect("read_before");
            let below: Vec<Entry> = all.iter().filter(|e| e.offset < before).cloned().collect();
            let want = below[below.len().saturating_sub(limit)..].to_vec();
            assert_eq!(page, want, "read_before {before} limit {limit}");
        }
    }
    for o in 1..=n {
        assert_eq!(
            store.get_entry(ch, o).await.expect("get_entry"),
            Some(entry(o, "a"))
        );
        let mut edited = entry(o, "a");
        edited.text = Some(format!("edited {o}"));
        store.update_entry(ch, &edited).await.expect("update_entry");
        assert_eq!(
            store.get_entry(ch, o).await.expect("get_entry"),
            Some(edited)
        );
    }
    assert_eq!(store.get_entry(ch, n + 1).await.expect("get_entry"), None);
    let err = store
        .update_entry(ch, &entry(n + 1, "a"))
        .await
        .expect_err("no entry past the head");
    assert_eq!(err.kind, ErrorKind::NotFound);

    let err = store
        .append(ch, &batch(n + 1, S + 1, "a"))
        .await
        .expect_err("longer than a bucket");
    assert_eq!(err.kind, ErrorKind::Corrupt, "{err}");
    // A gap right at a bucket start is refused too.
    let start_of_next = (n / S + 2) * S;
    let err = store
        .append(ch, &batch(start_of_next, 1, "a"))
        .await
        .expect_err("gap");
    assert_eq!(err.kind, ErrorKind::Conflict, "{err}");
    assert_eq!(
        store
            .channel_head(ch)
            .await
            .expect("head")
            .map(|h| h.offset),
        Some(n)
    );
    drop_keyspace(&store, &config).await;
}

// ---- TTL ----

/// Notifications carry a TTL from `expires_at`: the database removes them
/// (seen even when listing "as of" a time before they expired), also after
/// being marked read, without leaving a row behind; others stay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notifications_expire_by_ttl() {
    let Some((store, config)) = fresh(1000).await else {
        return;
    };
    let user = "ttl-user";
    let long_ago = now_ms() - 60_000;
    store
        .put_notification(&notification(user, 1, Some(now_ms() + 1_500)))
        .await
        .expect("put");
    store
        .put_notification(&notification(user, 2, Some(now_ms() + 2_000)))
        .await
        .expect("put");
    store
        .put_notification(&notification(user, 3, None))
        .await
        .expect("put");
    let listed = store
        .list_notifications(user, None, 10, false, long_ago)
        .await
        .expect("list");
    assert_eq!(
        listed.iter().map(|n| n.id).collect::<Vec<_>>(),
        vec![3, 2, 1]
    );
    let changed = store
        .mark_notifications_read(user, Some(&[2]), now_ms())
        .await
        .expect("mark");
    assert_eq!(changed, vec![2]);

    eventually(
        Duration::from_secs(30),
        "TTL to remove notifications 1 and 2",
        || async {
            let listed = store
                .list_notifications(user, None, 10, false, long_ago)
                .await
                .expect("list");
            listed.iter().map(|n| n.id).collect::<Vec<_>>() == vec![3]
        },
    )
    .await;
    let cql = format!(
        "SELECT id FROM {}.notifications WHERE user_id = ?",
        config.keyspace
    );
    eventually(
        Duration::from_secs(10),
        "no row left behind by mark-read",
        || async {
            let result = store
                .session()
                .query_unpaged(cql.clone(), (user,))
                .await
                .expect("raw select");
            let rows = result.into_rows_result().expect("rows");
            let ids: Vec<i64> = rows
                .rows::<(i64,)>()
                .expect("typed")
                .map(|r| r.expect("row").0)
                .collect();
            ids == vec![3]
        },
    )
    .await;
    assert_eq!(
        store
            .unread_notifications(user, long_ago)
            .await
            .expect("unread"),
        1
    );
    drop_keyspace(&store, &config).await;
}

// ---- two nodes, one channel ----

/// What one writer had acknowledged, by offset.
type Acked = HashMap<u64, Entry>;

struct Written {
    acked: Acked,
    conflicts: usize,
    /// Appends whose outcome was unknown (they may or may not be stored).
    unknown: usize,
}

/// Appends `rounds` batches at the head it believes in, reloading the head
/// on `Conflict` like a room actor that lost ownership.
async fn writer(
    store: Arc<ScyllaStore>,
    ch: &'static str,
    name: &'static str,
    rounds: usize,
) -> Written {
    let mut acked = Acked::new();
    let mut conflicts = 0;
    let mut unknown = 0;
    let mut head = store
        .channel_head(ch)
        .await
        .expect("head")
        .expect("exists")
        .offset;
    let mut done = 0;
    let deadline = Instant::now() + Duration::from_secs(120);
    while done < rounds {
        assert!(Instant::now() < deadline, "{name} made no progress");
        let len = 1 + (done as u64 % 3);
        let entries = batch(head + 1, len, name);
        match store.append(ch, &entries).await {
            Ok(()) => {
                for e in entries {
                    acked.insert(e.offset, e);
                }
                head += len;
                done += 1;
            }
            Err(e) => {
                match e.kind {
                    ErrorKind::Conflict => conflicts += 1,
                    ErrorKind::Unavailable => unknown += 1,
                    _ => panic!("{name}: unexpected {e}"),
                }
                head = store
                    .channel_head(ch)
                    .await
                    .expect("head")
                    .expect("exists")
                    .offset;
            }
        }
    }
    Written {
        acked,
        conflicts,
        unknown,
    }
}

/// Two stores (two sessions: two nodes) append to one channel at once. Each
/// offset is won by exactly one; every acknowledged entry is stored as it
/// was acknowledged; the history has no gap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_writers_never_overwrite() {
    let Some((first, config)) = fresh(8).await else {
        return;
    };
    let second = ScyllaStore::connect(&config)
        .await
        .expect("second node connects");
    let (a, b) = (Arc::new(first), Arc::new(second));
    let ch = "room:contended";
    a.create_channel(ch, "e").await.expect("create");
    // The stale owner: both believe the head is 0 and write offset 1.
    let (one_a, one_b) = ([entry(1, "a")], [entry(1, "b")]);
    let (ra, rb) = tokio::join!(a.append(ch, &one_a), b.append(ch, &one_b));
    assert!(
        ra.is_ok() != rb.is_ok(),
        "exactly one wins offset 1: {ra:?} {rb:?}"
    );
    let loser = if ra.is_ok() { rb } else { ra };
    assert_eq!(loser.expect_err("one lost").kind, ErrorKind::Conflict);
    let winner = if a
        .get_entry(ch, 1)
        .await
        .expect("get")
        .expect("stored")
        .sender
        .as_deref()
        == Some("a")
    {
        "a"
    } else {
        "b"
    };
    let mut acked = Acked::from([(1, entry(1, winner))]);

    let (wa, wb) = tokio::join!(
        tokio::spawn(writer(Arc::clone(&a), ch, "a", 25)),
        tokio::spawn(writer(Arc::clone(&b), ch, "b", 25)),
    );
    let (wa, wb) = (wa.expect("writer a"), wb.expect("writer b"));
    for (offset, e) in wa.acked.iter().chain(wb.acked.iter()) {
        assert!(
            acked.insert(*offset, e.clone()).is_none(),
            "offset {offset} acknowledged twice"
        );
    }
    let head = a.channel_head(ch).await.expect("head").expect("exists");
    let stored = a.read_range(ch, 1, u64::MAX, 1000).await.expect("read");
    assert_eq!(
        offsets(&stored),
        (1..=head.offset).collect::<Vec<_>>(),
        "no gap, no duplicate"
    );
    for (offset, e) in &acked {
        assert_eq!(
            &stored[*offset as usize - 1],
            e,
            "acknowledged entry {offset} changed"
        );
    }
    if wa.unknown + wb.unknown == 0 {
        assert_eq!(
            acked.len(),
            stored.len(),
            "only acknowledged entries are stored"
        );
    }
    assert!(
        wa.conflicts + wb.conflicts > 0,
        "the writers never met: the test proved nothing"
    );
    eprintln!(
        "two writers: {} entries; conflicts a={} b={}; unknown outcomes a={} b={}",
        stored.len(),
        wa.conflicts,
        wb.conflicts,
        wa.unknown,
        wb.unknown
    );
    drop_keyspace(&a, &config).await;
}

// ---- migrations ----

/// Migrations from several nodes at once, then again, leave one version row
/// each and no lock; a node that does not migrate starts on a current schema
/// and refuses a keyspace that was never migrated.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrations_are_safe_to_repeat_and_race() {
    let Some(addr) = cql_address() else { return };
    let config = config(&addr, &fresh_keyspace(), 1000);
    let runs = (0..3).map(|_| {
        let config = config.clone();
        tokio::spawn(async move { migrate(&config).await })
    });
    for run in futures::future::join_all(runs).await {
        assert_eq!(run.expect("task").expect("migrate"), SCHEMA_VERSION);
    }
    assert_eq!(
        migrate(&config).await.expect("migrate again"),
        SCHEMA_VERSION
    );

    let no_migrate = ScyllaConfig {
        migrate_on_start: false,
        ..config.clone()
    };
    let store = ScyllaStore::connect(&no_migrate)
        .await
        .expect("connect without migrating");
    let ks = &config.keyspace;
    let result = store
        .session()
        .query_unpaged(
            format!("SELECT version, applied_by FROM {ks}.schema_migrations"),
            &[],
        )
        .await
        .expect("select versions");
    let rows = result.into_rows_result().expect("rows");
    let versions: Vec<i32> = rows
        .rows::<(i32, Option<String>)>()
        .expect("typed")
        .map(|r| r.expect("row").0)
        .collect();
    assert_eq!(versions, (1..=SCHEMA_VERSION as i32).collect::<Vec<_>>());
    let result = store
        .session()
        .query_unpaged(format!("SELECT name FROM {ks}.schema_lock"), &[])
        .await
        .expect("select lock");
    assert_eq!(
        result.into_rows_result().expect("rows").rows_num(),
        0,
        "the lock was released"
    );
    store
        .create_channel("room:m", "e")
        .await
        .expect("the schema works");
    drop_keyspace(&store, &config).await;

    let unmigrated = ScyllaConfig {
        keyspace: fresh_keyspace(),
        ..no_migrate
    };
    let err = ScyllaStore::connect(&unmigrated)
        .await
        .err()
        .expect("no schema to use");
    assert!(err.message.contains("chorus migrate"), "{err}");
}

// ---- reconnect ----

/// Dropping the store and connecting again (a Chorus restart) finds every
/// acknowledged write, and appends continue at the head.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnect_keeps_history() {
    let Some((store, config)) = fresh(4).await else {
        return;
    };
    let ch = "room:durable";
    let room = RoomInfo {
        id: "durable".into(),
        kind: RoomKind::Group,
        name: Some("Durable".into()),
        created_by: "alice".into(),
        created_at: 1,
        membership_entries: None,
    };
    let member = Member {
        user: "alice".into(),
        role: Role::Owner,
        joined_at: 2,
    };
    let prefs = NotificationPrefs {
        muted_categories: vec!["x".into()],
        muted_rooms: vec![],
    };
    store.create_channel(ch, "e1").await.expect("create");
    for from in [1, 4, 7, 10] {
        let mut entries = batch(from, 3, "alice");
        entries[0].client_id = Some(format!("cid-{from}"));
        store.append(ch, &entries).await.expect("append");
    }
    assert!(store.create_room(&room).await.expect("room"));
    store.put_member("durable", &member).await.expect("member");
    store.set_read_marker(ch, "alice", 7).await.expect("marker");
    store
        .put_notification(&notification("alice", 5, None))
        .await
        .expect("notification");
    store.put_prefs("alice", &prefs).await.expect("prefs");
    store.set_last_seen("alice", 99).await.expect("last seen");
    store.flush().await.expect("flush");
    drop(store);

    let store = ScyllaStore::connect(&config).await.expect("reconnect");
    let head = store.channel_head(ch).await.expect("head").expect("exists");
    assert_eq!(
        head,
        ChannelHead {
            epoch: "e1".into(),
            offset: 12,
            msg_seq: 12
        }
    );
    let history = store
        .read_range(ch, 1, u64::MAX, 100)
        .await
        .expect("history");
    assert_eq!(offsets(&history), (1..=12).collect::<Vec<_>>());
    assert_eq!(
        store
            .find_client_id(ch, Some("alice"), "cid-7")
            .await
            .expect("client id"),
        Some(7)
    );
    // A deleted message keeps its client id in the index (the trait's rule).
    let mut deleted = history[6].clone();
    deleted.client_id = None;
    deleted.text = None;
    deleted.deleted = true;
    store
        .update_entry(ch, &deleted)
        .await
        .expect("delete in place");
    assert_eq!(
        store
            .find_client_id(ch, Some("alice"), "cid-7")
            .await
            .expect("client id"),
        Some(7)
    );
    assert_eq!(store.get_room("durable").await.expect("room"), Some(room));
    assert_eq!(
        store.members("durable").await.expect("members"),
        vec![member]
    );
    assert_eq!(
        store.user_rooms("alice").await.expect("user rooms"),
        vec!["durable".to_string()]
    );
    assert_eq!(
        store.read_marker(ch, "alice").await.expect("marker"),
        Some(7)
    );
    assert_eq!(
        store
            .unread_notifications("alice", now_ms())
            .await
            .expect("unread"),
        1
    );
    assert_eq!(store.get_prefs("alice").await.expect("prefs"), Some(prefs));
    assert_eq!(store.last_seen("alice").await.expect("last seen"), Some(99));
    let err = store
        .append(ch, &[entry(12, "bob")])
        .await
        .expect_err("12 is taken");
    assert_eq!(err.kind, ErrorKind::Conflict);
    store
        .append(ch, &[entry(13, "bob")])
        .await
        .expect("append after restart");
    assert_eq!(
        store.get_entry(ch, 12).await.expect("get"),
        Some(entry(12, "alice"))
    );
    drop_keyspace(&store, &config).await;
}

// ---- bounded in-flight ----

/// With one request allowed in flight, many concurrent calls still all
/// complete: no call holds a permit while waiting for another.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_request_in_flight_does_not_deadlock() {
    let Some(addr) = cql_address() else { return };
    let config = ScyllaConfig {
        max_in_flight: 1,
        ..config(&addr, &fresh_keyspace(), 16)
    };
    let store = Arc::new(ScyllaStore::connect(&config).await.expect("connect"));
    let calls = (0..16u64).map(|i| {
        let store = Arc::clone(&store);
        tokio::spawn(async move {
            let ch = format!("room:f{i}");
            store.create_channel(&ch, "e").await?;
            let mut entries = batch(1, 3, "x");
            entries[1].client_id = Some("c".into());
            store.append(&ch, &entries).await?;
            store
                .put_member(
                    &ch,
                    &Member {
                        user: "u".into(),
                        role: Role::Member,
                        joined_at: 0,
                    },
                )
                .await?;
            store.read_range(&ch, 1, 10, 10).await
        })
    });
    for call in futures::future::join_all(calls).await {
        assert_eq!(call.expect("task").expect("call").len(), 3);
    }
    drop_keyspace(&store, &config).await;
}

// ---- configuration ----

/// Invalid settings are refused before any connection is tried.
#[test]
fn invalid_config_is_refused() {
    let ok = ScyllaConfig::default();
    ok.validate().expect("defaults are valid");
    let bad = [
        ScyllaConfig {
            bucket_size: 0,
            ..ok.clone()
        },
        ScyllaConfig {
            keyspace: "drop table x;".into(),
            ..ok.clone()
        },
        ScyllaConfig {
            keyspace: "9lives".into(),
            ..ok.clone()
        },
        ScyllaConfig {
            replication_strategy: "NetworkTopologyStrategy".into(),
            ..ok.clone()
        },
        ScyllaConfig {
            replication_strategy: "Everywhere".into(),
            ..ok.clone()
        },
        ScyllaConfig {
            replication_factor: 0,
            ..ok.clone()
        },
        ScyllaConfig {
            read_consistency: "most".into(),
            ..ok.clone()
        },
        ScyllaConfig {
            serial_consistency: "quorum".into(),
            ..ok.clone()
        },
        ScyllaConfig {
            username: Some("u".into()),
            ..ok.clone()
        },
        ScyllaConfig {
            max_in_flight: 0,
            ..ok.clone()
        },
        ScyllaConfig {
            contact_points: vec![],
            ..ok.clone()
        },
    ];
    for config in bad {
        let err = config
            .validate()
            .expect_err(&format!("{config:?} must be refused"));
        assert_eq!(err.kind, ErrorKind::Internal);
    }
    let nts = ScyllaConfig {
        replication_strategy: "NetworkTopologyStrategy".into(),
        datacenter: Some("dc1".into()),
        ..ok
    };
    nts.validate()
        .expect("NetworkTopologyStrategy with a datacenter");
}
