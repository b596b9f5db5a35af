//! The behaviour every [`Store`] backend must have: one suite, run by each
//! backend's tests.
//!
//! A backend's test file expands [`conformance_tests!`](crate::conformance_tests)
//! with an async factory; each case becomes its own `#[tokio::test]` on a fresh
//! store, so a failing test's name says which behaviour broke:
//!
//! ```text
//! async fn store() -> Option<Arc<dyn Store>> {
//!     // `None` when the backend is not reachable: each test then says so and passes.
//!     Some(Arc::new(EmbeddedStore::open_temporary(&config).unwrap()))
//! }
//! chorus_storage::conformance_tests!(store());
//! ```
//!
//! The cases are the `case_*` functions below; they panic on a violation. They
//! write under random names, so tests running at once on one database do not
//! see each other's rows (only the count `purge_expired` returns assumes that
//! nothing else in the store has expired). They never sleep: expiry is
//! expressed with `expires_at` in the past or around the `now` they pass.

use std::collections::HashSet;
use std::sync::Arc;

use chorus_protocol::{now_ms, Priority, Role, RoomKind};
use serde_json::json;

use crate::{
    ChannelHead, DocUpdate, Entry, EntryKind, ErrorKind, Member, Millis, Notification,
    NotificationPrefs, RoomInfo, Store, MAX_PAGE,
};

/// Expands into one `#[tokio::test]` per conformance case.
///
/// `$factory` is an expression evaluating to a future of
/// `Option<Arc<dyn Store>>`; it is evaluated once per test and must give a
/// fresh store each time. `None` means the backend is not available here: the
/// test prints that and returns. The calling crate needs `tokio` (with the
/// `macros` and `rt-multi-thread` features) as a dependency.
#[macro_export]
macro_rules! conformance_tests {
    ($factory:expr) => {
        $crate::conformance_tests!(@cases ($factory)
            heads_and_epochs => case_heads_and_epochs,
            consecutive_offsets => case_consecutive_offsets,
            conflict_writes_nothing => case_conflict_writes_nothing,
            append_to_missing_channel => case_append_to_missing_channel,
            concurrent_appenders => case_concurrent_appenders,
            read_range_paging => case_read_range_paging,
            read_before_paging => case_read_before_paging,
            get_and_update_entry => case_get_and_update_entry,
            client_id_lookup => case_client_id_lookup,
            rooms_create_once => case_rooms_create_once,
            members_and_user_rooms => case_members_and_user_rooms,
            read_markers => case_read_markers,
            notification_ids_taken_once => case_notification_ids_taken_once,
            notifications_newest_first_and_paging => case_notifications_newest_first_and_paging,
            notifications_unread_and_mark_read => case_notifications_unread_and_mark_read,
            notifications_expiry_and_purge => case_notifications_expiry_and_purge,
            prefs_round_trip => case_prefs_round_trip,
            last_seen => case_last_seen,
            flush => case_flush,
            doc_log_and_head => case_doc_log_and_head,
            doc_conflict_writes_nothing => case_doc_conflict_writes_nothing,
            doc_compaction => case_doc_compaction,
            doc_delete => case_doc_delete,
            doc_concurrent_appenders => case_doc_concurrent_appenders,
        );
    };
    (@cases ($factory:expr) $($test:ident => $case:ident,)*) => {
        $(
            #[::tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $test() {
                let store: ::std::option::Option<::std::sync::Arc<dyn $crate::Store>> =
                    $factory.await;
                match store {
                    ::std::option::Option::Some(store) => {
                        $crate::conformance::$case(store).await
                    }
                    ::std::option::Option::None => ::std::eprintln!(
                        "skipping {}: backend not available",
                        ::std::stringify!($test)
                    ),
                }
            }
        )*
    };
}

// ---- helpers ----

/// A name no other test uses: `<kind>:t<random>`, or `t<random>` for users.
fn uniq(kind: &str) -> String {
    let r: u64 = rand::random();
    if kind.is_empty() {
        format!("t{r:016x}")
    } else {
        format!("{kind}:t{r:016x}")
    }
}

/// A message entry whose fields say where it came from.
fn msg(offset: u64, msg_seq: u64, sender: &str) -> Entry {
    let mut e = Entry::new(
        offset,
        EntryKind::Message,
        msg_seq,
        1_700_000_000_000 + offset as i64,
    );
    e.sender = Some(sender.to_string());
    e.text = Some(format!("message {offset} from {sender}"));
    e
}

/// Entry `offset` of a filled channel: every third one carries JSON data of all kinds.
fn filled(offset: u64) -> Entry {
    let mut e = msg(offset, offset, "filler");
    if offset.is_multiple_of(3) {
        e.data = Some(json!({"n": offset, "f": 1.5, "ok": true, "none": null, "list": [1, "two"]}));
        e.reply_to = Some(offset - 1);
    }
    e
}

async fn create(store: &Arc<dyn Store>, channel: &str) -> ChannelHead {
    store
        .create_channel(channel, "epoch-1")
        .await
        .expect("create_channel")
}

/// Creates `channel` and appends `filled(1..=n)` in batches.
async fn fill(store: &Arc<dyn Store>, channel: &str, n: u64) {
    create(store, channel).await;
    let mut next = 1;
    while next <= n {
        let end = (next + 249).min(n);
        let batch: Vec<Entry> = (next..=end).map(filled).collect();
        store
            .append(channel, &batch)
            .await
            .expect("append while filling");
        next = end + 1;
    }
}

fn offsets(entries: &[Entry]) -> Vec<u64> {
    entries.iter().map(|e| e.offset).collect()
}

async fn head(store: &Arc<dyn Store>, channel: &str) -> ChannelHead {
    store
        .channel_head(channel)
        .await
        .expect("channel_head")
        .expect("channel exists")
}

fn note(user: &str, id: u64) -> Notification {
    Notification {
        id,
        user: user.to_string(),
        kind: "mention".to_string(),
        title: format!("notification {id}"),
        body: Some(format!("body of {id}")),
        data: Some(json!({"id": id, "tags": ["a", "b"]})),
        priority: if id.is_multiple_of(2) {
            Priority::High
        } else {
            Priority::Normal
        },
        category: Some("chat".to_string()),
        room: Some("room:1".to_string()),
        created_at: 1_700_000_000_000 + id as i64,
        expires_at: None,
        read: false,
    }
}

fn ids(ns: &[Notification]) -> Vec<u64> {
    ns.iter().map(|n| n.id).collect()
}

fn sorted(mut v: Vec<u64>) -> Vec<u64> {
    v.sort_unstable();
    v
}

// ---- channels ----

/// A channel has no head until created; creating again keeps the first epoch;
/// appends move offset and msg_seq but never the epoch.
pub async fn case_heads_and_epochs(store: Arc<dyn Store>) {
    let ch = uniq("room");
    let other = uniq("topic");
    assert_eq!(store.channel_head(&ch).await.expect("channel_head"), None);

    let created = store
        .create_channel(&ch, "epoch-a")
        .await
        .expect("create_channel");
    assert_eq!(
        created,
        ChannelHead {
            epoch: "epoch-a".into(),
            offset: 0,
            msg_seq: 0
        }
    );
    let again = store
        .create_channel(&ch, "epoch-b")
        .await
        .expect("create_channel again");
    assert_eq!(
        again, created,
        "creating an existing channel must not change its epoch"
    );
    assert_eq!(head(&store, &ch).await, created);
    assert_eq!(
        store.channel_head(&other).await.expect("channel_head"),
        None
    );

    let mut joined = Entry::new(1, EntryKind::Joined, 0, 1);
    joined.sender = Some("alice".into());
    store
        .append(&ch, &[joined, msg(2, 1, "alice")])
        .await
        .expect("append");
    let moved = ChannelHead {
        epoch: "epoch-a".into(),
        offset: 2,
        msg_seq: 1,
    };
    assert_eq!(head(&store, &ch).await, moved);
    assert_eq!(
        store
            .create_channel(&ch, "epoch-c")
            .await
            .expect("create_channel"),
        moved
    );

    store
        .create_channel(&other, "epoch-x")
        .await
        .expect("create other");
    assert_eq!(head(&store, &other).await.epoch, "epoch-x");
    assert_eq!(
        head(&store, &ch).await,
        moved,
        "channels have their own heads"
    );
}

/// Offsets follow the head one by one, in batches of any size; a gap, inside
/// a batch or after the head, is refused and writes nothing; an empty append
/// changes nothing.
pub async fn case_consecutive_offsets(store: Arc<dyn Store>) {
    let ch = uniq("room");
    create(&store, &ch).await;
    store
        .append(&ch, &[msg(1, 1, "a")])
        .await
        .expect("append 1");
    store
        .append(&ch, &[msg(2, 2, "a"), msg(3, 3, "b"), msg(4, 4, "a")])
        .await
        .expect("append 2..4");
    store
        .append(&ch, &[msg(5, 5, "b")])
        .await
        .expect("append 5");
    let all = store
        .read_range(&ch, 1, 100, 100)
        .await
        .expect("read_range");
    assert_eq!(offsets(&all), vec![1, 2, 3, 4, 5]);
    assert_eq!(all[2], msg(3, 3, "b"), "stored entries read back unchanged");
    assert_eq!(head(&store, &ch).await.offset, 5);

    let gap = store
        .append(&ch, &[msg(7, 7, "a")])
        .await
        .expect_err("offset 7 after head 5");
    assert_eq!(gap.kind, ErrorKind::Conflict, "{gap}");
    let inner_gap = store
        .append(&ch, &[msg(6, 6, "a"), msg(8, 8, "a")])
        .await
        .expect_err("6 then 8 is not consecutive");
    assert_eq!(inner_gap.kind, ErrorKind::Conflict, "{inner_gap}");
    assert_eq!(
        store.get_entry(&ch, 6).await.expect("get_entry"),
        None,
        "refused batch wrote 6"
    );
    assert_eq!(store.get_entry(&ch, 7).await.expect("get_entry"), None);
    assert_eq!(store.get_entry(&ch, 8).await.expect("get_entry"), None);

    store.append(&ch, &[]).await.expect("empty append");
    assert_eq!(
        head(&store, &ch).await,
        ChannelHead {
            epoch: "epoch-1".into(),
            offset: 5,
            msg_seq: 5
        }
    );
    store
        .append(&ch, &[msg(6, 6, "a")])
        .await
        .expect("append 6 after refusals");
    assert_eq!(head(&store, &ch).await.offset, 6);
}

/// An append touching a taken offset fails with `Conflict` and writes none of
/// its entries, client ids or head.
pub async fn case_conflict_writes_nothing(store: Arc<dyn Store>) {
    let ch = uniq("room");
    create(&store, &ch).await;
    let mut first: Vec<Entry> = (1..=3).map(|o| msg(o, o, "owner")).collect();
    first[2].client_id = Some("c3".into());
    store.append(&ch, &first).await.expect("append 1..3");

    let mut retaken = msg(3, 30, "intruder");
    retaken.client_id = Some("x3".into());
    let mut fresh = msg(4, 31, "intruder");
    fresh.client_id = Some("x4".into());
    let err = store
        .append(&ch, &[retaken, fresh])
        .await
        .expect_err("offset 3 is taken");
    assert_eq!(err.kind, ErrorKind::Conflict, "{err}");
    assert!(err.is_retryable());

    assert_eq!(
        store.get_entry(&ch, 3).await.expect("get_entry"),
        Some(first[2].clone())
    );
    assert_eq!(
        store.get_entry(&ch, 4).await.expect("get_entry"),
        None,
        "all or nothing"
    );
    assert_eq!(
        head(&store, &ch).await,
        ChannelHead {
            epoch: "epoch-1".into(),
            offset: 3,
            msg_seq: 3
        }
    );
    assert_eq!(
        store
            .find_client_id(&ch, Some("intruder"), "x3")
            .await
            .expect("find_client_id"),
        None
    );
    assert_eq!(
        store
            .find_client_id(&ch, Some("intruder"), "x4")
            .await
            .expect("find_client_id"),
        None
    );
    assert_eq!(
        store
            .find_client_id(&ch, Some("owner"), "c3")
            .await
            .expect("find_client_id"),
        Some(3)
    );

    let err = store
        .append(&ch, &[msg(1, 1, "intruder")])
        .await
        .expect_err("offset 1 is taken");
    assert_eq!(err.kind, ErrorKind::Conflict, "{err}");
    assert_eq!(
        store.get_entry(&ch, 1).await.expect("get_entry"),
        Some(first[0].clone())
    );
    assert_eq!(
        offsets(&store.read_range(&ch, 1, 10, 10).await.expect("read_range")),
        vec![1, 2, 3]
    );
}

/// Appending to a channel that was never created fails with `NotFound`: the
/// store cannot invent its epoch.
pub async fn case_append_to_missing_channel(store: Arc<dyn Store>) {
    let ch = uniq("room");
    let err = store
        .append(&ch, &[msg(1, 1, "a")])
        .await
        .expect_err("channel does not exist");
    assert_eq!(err.kind, ErrorKind::NotFound, "{err}");
    assert_eq!(store.channel_head(&ch).await.expect("channel_head"), None);
    assert_eq!(store.get_entry(&ch, 1).await.expect("get_entry"), None);
}

/// Writers racing for the same offsets (two nodes both believing they own a
/// room): exactly one wins each round, the others get `Conflict`, and the
/// channel holds the winner's whole batch and nothing of the losers'.
pub async fn case_concurrent_appenders(store: Arc<dyn Store>) {
    const WRITERS: u64 = 8;
    const ROUNDS: u64 = 15;
    let ch = uniq("room");
    create(&store, &ch).await;
    let mut top = 0u64;
    for round in 0..ROUNDS {
        let mut tasks = Vec::new();
        for w in 0..WRITERS {
            let (store, ch) = (Arc::clone(&store), ch.clone());
            // Batches of 1 to 3 entries, so the winner decides the new head.
            let batch: Vec<Entry> = (top + 1..=top + 1 + w % 3)
                .map(|o| {
                    let mut e = msg(o, o, &format!("w{w}"));
                    e.client_id = Some(format!("r{round}-w{w}-o{o}"));
                    e
                })
                .collect();
            tasks.push(tokio::spawn(async move {
                let result = store.append(&ch, &batch).await;
                (w, batch, result)
            }));
        }
        let mut winners = Vec::new();
        let mut losers = Vec::new();
        for task in tasks {
            let (w, batch, result) = task.await.expect("appender task panicked");
            match result {
                Ok(()) => winners.push((w, batch)),
                Err(e) => {
                    assert_eq!(
                        e.kind,
                        ErrorKind::Conflict,
                        "round {round}, writer {w}: {e}"
                    );
                    losers.push(batch);
                }
            }
        }
        assert_eq!(
            winners.len(),
            1,
            "round {round}: exactly one append must win, got {winners:?}"
        );
        let (w, batch) = winners.remove(0);
        let last = batch.last().map(|e| e.offset).unwrap_or(top);
        let stored = store
            .read_range(&ch, top + 1, top + 10, 100)
            .await
            .expect("read_range");
        assert_eq!(
            stored, batch,
            "round {round}: the channel holds writer {w}'s batch only"
        );
        assert_eq!(head(&store, &ch).await.offset, last);
        for e in &batch {
            let cid = e.client_id.as_deref().unwrap_or_default();
            assert_eq!(
                store
                    .find_client_id(&ch, e.sender.as_deref(), cid)
                    .await
                    .expect("find"),
                Some(e.offset)
            );
        }
        for e in losers.iter().flatten() {
            let cid = e.client_id.as_deref().unwrap_or_default();
            assert_eq!(
                store
                    .find_client_id(&ch, e.sender.as_deref(), cid)
                    .await
                    .expect("find"),
                None,
                "loser {cid}"
            );
        }
        top = last;
    }
    let all = store
        .read_range(&ch, 1, u64::MAX, MAX_PAGE)
        .await
        .expect("read_range");
    assert_eq!(
        offsets(&all),
        (1..=top).collect::<Vec<_>>(),
        "no gap, no duplicate"
    );
}

/// `read_range` is inclusive, oldest first, capped at `MAX_PAGE` whatever the
/// limit, and pages forward through a history longer than one page.
pub async fn case_read_range_paging(store: Arc<dyn Store>) {
    const N: u64 = 2500;
    let ch = uniq("room");
    // A channel whose name extends `ch`: its entries must never show up in `ch`.
    let longer = format!("{ch}1");
    fill(&store, &ch, N).await;
    fill(&store, &longer, 5).await;

    let first = store
        .read_range(&ch, 1, u64::MAX, usize::MAX)
        .await
        .expect("read_range");
    assert_eq!(first.len(), MAX_PAGE, "a page is capped at MAX_PAGE");
    assert_eq!(offsets(&first), (1..=MAX_PAGE as u64).collect::<Vec<_>>());
    assert_eq!(
        first[2],
        filled(3),
        "entries read back unchanged, JSON data included"
    );

    let mut seen = Vec::new();
    let mut from = 1;
    loop {
        let page = store
            .read_range(&ch, from, u64::MAX, 700)
            .await
            .expect("read_range page");
        assert!(page.len() <= 700);
        let Some(last) = page.last() else { break };
        from = last.offset + 1;
        seen.extend(page);
    }
    assert_eq!(offsets(&seen), (1..=N).collect::<Vec<_>>());
    assert_eq!(seen, (1..=N).map(filled).collect::<Vec<_>>());

    let mid = store
        .read_range(&ch, 1000, 1002, 10)
        .await
        .expect("read_range");
    assert_eq!(
        offsets(&mid),
        vec![1000, 1001, 1002],
        "both ends are inclusive"
    );
    let few = store.read_range(&ch, 10, 20, 4).await.expect("read_range");
    assert_eq!(
        offsets(&few),
        vec![10, 11, 12, 13],
        "limit keeps the oldest"
    );
    let tail = store
        .read_range(&ch, 2400, 9999, 1000)
        .await
        .expect("read_range");
    assert_eq!(offsets(&tail), (2400..=N).collect::<Vec<_>>());
    assert!(store
        .read_range(&ch, 5, 4, 10)
        .await
        .expect("read_range")
        .is_empty());
    assert!(store
        .read_range(&ch, 1, 10, 0)
        .await
        .expect("read_range")
        .is_empty());
    assert!(store
        .read_range(&ch, N + 1, u64::MAX, 10)
        .await
        .expect("read_range")
        .is_empty());
    assert!(store
        .read_range(&uniq("room"), 1, 10, 10)
        .await
        .expect("read_range")
        .is_empty());
    let other = store
        .read_range(&longer, 1, u64::MAX, 100)
        .await
        .expect("read_range");
    assert_eq!(offsets(&other), vec![1, 2, 3, 4, 5]);
}

/// `read_before` returns the newest entries below `before`, oldest first,
/// capped at `MAX_PAGE`, and pages backward through the whole history.
pub async fn case_read_before_paging(store: Arc<dyn Store>) {
    const N: u64 = 2500;
    let ch = uniq("room");
    let longer = format!("{ch}1");
    fill(&store, &ch, N).await;
    fill(&store, &longer, 5).await;

    let newest = store
        .read_before(&ch, u64::MAX, usize::MAX)
        .await
        .expect("read_before");
    assert_eq!(newest.len(), MAX_PAGE, "a page is capped at MAX_PAGE");
    assert_eq!(
        offsets(&newest),
        (N - MAX_PAGE as u64 + 1..=N).collect::<Vec<_>>()
    );

    let mut pages = Vec::new();
    let mut before = u64::MAX;
    loop {
        let page = store
            .read_before(&ch, before, 300)
            .await
            .expect("read_before page");
        assert!(page.len() <= 300);
        assert!(
            page.windows(2).all(|w| w[0].offset < w[1].offset),
            "oldest first"
        );
        let Some(oldest) = page.first() else { break };
        before = oldest.offset;
        pages.push(page);
    }
    let seen: Vec<Entry> = pages.into_iter().rev().flatten().collect();
    assert_eq!(seen, (1..=N).map(filled).collect::<Vec<_>>());

    let three = store.read_before(&ch, 11, 3).await.expect("read_before");
    assert_eq!(
        offsets(&three),
        vec![8, 9, 10],
        "the newest below `before`, oldest first"
    );
    assert!(store
        .read_before(&ch, 1, 10)
        .await
        .expect("read_before")
        .is_empty());
    assert!(store
        .read_before(&ch, 0, 10)
        .await
        .expect("read_before")
        .is_empty());
    assert!(store
        .read_before(&ch, 100, 0)
        .await
        .expect("read_before")
        .is_empty());
    assert!(store
        .read_before(&uniq("room"), u64::MAX, 10)
        .await
        .expect("read_before")
        .is_empty());
    let other = store
        .read_before(&longer, u64::MAX, 100)
        .await
        .expect("read_before");
    assert_eq!(offsets(&other), vec![1, 2, 3, 4, 5]);
}

/// `update_entry` replaces an entry in place and keeps the head; a missing
/// offset is `NotFound` and writes nothing.
pub async fn case_get_and_update_entry(store: Arc<dyn Store>) {
    let ch = uniq("room");
    create(&store, &ch).await;
    let entries: Vec<Entry> = (1..=3).map(|o| msg(o, o, "alice")).collect();
    store.append(&ch, &entries).await.expect("append");
    assert_eq!(
        store.get_entry(&ch, 2).await.expect("get_entry"),
        Some(entries[1].clone())
    );
    assert_eq!(store.get_entry(&ch, 4).await.expect("get_entry"), None);
    assert_eq!(
        store.get_entry(&uniq("room"), 1).await.expect("get_entry"),
        None
    );

    let mut edited = entries[1].clone();
    edited.text = Some("edited text".into());
    edited.edited_at = Some(1_800_000_000_000);
    store
        .update_entry(&ch, &edited)
        .await
        .expect("update_entry");
    assert_eq!(
        store.get_entry(&ch, 2).await.expect("get_entry"),
        Some(edited.clone())
    );

    let mut deleted = entries[0].clone();
    deleted.text = None;
    deleted.deleted = true;
    store
        .update_entry(&ch, &deleted)
        .await
        .expect("update_entry");
    let page = store.read_range(&ch, 1, 3, 10).await.expect("read_range");
    assert_eq!(page, vec![deleted, edited, entries[2].clone()]);
    assert_eq!(
        head(&store, &ch).await,
        ChannelHead {
            epoch: "epoch-1".into(),
            offset: 3,
            msg_seq: 3
        }
    );

    let err = store
        .update_entry(&ch, &msg(9, 9, "alice"))
        .await
        .expect_err("no entry at 9");
    assert_eq!(err.kind, ErrorKind::NotFound, "{err}");
    assert_eq!(store.get_entry(&ch, 9).await.expect("get_entry"), None);
    assert_eq!(head(&store, &ch).await.offset, 3);
    let err = store
        .update_entry(&uniq("room"), &entries[0])
        .await
        .expect_err("no channel");
    assert_eq!(err.kind, ErrorKind::NotFound, "{err}");
}

/// Client ids recorded by `append` are found per channel and per sender.
pub async fn case_client_id_lookup(store: Arc<dyn Store>) {
    let ch = uniq("room");
    let other = uniq("room");
    create(&store, &ch).await;
    create(&store, &other).await;
    let mut a = msg(1, 1, "alice");
    a.client_id = Some("cid-1".into());
    let b = msg(2, 2, "alice");
    let mut c = msg(3, 3, "alice");
    c.client_id = Some("cid-3".into());
    store.append(&ch, &[a, b, c]).await.expect("append");
    let mut d = msg(4, 4, "bob");
    d.client_id = Some("cid-4 with spaces/and:colons".into());
    store.append(&ch, &[d]).await.expect("append");

    assert_eq!(
        store
            .find_client_id(&ch, Some("alice"), "cid-1")
            .await
            .expect("find"),
        Some(1)
    );
    assert_eq!(
        store
            .find_client_id(&ch, Some("alice"), "cid-3")
            .await
            .expect("find"),
        Some(3)
    );
    assert_eq!(
        store
            .find_client_id(&ch, Some("bob"), "cid-4 with spaces/and:colons")
            .await
            .expect("find"),
        Some(4)
    );
    assert_eq!(
        store
            .find_client_id(&ch, Some("alice"), "cid-2")
            .await
            .expect("find"),
        None
    );
    assert_eq!(
        store
            .find_client_id(&other, Some("alice"), "cid-1")
            .await
            .expect("find"),
        None,
        "per channel"
    );

    let mut e = msg(1, 1, "carol");
    e.client_id = Some("cid-3".into());
    store.append(&other, &[e]).await.expect("append other");
    assert_eq!(
        store
            .find_client_id(&other, Some("carol"), "cid-3")
            .await
            .expect("find"),
        Some(1)
    );
    assert_eq!(
        store
            .find_client_id(&ch, Some("alice"), "cid-3")
            .await
            .expect("find"),
        Some(3)
    );

    // Another sender's equal id is another message, found on its own.
    assert_eq!(
        store
            .find_client_id(&ch, Some("bob"), "cid-1")
            .await
            .expect("find"),
        None,
        "per sender"
    );
    let mut f = msg(5, 5, "bob");
    f.client_id = Some("cid-1".into());
    let mut g = msg(6, 6, "server");
    g.sender = None;
    g.client_id = Some("cid-1".into());
    store
        .append(&ch, &[f, g])
        .await
        .expect("append bob and server");
    for (sender, offset) in [(Some("alice"), 1), (Some("bob"), 5), (None, 6)] {
        assert_eq!(
            store
                .find_client_id(&ch, sender, "cid-1")
                .await
                .expect("find"),
            Some(offset),
            "{sender:?}"
        );
    }
}

// ---- rooms and membership ----

/// A room is created once: later creations, also concurrent ones, return
/// `false` and change nothing.
pub async fn case_rooms_create_once(store: Arc<dyn Store>) {
    let id = uniq("");
    let room = RoomInfo {
        id: id.clone(),
        kind: RoomKind::Group,
        name: Some("first".into()),
        created_by: "alice".into(),
        created_at: 1_700_000_000_000,
        // Stored and read back as set.
        membership_entries: Some(false),
    };
    assert_eq!(store.get_room(&id).await.expect("get_room"), None);
    assert!(store.create_room(&room).await.expect("create_room"));
    let second = RoomInfo {
        name: Some("second".into()),
        created_by: "bob".into(),
        ..room.clone()
    };
    assert!(!store.create_room(&second).await.expect("create_room again"));
    assert_eq!(store.get_room(&id).await.expect("get_room"), Some(room));

    let raced = uniq("");
    let mut tasks = Vec::new();
    for w in 0..8 {
        let store = Arc::clone(&store);
        let room = RoomInfo {
            id: raced.clone(),
            kind: RoomKind::Public,
            name: None,
            created_by: format!("user{w}"),
            created_at: w,
            membership_entries: None,
        };
        tasks.push(tokio::spawn(async move {
            let created = store.create_room(&room).await.expect("create_room");
            (created, room)
        }));
    }
    let mut winners = Vec::new();
    for task in tasks {
        let (created, room) = task.await.expect("task panicked");
        if created {
            winners.push(room);
        }
    }
    assert_eq!(
        winners.len(),
        1,
        "exactly one concurrent create_room succeeds"
    );
    assert_eq!(
        store.get_room(&raced).await.expect("get_room"),
        winners.pop()
    );
}

/// Members are put, replaced and removed, and the user→rooms index follows.
pub async fn case_members_and_user_rooms(store: Arc<dyn Store>) {
    let (r1, r2) = (uniq(""), uniq(""));
    let alice = uniq("");
    let bob = uniq("");
    // A user whose id extends alice's: never one of alice's rooms.
    let alice2 = format!("{alice}2");
    let m = |user: &str, role| Member {
        user: user.to_string(),
        role,
        joined_at: 1_700_000_000_000,
    };

    store
        .put_member(&r1, &m(&alice, Role::Owner))
        .await
        .expect("put_member");
    store
        .put_member(&r1, &m(&bob, Role::Member))
        .await
        .expect("put_member");
    store
        .put_member(&r2, &m(&alice, Role::Member))
        .await
        .expect("put_member");
    store
        .put_member(&r2, &m(&alice2, Role::Member))
        .await
        .expect("put_member");

    let mut members = store.members(&r1).await.expect("members");
    members.sort_by(|a, b| a.user.cmp(&b.user));
    let mut expected = vec![m(&alice, Role::Owner), m(&bob, Role::Member)];
    expected.sort_by(|a, b| a.user.cmp(&b.user));
    assert_eq!(members, expected);
    assert_eq!(
        store.get_member(&r1, &bob).await.expect("get_member"),
        Some(m(&bob, Role::Member))
    );
    assert_eq!(
        store.get_member(&r1, &alice2).await.expect("get_member"),
        None
    );

    let mut rooms = store.user_rooms(&alice).await.expect("user_rooms");
    rooms.sort();
    assert_eq!(rooms, sorted_strings(vec![r1.clone(), r2.clone()]));
    assert_eq!(
        store.user_rooms(&bob).await.expect("user_rooms"),
        vec![r1.clone()]
    );
    assert_eq!(
        store.user_rooms(&alice2).await.expect("user_rooms"),
        vec![r2.clone()]
    );

    store
        .put_member(&r1, &m(&bob, Role::Owner))
        .await
        .expect("replace member");
    assert_eq!(
        store.get_member(&r1, &bob).await.expect("get_member"),
        Some(m(&bob, Role::Owner))
    );
    assert_eq!(
        store.members(&r1).await.expect("members").len(),
        2,
        "replaced, not added"
    );
    assert_eq!(
        store.user_rooms(&bob).await.expect("user_rooms"),
        vec![r1.clone()]
    );

    store
        .remove_member(&r1, &alice)
        .await
        .expect("remove_member");
    assert_eq!(
        store.members(&r1).await.expect("members"),
        vec![m(&bob, Role::Owner)]
    );
    assert_eq!(
        store.get_member(&r1, &alice).await.expect("get_member"),
        None
    );
    assert_eq!(
        store.user_rooms(&alice).await.expect("user_rooms"),
        vec![r2.clone()]
    );
    store
        .remove_member(&r1, &alice)
        .await
        .expect("removing again is fine");
    store
        .remove_member(&uniq(""), &alice)
        .await
        .expect("removing from an unknown room is fine");

    assert!(store.members(&uniq("")).await.expect("members").is_empty());
    assert!(store
        .user_rooms(&uniq(""))
        .await
        .expect("user_rooms")
        .is_empty());
}

fn sorted_strings(mut v: Vec<String>) -> Vec<String> {
    v.sort();
    v
}

/// A read marker per (channel, user), moved forward by a set, never back.
pub async fn case_read_markers(store: Arc<dyn Store>) {
    let ch = uniq("room");
    let longer = format!("{ch}1");
    let (alice, bob) = (uniq(""), uniq(""));
    assert_eq!(
        store.read_marker(&ch, &alice).await.expect("read_marker"),
        None
    );
    assert!(store
        .read_markers(&ch)
        .await
        .expect("read_markers")
        .is_empty());

    store
        .set_read_marker(&ch, &alice, 5)
        .await
        .expect("set_read_marker");
    store
        .set_read_marker(&ch, &bob, 7)
        .await
        .expect("set_read_marker");
    store
        .set_read_marker(&ch, &alice, 9)
        .await
        .expect("set_read_marker");
    // A lower offset (a second writer with a stale view) changes nothing.
    store
        .set_read_marker(&ch, &alice, 4)
        .await
        .expect("set_read_marker");
    store
        .set_read_marker(&longer, &alice, 1)
        .await
        .expect("set_read_marker");
    assert_eq!(
        store.read_marker(&ch, &alice).await.expect("read_marker"),
        Some(9)
    );
    assert_eq!(
        store.read_marker(&ch, &bob).await.expect("read_marker"),
        Some(7)
    );
    assert_eq!(
        store.read_marker(&longer, &bob).await.expect("read_marker"),
        None
    );

    let mut all = store.read_markers(&ch).await.expect("read_markers");
    all.sort();
    let mut expected = vec![(alice.clone(), 9), (bob.clone(), 7)];
    expected.sort();
    assert_eq!(all, expected);
    assert_eq!(
        store.read_markers(&longer).await.expect("read_markers"),
        vec![(alice, 1)]
    );
}

// ---- notifications ----

/// An inbox lists newest first, pages with `before`, caps at `MAX_PAGE`, and
/// holds only its own user's notifications.
/// An id is stored once per user: a second notification with a taken id is
/// refused (`false`) and writes nothing; the same id of another user is free.
pub async fn case_notification_ids_taken_once(store: Arc<dyn Store>) {
    let now = now_ms();
    let (user, other) = (uniq(""), uniq(""));
    let first = note(&user, 7);
    assert!(store.put_notification(&first).await.expect("put"));
    let second = Notification {
        title: "another writer's".into(),
        ..note(&user, 7)
    };
    assert!(!store.put_notification(&second).await.expect("put"));
    assert!(store.put_notification(&note(&other, 7)).await.expect("put"));
    let listed = store
        .list_notifications(&user, None, 10, false, now)
        .await
        .expect("list");
    assert_eq!(listed, vec![first]);
    assert_eq!(
        store
            .unread_notifications(&user, now)
            .await
            .expect("unread"),
        1
    );
}

pub async fn case_notifications_newest_first_and_paging(store: Arc<dyn Store>) {
    let now = now_ms();
    let user = uniq("");
    let longer = format!("{user}x");
    for id in 1..=25 {
        store
            .put_notification(&note(&user, id))
            .await
            .expect("put_notification");
    }
    for id in 1..=3 {
        store
            .put_notification(&note(&longer, id))
            .await
            .expect("put_notification");
    }

    let all = store
        .list_notifications(&user, None, 100, false, now)
        .await
        .expect("list");
    assert_eq!(
        all,
        (1..=25).rev().map(|id| note(&user, id)).collect::<Vec<_>>()
    );
    let page1 = store
        .list_notifications(&user, None, 10, false, now)
        .await
        .expect("list");
    assert_eq!(ids(&page1), (16..=25).rev().collect::<Vec<_>>());
    let page2 = store
        .list_notifications(&user, Some(16), 10, false, now)
        .await
        .expect("list");
    assert_eq!(
        ids(&page2),
        (6..=15).rev().collect::<Vec<_>>(),
        "`before` is exclusive"
    );
    let page3 = store
        .list_notifications(&user, Some(6), 10, false, now)
        .await
        .expect("list");
    assert_eq!(ids(&page3), vec![5, 4, 3, 2, 1]);
    assert!(store
        .list_notifications(&user, Some(1), 10, false, now)
        .await
        .expect("list")
        .is_empty());
    assert!(store
        .list_notifications(&user, None, 0, false, now)
        .await
        .expect("list")
        .is_empty());
    let other = store
        .list_notifications(&longer, None, 100, false, now)
        .await
        .expect("list");
    assert_eq!(ids(&other), vec![3, 2, 1]);
    assert_eq!(
        store
            .unread_notifications(&user, now)
            .await
            .expect("unread"),
        25
    );
    assert!(store
        .list_notifications(&uniq(""), None, 10, false, now)
        .await
        .expect("list")
        .is_empty());

    // More than a page.
    let big = uniq("");
    let total = MAX_PAGE as u64 + 5;
    let mut next = 1;
    while next <= total {
        let end = (next + 49).min(total);
        let puts = (next..=end).map(|id| {
            let store = Arc::clone(&store);
            let n = note(&big, id);
            async move { store.put_notification(&n).await }
        });
        for result in futures::future::join_all(puts).await {
            result.expect("put_notification");
        }
        next = end + 1;
    }
    let capped = store
        .list_notifications(&big, None, usize::MAX, false, now)
        .await
        .expect("list");
    assert_eq!(
        ids(&capped),
        (6..=total).rev().collect::<Vec<_>>(),
        "capped at MAX_PAGE, newest"
    );
    assert_eq!(
        store.unread_notifications(&big, now).await.expect("unread"),
        total,
        "counts all"
    );
}

/// `unread_only` lists unread ones; marking some or all read returns exactly
/// the ids that changed; the unread count follows.
pub async fn case_notifications_unread_and_mark_read(store: Arc<dyn Store>) {
    let now = now_ms();
    let user = uniq("");
    let bystander = uniq("");
    for id in 1..=6 {
        let mut n = note(&user, id);
        n.read = id == 2 || id == 5;
        store.put_notification(&n).await.expect("put_notification");
    }
    for id in 1..=2 {
        store
            .put_notification(&note(&bystander, id))
            .await
            .expect("put_notification");
    }

    assert_eq!(
        store
            .unread_notifications(&user, now)
            .await
            .expect("unread"),
        4
    );
    let unread = store
        .list_notifications(&user, None, 100, true, now)
        .await
        .expect("list");
    assert_eq!(ids(&unread), vec![6, 4, 3, 1]);
    let unread_page = store
        .list_notifications(&user, Some(4), 1, true, now)
        .await
        .expect("list");
    assert_eq!(ids(&unread_page), vec![3], "unread_only pages too");

    let changed = store
        .mark_notifications_read(&user, Some(&[1, 3, 999, 3]), now)
        .await
        .expect("mark");
    assert_eq!(
        sorted(changed),
        vec![1, 3],
        "only existing unread ids change"
    );
    let changed = store
        .mark_notifications_read(&user, Some(&[1, 2]), now)
        .await
        .expect("mark");
    assert!(
        changed.is_empty(),
        "already read: nothing changes, got {changed:?}"
    );
    assert_eq!(
        store
            .unread_notifications(&user, now)
            .await
            .expect("unread"),
        2
    );

    let changed = store
        .mark_notifications_read(&user, None, now)
        .await
        .expect("mark all");
    assert_eq!(sorted(changed), vec![4, 6]);
    assert_eq!(
        store
            .unread_notifications(&user, now)
            .await
            .expect("unread"),
        0
    );
    assert!(store
        .list_notifications(&user, None, 100, true, now)
        .await
        .expect("list")
        .is_empty());
    let all = store
        .list_notifications(&user, None, 100, false, now)
        .await
        .expect("list");
    let expected: Vec<Notification> = (1..=6)
        .rev()
        .map(|id| Notification {
            read: true,
            ..note(&user, id)
        })
        .collect();
    assert_eq!(all, expected, "marking read changes nothing but `read`");
    assert!(store
        .mark_notifications_read(&user, None, now)
        .await
        .expect("mark")
        .is_empty());

    assert_eq!(
        store
            .unread_notifications(&bystander, now)
            .await
            .expect("unread"),
        2
    );
}

/// Expired notifications (`expires_at <= now`) are never listed, counted or
/// marked; `purge_expired` deletes them (or returns 0 when the database
/// expires them itself).
pub async fn case_notifications_expiry_and_purge(store: Arc<dyn Store>) {
    let now = now_ms();
    let hour: Millis = 3_600_000;
    let user = uniq("");
    let expiring = |id, at: Option<Millis>| Notification {
        expires_at: at,
        ..note(&user, id)
    };
    let all = [
        expiring(1, Some(now - 60_000)),
        expiring(2, Some(now)),
        expiring(3, Some(now + hour)),
        expiring(4, None),
        expiring(5, Some(now - 1)),
    ];
    for n in &all {
        store.put_notification(n).await.expect("put_notification");
    }

    let listed = store
        .list_notifications(&user, None, 100, false, now)
        .await
        .expect("list");
    assert_eq!(ids(&listed), vec![4, 3], "expired ones are hidden");
    assert_eq!(listed[1], all[2], "expires_at is kept");
    let unread = store
        .list_notifications(&user, None, 100, true, now)
        .await
        .expect("list");
    assert_eq!(ids(&unread), vec![4, 3]);
    assert_eq!(
        store
            .unread_notifications(&user, now)
            .await
            .expect("unread"),
        2
    );
    let later = now + 2 * hour;
    assert_eq!(
        ids(&store
            .list_notifications(&user, None, 100, false, later)
            .await
            .expect("list")),
        vec![4]
    );
    assert_eq!(
        store
            .unread_notifications(&user, later)
            .await
            .expect("unread"),
        1
    );

    let changed = store
        .mark_notifications_read(&user, Some(&[1, 3]), now)
        .await
        .expect("mark");
    assert_eq!(changed, vec![3], "an expired notification cannot be marked");
    let changed = store
        .mark_notifications_read(&user, None, now)
        .await
        .expect("mark all");
    assert_eq!(changed, vec![4], "mark all skips expired ones");

    let purged = store.purge_expired(now).await.expect("purge_expired");
    assert!(
        purged == 0 || purged == 3,
        "purged {purged}, expected 3 (or 0 with native TTL)"
    );
    if purged > 0 {
        // Listed as of before anything expired: purged rows are gone, the rest stay.
        let before_expiry = now - 2 * hour;
        let left = store
            .list_notifications(&user, None, 100, false, before_expiry)
            .await
            .expect("list");
        assert_eq!(
            ids(&left),
            vec![4, 3],
            "purge deletes exactly the expired ones"
        );
        assert_eq!(store.purge_expired(now).await.expect("purge again"), 0);
    }
    assert_eq!(
        ids(&store
            .list_notifications(&user, None, 100, false, now)
            .await
            .expect("list")),
        vec![4, 3]
    );
}

/// Preferences round-trip per user.
pub async fn case_prefs_round_trip(store: Arc<dyn Store>) {
    let (alice, bob) = (uniq(""), uniq(""));
    assert_eq!(store.get_prefs(&alice).await.expect("get_prefs"), None);
    let prefs = NotificationPrefs {
        muted_categories: vec!["social".into(), "digest".into()],
        muted_rooms: vec!["room:1".into()],
    };
    store.put_prefs(&alice, &prefs).await.expect("put_prefs");
    assert_eq!(
        store.get_prefs(&alice).await.expect("get_prefs"),
        Some(prefs)
    );
    assert_eq!(store.get_prefs(&bob).await.expect("get_prefs"), None);
    store
        .put_prefs(&alice, &NotificationPrefs::default())
        .await
        .expect("put_prefs");
    assert_eq!(
        store.get_prefs(&alice).await.expect("get_prefs"),
        Some(NotificationPrefs::default())
    );
}

/// Last seen per user, overwritten by the latest set.
pub async fn case_last_seen(store: Arc<dyn Store>) {
    let (alice, bob) = (uniq(""), uniq(""));
    assert_eq!(store.last_seen(&alice).await.expect("last_seen"), None);
    store
        .set_last_seen(&alice, 1_700_000_000_000)
        .await
        .expect("set_last_seen");
    assert_eq!(
        store.last_seen(&alice).await.expect("last_seen"),
        Some(1_700_000_000_000)
    );
    store
        .set_last_seen(&alice, 1_700_000_000_500)
        .await
        .expect("set_last_seen");
    assert_eq!(
        store.last_seen(&alice).await.expect("last_seen"),
        Some(1_700_000_000_500)
    );
    assert_eq!(store.last_seen(&bob).await.expect("last_seen"), None);
}

/// `flush` succeeds with writes of every kind behind it and changes nothing.
pub async fn case_flush(store: Arc<dyn Store>) {
    store.flush().await.expect("flush of an empty store");
    let ch = uniq("room");
    let user = uniq("");
    create(&store, &ch).await;
    store
        .append(&ch, &[msg(1, 1, &user)])
        .await
        .expect("append");
    store
        .put_notification(&note(&user, 1))
        .await
        .expect("put_notification");
    store.set_last_seen(&user, 42).await.expect("set_last_seen");
    store.flush().await.expect("flush");
    let seen: HashSet<u64> = offsets(&store.read_range(&ch, 1, 10, 10).await.expect("read"))
        .into_iter()
        .collect();
    assert_eq!(seen, HashSet::from([1]));
    assert_eq!(
        store
            .unread_notifications(&user, now_ms())
            .await
            .expect("unread"),
        1
    );
    assert_eq!(store.last_seen(&user).await.expect("last_seen"), Some(42));
}

// ---- collaborative documents ----

fn upd(seq: u64) -> DocUpdate {
    // Bytes of every value, and sizes that vary, so truncation would show.
    let data = (0..(seq % 7 + 1) * 37)
        .map(|i| (i * 31 + seq) as u8)
        .collect();
    DocUpdate { seq, data }
}

/// A document does not exist until its first append; its log reads back
/// in order, byte for byte, and the head follows the last seq.
pub async fn case_doc_log_and_head(store: Arc<dyn Store>) {
    let doc = uniq("");
    assert_eq!(store.doc_load(&doc).await.expect("load"), None);
    store.doc_append(&doc, &[upd(1)]).await.expect("first");
    store
        .doc_append(&doc, &[upd(2), upd(3), upd(4)])
        .await
        .expect("batch");
    let rec = store.doc_load(&doc).await.expect("load").expect("exists");
    assert_eq!(rec.snapshot, None);
    assert_eq!(rec.snapshot_seq, 0);
    assert_eq!(rec.updates, (1..=4).map(upd).collect::<Vec<_>>());
    assert_eq!(rec.head(), 4);
    // Another document is another log.
    let other = uniq("");
    store.doc_append(&other, &[upd(1)]).await.expect("other");
    assert_eq!(store.doc_load(&doc).await.unwrap().unwrap().head(), 4);
    // An empty update is stored as such.
    let empty = DocUpdate {
        seq: 5,
        data: Vec::new(),
    };
    store
        .doc_append(&doc, std::slice::from_ref(&empty))
        .await
        .expect("empty");
    assert_eq!(
        store.doc_load(&doc).await.unwrap().unwrap().updates[4],
        empty
    );
}

/// An append that does not follow the head (taken seqs, a gap, not from 1
/// for a new document) fails with a conflict and writes nothing.
pub async fn case_doc_conflict_writes_nothing(store: Arc<dyn Store>) {
    let doc = uniq("");
    let kind = |r: crate::Result<()>| r.expect_err("must conflict").kind;
    assert_eq!(
        kind(store.doc_append(&doc, &[upd(2)]).await),
        ErrorKind::Conflict
    );
    assert_eq!(store.doc_load(&doc).await.unwrap(), None);
    store
        .doc_append(&doc, &[upd(1), upd(2)])
        .await
        .expect("append");
    assert_eq!(
        kind(store.doc_append(&doc, &[upd(2), upd(3)]).await),
        ErrorKind::Conflict
    );
    assert_eq!(
        kind(store.doc_append(&doc, &[upd(1)]).await),
        ErrorKind::Conflict
    );
    assert_eq!(
        kind(store.doc_append(&doc, &[upd(4)]).await),
        ErrorKind::Conflict
    );
    let rec = store.doc_load(&doc).await.unwrap().unwrap();
    assert_eq!(rec.updates, vec![upd(1), upd(2)]);
}

/// Compaction replaces the prefix by the snapshot and keeps the tail; it
/// never moves back, refuses to pass the head, and needs the document.
pub async fn case_doc_compaction(store: Arc<dyn Store>) {
    let doc = uniq("");
    let missing = store.doc_compact(&doc, 1, b"s").await.expect_err("missing");
    assert_eq!(missing.kind, ErrorKind::NotFound);
    let all: Vec<DocUpdate> = (1..=10).map(upd).collect();
    store.doc_append(&doc, &all).await.expect("append");
    store
        .doc_compact(&doc, 6, b"snapshot-6")
        .await
        .expect("compact");
    let rec = store.doc_load(&doc).await.unwrap().unwrap();
    assert_eq!(rec.snapshot.as_deref(), Some(&b"snapshot-6"[..]));
    assert_eq!(rec.snapshot_seq, 6);
    assert_eq!(rec.updates, (7..=10).map(upd).collect::<Vec<_>>());
    assert_eq!(rec.head(), 10);
    // Older or equal: nothing changes.
    store
        .doc_compact(&doc, 4, b"older")
        .await
        .expect("older is a no-op");
    store
        .doc_compact(&doc, 6, b"again")
        .await
        .expect("same is a no-op");
    let rec = store.doc_load(&doc).await.unwrap().unwrap();
    assert_eq!(rec.snapshot.as_deref(), Some(&b"snapshot-6"[..]));
    let past = store
        .doc_compact(&doc, 11, b"x")
        .await
        .expect_err("past head");
    assert_eq!(past.kind, ErrorKind::Conflict);
    // Appends go on after the head, not after the snapshot.
    let conflict = store.doc_append(&doc, &[upd(7)]).await.expect_err("taken");
    assert_eq!(conflict.kind, ErrorKind::Conflict);
    store.doc_append(&doc, &[upd(11)]).await.expect("next");
    // Up to the head: the whole log is the snapshot; the head stays.
    store
        .doc_compact(&doc, 11, b"snapshot-11")
        .await
        .expect("to head");
    let rec = store.doc_load(&doc).await.unwrap().unwrap();
    assert_eq!(
        (rec.snapshot_seq, rec.updates.len(), rec.head()),
        (11, 0, 11)
    );
    store
        .doc_append(&doc, &[upd(12)])
        .await
        .expect("after full compaction");
    let rec = store.doc_load(&doc).await.unwrap().unwrap();
    assert_eq!(rec.updates, vec![upd(12)]);
    assert_eq!(
        rec.stored_bytes(),
        (b"snapshot-11".len() + upd(12).data.len()) as u64
    );
}

/// Delete removes log and snapshot; the name starts over from seq 1.
pub async fn case_doc_delete(store: Arc<dyn Store>) {
    let doc = uniq("");
    assert!(!store.doc_delete(&doc).await.expect("delete missing"));
    store
        .doc_append(&doc, &[upd(1), upd(2), upd(3)])
        .await
        .unwrap();
    store.doc_compact(&doc, 2, b"snap").await.unwrap();
    assert!(store.doc_delete(&doc).await.expect("delete"));
    assert_eq!(store.doc_load(&doc).await.unwrap(), None);
    assert!(!store.doc_delete(&doc).await.expect("delete again"));
    store
        .doc_append(&doc, &[upd(1)])
        .await
        .expect("starts over");
    let rec = store.doc_load(&doc).await.unwrap().unwrap();
    assert_eq!((rec.snapshot, rec.updates), (None, vec![upd(1)]));
}

/// Writers racing for the same seqs: exactly one wins each, nothing is lost
/// or written twice.
pub async fn case_doc_concurrent_appenders(store: Arc<dyn Store>) {
    let doc = uniq("");
    let mut tasks = Vec::new();
    for w in 0..4u8 {
        let store = store.clone();
        let doc = doc.clone();
        tasks.push(tokio::spawn(async move {
            let mut won = Vec::new();
            for _ in 0..40 {
                let head = store.doc_load(&doc).await.unwrap().map_or(0, |r| r.head());
                let u = DocUpdate {
                    seq: head + 1,
                    data: vec![w, (head % 251) as u8],
                };
                match store.doc_append(&doc, std::slice::from_ref(&u)).await {
                    Ok(()) => won.push(u),
                    Err(e) => assert_eq!(e.kind, ErrorKind::Conflict, "{e}"),
                }
                if won.len() >= 5 {
                    break;
                }
            }
            won
        }));
    }
    let mut won = Vec::new();
    for t in tasks {
        won.extend(t.await.expect("task"));
    }
    won.sort_by_key(|u| u.seq);
    let rec = store.doc_load(&doc).await.unwrap().unwrap();
    assert_eq!(
        rec.updates, won,
        "the store holds exactly the acknowledged appends"
    );
    assert_eq!(
        rec.updates.iter().map(|u| u.seq).collect::<Vec<_>>(),
        (1..=won.len() as u64).collect::<Vec<_>>()
    );
}
