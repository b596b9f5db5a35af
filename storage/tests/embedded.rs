//! The embedded backend: the shared conformance suite, then what only a local
//! directory can show (reopening, a killed process, fsync grouping, purge).

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;

use chorus_protocol::{Priority, Role, RoomKind};
use chorus_storage::embedded::{EmbeddedConfig, EmbeddedStore};
use chorus_storage::{
    ChannelHead, Entry, EntryKind, ErrorKind, Member, Notification, NotificationPrefs, RoomInfo,
    Store,
};

fn config(path: &Path) -> EmbeddedConfig {
    EmbeddedConfig {
        path: path.to_path_buf(),
        cache_mb: 8,
        ..EmbeddedConfig::default()
    }
}

/// A fresh store in its own temporary directory, deleted when the store is dropped.
async fn temp_store() -> Option<Arc<dyn Store>> {
    let dir = tempfile::tempdir().expect("tempdir").keep();
    Some(Arc::new(
        EmbeddedStore::open_temporary(&config(&dir)).expect("open store"),
    ))
}

mod conformance {
    chorus_storage::conformance_tests!(super::temp_store());
}

fn entry(channel: &str, offset: u64) -> Entry {
    let mut e = Entry::new(offset, EntryKind::Message, offset, 1_700_000_000_000);
    e.sender = Some("alice".into());
    e.text = Some(format!("{channel} #{offset}"));
    e.client_id = Some(format!("cid-{offset}"));
    e
}

fn notification(user: &str, id: u64, expires_at: Option<i64>) -> Notification {
    Notification {
        id,
        user: user.into(),
        kind: "mention".into(),
        title: format!("n{id}"),
        body: None,
        data: None,
        priority: Priority::Normal,
        category: None,
        room: None,
        created_at: 1_700_000_000_000,
        expires_at,
        read: false,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reopen_after_drop_keeps_acknowledged_writes() {
    let dir = tempfile::tempdir().expect("tempdir");
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
    {
        let store = EmbeddedStore::open(&config(dir.path())).expect("open");
        store
            .create_channel(ch, "epoch-1")
            .await
            .expect("create_channel");
        for start in (1..=100).step_by(10) {
            let batch: Vec<Entry> = (start..start + 10).map(|o| entry(ch, o)).collect();
            store.append(ch, &batch).await.expect("append");
        }
        assert!(store.create_room(&room).await.expect("create_room"));
        store
            .put_member("durable", &member)
            .await
            .expect("put_member");
        store
            .set_read_marker(ch, "alice", 42)
            .await
            .expect("set_read_marker");
        store
            .put_notification(&notification("alice", 7, None))
            .await
            .expect("put_notification");
        store.put_prefs("alice", &prefs).await.expect("put_prefs");
        store
            .set_last_seen("alice", 1234)
            .await
            .expect("set_last_seen");
        // Dropped without flush().
    }

    let store = EmbeddedStore::open(&config(dir.path())).expect("reopen");
    let head = store.channel_head(ch).await.expect("channel_head");
    assert_eq!(
        head,
        Some(ChannelHead {
            epoch: "epoch-1".into(),
            offset: 100,
            msg_seq: 100
        })
    );
    let all = store
        .read_range(ch, 1, 100, 1000)
        .await
        .expect("read_range");
    assert_eq!(all, (1..=100).map(|o| entry(ch, o)).collect::<Vec<_>>());
    assert_eq!(
        store
            .find_client_id(ch, Some("alice"), "cid-77")
            .await
            .expect("find"),
        Some(77)
    );
    assert_eq!(
        store.get_room("durable").await.expect("get_room"),
        Some(room)
    );
    assert_eq!(
        store.members("durable").await.expect("members"),
        vec![member]
    );
    assert_eq!(
        store.user_rooms("alice").await.expect("user_rooms"),
        vec!["durable".to_string()]
    );
    assert_eq!(
        store.read_marker(ch, "alice").await.expect("read_marker"),
        Some(42)
    );
    assert_eq!(
        store
            .unread_notifications("alice", 0)
            .await
            .expect("unread"),
        1
    );
    assert_eq!(
        store.get_prefs("alice").await.expect("get_prefs"),
        Some(prefs)
    );
    assert_eq!(
        store.last_seen("alice").await.expect("last_seen"),
        Some(1234)
    );

    // The recovered head is the one appends continue from.
    let err = store
        .append(ch, &[entry(ch, 100)])
        .await
        .expect_err("100 is taken");
    assert_eq!(err.kind, ErrorKind::Conflict);
    store
        .append(ch, &[entry(ch, 101)])
        .await
        .expect("append after reopen");
}

#[tokio::test]
async fn a_directory_opens_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let _first = EmbeddedStore::open(&config(dir.path())).expect("open");
    let second = EmbeddedStore::open(&config(dir.path()))
        .err()
        .expect("second open must fail");
    assert_eq!(second.kind, ErrorKind::Unavailable, "{second}");
}

/// Every write returns only after an fsync that started after its commit: on
/// an otherwise idle store, each one is followed by an fsync of its own.
#[tokio::test]
async fn every_write_waits_for_an_fsync() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = EmbeddedStore::open(&config(dir.path())).expect("open");
    macro_rules! synced {
        ($what:literal, $call:expr) => {{
            let before = store.syncs();
            let result = $call.await.expect($what);
            assert!(store.syncs() > before, "{} returned before an fsync", $what);
            result
        }};
    }
    let ch = "room:w";
    let room = RoomInfo {
        id: "w".into(),
        kind: RoomKind::Public,
        name: None,
        created_by: "alice".into(),
        created_at: 1,
        membership_entries: None,
    };
    let member = Member {
        user: "alice".into(),
        role: Role::Member,
        joined_at: 1,
    };
    synced!("create_channel", store.create_channel(ch, "e"));
    synced!("append", store.append(ch, &[entry(ch, 1)]));
    synced!("update_entry", store.update_entry(ch, &entry(ch, 1)));
    assert!(synced!("create_room", store.create_room(&room)));
    synced!("put_member", store.put_member("w", &member));
    synced!("remove_member", store.remove_member("w", "alice"));
    synced!("set_read_marker", store.set_read_marker(ch, "alice", 1));
    synced!(
        "put_notification",
        store.put_notification(&notification("alice", 1, Some(5)))
    );
    synced!(
        "put_notification",
        store.put_notification(&notification("alice", 2, None))
    );
    let changed = synced!(
        "mark_notifications_read",
        store.mark_notifications_read("alice", None, 10)
    );
    assert_eq!(changed, vec![2]);
    assert_eq!(synced!("purge_expired", store.purge_expired(10)), 1);
    synced!(
        "put_prefs",
        store.put_prefs("alice", &NotificationPrefs::default())
    );
    synced!("set_last_seen", store.set_last_seen("alice", 7));
}

/// Set in the child process of `killed_process_keeps_acknowledged_appends`.
const CRASH_DIR_ENV: &str = "CHORUS_STORAGE_CRASH_DIR";
const CRASH_CHANNELS: u64 = 4;
/// Acknowledgements after which the child kills itself.
const CRASH_AFTER: u64 = 300;

/// A child process appends to several channels, prints each acknowledged
/// offset, and kills itself with SIGKILL the moment it has printed
/// `CRASH_AFTER` of them, while other appends are still in flight. Every
/// offset it printed must be there after reopening: an acknowledgement comes
/// only once the data is fsynced, not while it sits in a buffer of the process.
#[test]
fn killed_process_keeps_acknowledged_appends() {
    if let Ok(dir) = std::env::var(CRASH_DIR_ENV) {
        crash_child(Path::new(&dir));
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let mut child = Command::new(std::env::current_exe().expect("current_exe"))
        .args([
            "killed_process_keeps_acknowledged_appends",
            "--exact",
            "--nocapture",
        ])
        .env(CRASH_DIR_ENV, dir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn child");
    let stdout = child.stdout.take().expect("child stdout");
    let mut acked = Vec::new();
    for line in BufReader::new(stdout).lines() {
        let line = line.expect("read child stdout");
        if let Some(rest) = line.strip_prefix("acked ") {
            let (ch, offset) = rest.split_once(' ').expect("acked <channel> <offset>");
            acked.push((ch.to_string(), offset.parse::<u64>().expect("offset")));
        }
    }
    let output = child.wait_with_output().expect("wait child");
    {
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(
            output.status.signal(),
            Some(libc::SIGKILL),
            "the child must die by SIGKILL ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    assert!(
        acked.len() as u64 >= CRASH_AFTER,
        "only {} acks",
        acked.len()
    );

    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        let store = EmbeddedStore::open(&config(dir.path())).expect("reopen after kill");
        for (ch, offset) in &acked {
            let got = store.get_entry(ch, *offset).await.expect("get_entry");
            assert_eq!(
                got,
                Some(entry(ch, *offset)),
                "acknowledged {ch} #{offset} was lost"
            );
        }
        for c in 0..CRASH_CHANNELS {
            let ch = format!("room:crash{c}");
            let head = store
                .channel_head(&ch)
                .await
                .expect("head")
                .expect("channel exists");
            let max_acked = acked
                .iter()
                .filter(|(a, _)| *a == ch)
                .map(|(_, o)| *o)
                .max();
            assert!(
                head.offset >= max_acked.unwrap_or(0),
                "{ch}: head behind an ack"
            );
            // Whatever survived is a prefix of the history: no gap, head consistent.
            let stored = store
                .read_range(&ch, 1, u64::MAX, 1000)
                .await
                .expect("read_range");
            assert_eq!(
                stored.len() as u64,
                head.offset,
                "{ch}: entries and head disagree"
            );
            assert_eq!(
                stored,
                (1..=head.offset).map(|o| entry(&ch, o)).collect::<Vec<_>>()
            );
        }
    });
}

fn crash_child(dir: &Path) {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        // A long window: a store that acknowledged before its fsync would
        // leave acknowledged batches unsynced for a while, which the kill catches.
        let cfg = EmbeddedConfig {
            group_commit_window_us: 20_000,
            ..config(dir)
        };
        let store = Arc::new(EmbeddedStore::open(&cfg).expect("open"));
        let acked = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let mut tasks = Vec::new();
        for c in 0..CRASH_CHANNELS {
            let (store, acked) = (Arc::clone(&store), Arc::clone(&acked));
            tasks.push(tokio::spawn(async move {
                let ch = format!("room:crash{c}");
                store
                    .create_channel(&ch, "e")
                    .await
                    .expect("create_channel");
                for offset in 1..=1000 {
                    store
                        .append(&ch, &[entry(&ch, offset)])
                        .await
                        .expect("append");
                    println!("acked {ch} {offset}");
                    let n = acked.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
                    if n == CRASH_AFTER {
                        // SAFETY: kill(2) on our own pid; nothing after it runs.
                        unsafe {
                            libc::kill(libc::getpid(), libc::SIGKILL);
                        }
                    }
                }
            }));
        }
        for task in tasks {
            task.await.expect("appender");
        }
    });
}

/// Concurrent appends share fsyncs: 200 appends to 50 channels need far fewer
/// than 200, and every one of them is stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_commit_shares_fsyncs() {
    for window_us in [0, 500] {
        let dir = tempfile::tempdir().expect("tempdir");
        let cfg = EmbeddedConfig {
            group_commit_window_us: window_us,
            ..config(dir.path())
        };
        let store = Arc::new(EmbeddedStore::open(&cfg).expect("open"));
        const CHANNELS: u64 = 50;
        const PER_CHANNEL: u64 = 4;
        for c in 0..CHANNELS {
            store
                .create_channel(&format!("room:g{c}"), "e")
                .await
                .expect("create_channel");
        }
        let before = store.syncs();
        let mut tasks = Vec::new();
        for c in 0..CHANNELS {
            let store = Arc::clone(&store);
            tasks.push(tokio::spawn(async move {
                let ch = format!("room:g{c}");
                for offset in 1..=PER_CHANNEL {
                    store
                        .append(&ch, &[entry(&ch, offset)])
                        .await
                        .expect("append");
                }
            }));
        }
        for task in tasks {
            task.await.expect("appender");
        }
        let appends = CHANNELS * PER_CHANNEL;
        let syncs = store.syncs() - before;
        println!("group commit (window {window_us} us): {appends} appends, {syncs} fsyncs");
        assert!(syncs >= 1, "appends were acknowledged without any fsync");
        assert!(
            syncs < appends / 2,
            "{appends} appends used {syncs} fsyncs: not grouped"
        );
        for c in 0..CHANNELS {
            let ch = format!("room:g{c}");
            let stored = store
                .read_range(&ch, 1, 100, 100)
                .await
                .expect("read_range");
            assert_eq!(
                stored,
                (1..=PER_CHANNEL).map(|o| entry(&ch, o)).collect::<Vec<_>>()
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purge_removes_expired_rows() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Arc::new(EmbeddedStore::open(&config(dir.path())).expect("open"));
    let now = 1_800_000_000_000;
    // More expired rows than one purge batch, spread over users.
    let users = ["u1", "u2", "u3"];
    let mut puts = Vec::new();
    for user in users {
        for id in 1..=700u64 {
            let expires = if id % 100 == 0 {
                Some(now + 1)
            } else {
                Some(now - id as i64)
            };
            let store = Arc::clone(&store);
            puts.push(tokio::spawn(async move {
                store
                    .put_notification(&notification(user, id, expires))
                    .await
            }));
        }
    }
    for put in puts {
        put.await.expect("task").expect("put_notification");
    }
    // A second put of a taken id (another writer's) changes nothing: u1's
    // notification 1 still expires.
    assert!(!store
        .put_notification(&notification("u1", 1, None))
        .await
        .expect("re-put"));
    // A notification with no expiry is never purged.
    store
        .put_notification(&notification("u4", 1, None))
        .await
        .expect("put");

    let expected = 3 * 693;
    assert_eq!(store.purge_expired(now).await.expect("purge"), expected);
    assert_eq!(store.purge_expired(now).await.expect("purge again"), 0);
    // Seen from a time before anything expired, only the survivors are left.
    let early = 0;
    let u1 = store
        .list_notifications("u1", None, 1000, false, early)
        .await
        .expect("list");
    let mut ids: Vec<u64> = u1.iter().map(|n| n.id).collect();
    ids.sort_unstable();
    assert_eq!(ids, vec![100, 200, 300, 400, 500, 600, 700]);
    assert_eq!(
        store
            .unread_notifications("u2", early)
            .await
            .expect("unread"),
        7
    );
    assert_eq!(
        store.unread_notifications("u4", now).await.expect("unread"),
        1
    );
    // The not-yet-expired ones go once their time has come.
    assert_eq!(store.purge_expired(now + 1).await.expect("purge later"), 21);
    assert_eq!(
        store
            .unread_notifications("u1", early)
            .await
            .expect("unread"),
        0
    );
}
