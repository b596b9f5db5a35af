//! Failure and ownership changes: what a stopping owner still answers.

use std::time::Duration;

use chorus_actors::room::Publish;
use chorus_actors::services::Replier;
use chorus_protocol::EntryKind;
use chorus_tests::store::HeldStore;
use chorus_tests::{eventually, test_config, test_dir, TestNode};
use serde_json::Value;

fn publication(text: String, replier: Replier) -> Publish {
    Publish {
        sender: None,
        as_client: false,
        kind: EntryKind::Publish,
        text: Some(text),
        attachments: None,
        reply_to: None,
        data: None,
        client_id: None,
        replier,
    }
}

/// A room stopped while its write is in flight and more is queued behind
/// it acknowledges the write and writes the queue before it goes: every
/// publish that reached it is answered, and each answer is in the store.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_room_stopped_mid_batch_answers_everything_it_took() {
    let dir = test_dir();
    let config = test_config(dir.path());
    let store = chorus_storage::open(&config.storage).await.expect("store");
    let held = HeldStore::new(store.clone());
    let deps = chorus_node::Deps {
        store: Some(held.clone()),
        ..Default::default()
    };
    let node = TestNode::start_deps(dir, config, deps).await;
    let svc = node.handle().services().clone();
    let key = "topic:busy";

    held.hold();
    let mut answers = Vec::new();
    let (first, rx) = Replier::waiter();
    svc.tell_room(key, publication("m0".into(), first))
        .await
        .unwrap();
    answers.push(rx);
    eventually("the first write to be in flight", || async {
        (held.waiting() == 1).then_some(())
    })
    .await;
    // In the room's mailbox behind the write: they queue for the next batch.
    for i in 1..10 {
        let (r, rx) = Replier::waiter();
        svc.tell_room(key, publication(format!("m{i}"), r))
            .await
            .unwrap();
        answers.push(rx);
    }
    let stopping = tokio::spawn({
        let svc = svc.clone();
        async move { svc.stop_actors(Duration::from_secs(20)).await }
    });
    eventually("the room to be taken out of the registry", || async {
        (svc.active_counts().0 == 0).then_some(())
    })
    .await;
    held.release();
    assert_eq!(stopping.await.unwrap(), 0, "the room stopped in time");

    let mut offsets = Vec::new();
    for (i, rx) in answers.into_iter().enumerate() {
        let v: Value = tokio::time::timeout(Duration::from_secs(10), rx)
            .await
            .expect("answered")
            .unwrap_or_else(|_| panic!("publish {i} was dropped unanswered"))
            .unwrap_or_else(|f| panic!("publish {i} failed: {f}"));
        offsets.push(v["offset"].as_u64().unwrap());
    }
    assert_eq!(offsets, (1..=10).collect::<Vec<u64>>());
    let stored = store.read_range(key, 1, 10, 100).await.unwrap();
    let texts: Vec<String> = stored.iter().filter_map(|e| e.text.clone()).collect();
    assert_eq!(texts, (0..10).map(|i| format!("m{i}")).collect::<Vec<_>>());
    node.kill();
}
