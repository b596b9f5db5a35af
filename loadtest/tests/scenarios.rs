//! Every scenario against a real node started in this process (port 0, data
//! in a temporary directory), with small counts, checking what the report
//! says: nothing lost when nothing is, an injected loss reported as lost and
//! an injected duplicate as duplicate, worker processes merged.

use std::net::SocketAddr;
use std::path::PathBuf;

use chorus_loadtest::cli::{ChatArgs, ConnectArgs, FanoutArgs, IdleArgs, NotifyArgs, PresenceArgs};
use chorus_loadtest::{CommonArgs, Report, RunOptions, RunSpec, Scenario};
use tempfile::TempDir;

const SECRET: &str = "loadtest-test-secret";
const API_KEY: &str = "loadtest-test-api-key";

struct Node {
    handle: chorus_node::NodeHandle,
    _dir: TempDir,
}

impl Node {
    async fn start() -> Node {
        let dir = TempDir::new().unwrap();
        let mut config = chorus_node::Config::default();
        config.node.listen = "127.0.0.1:0".into();
        config.auth.jwt_secret = SECRET.into();
        config.auth.api_key = API_KEY.into();
        config.storage.embedded.path = dir.path().to_path_buf();
        let handle = chorus_node::start(config).await.unwrap();
        Node { handle, _dir: dir }
    }

    fn addr(&self) -> SocketAddr {
        self.handle.http_addr()
    }

    async fn stop(self) {
        self.handle.shutdown().await.unwrap();
    }
}

fn spec(node: &Node, scenario: Scenario) -> RunSpec {
    let mut common = CommonArgs::for_target(&node.addr().to_string()).unwrap();
    common.jwt_secret = SECRET.into();
    common.api_key = API_KEY.into();
    common.sources = 3;
    common.progress_secs = 0.0;
    common.drain_secs = 15.0;
    common.max_seconds = 60.0;
    RunSpec { common, scenario }
}

fn options() -> RunOptions {
    RunOptions {
        exe: Some(PathBuf::from(env!("CARGO_BIN_EXE_chorus-loadtest"))),
        progress: false,
    }
}

async fn run(spec: RunSpec) -> Report {
    let report = chorus_loadtest::run(spec, &options()).await.unwrap();
    println!("{}", report.summary());
    report
}

fn count(r: &Report, name: &str) -> u64 {
    r.counts.get(name).copied().unwrap_or(0)
}

fn samples(r: &Report, lat: &str) -> u64 {
    r.latency_ms.get(lat).map(|p| p.count).unwrap_or(0)
}

fn fanout(rooms: u64, subscribers: u64, publishers: u64, messages: u64, rate: f64) -> FanoutArgs {
    FanoutArgs {
        rooms,
        subscribers,
        publishers,
        messages,
        rate,
        max_inflight: 8,
        duration_secs: 30.0,
        payload_bytes: 16,
        join: false,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_opens_every_connection_from_several_sources() {
    let node = Node::start().await;
    let args = ConnectArgs {
        connections: 60,
        users: None,
        rate: 0.0,
        hold_secs: 0.0,
        duration_secs: 30.0,
    };
    let r = run(spec(&node, Scenario::Connect(args))).await;
    assert_eq!(count(&r, "conn_opened"), 60);
    assert_eq!(count(&r, "conn_failed"), 0);
    assert_eq!(count(&r, "conn_closed"), 60);
    assert_eq!(samples(&r, "handshake"), 60);
    assert_eq!(r.sources, vec!["127.0.0.2", "127.0.0.3", "127.0.0.4"]);
    assert!(r.throughput_per_sec["connects_per_sec"] > 0.0);
    assert!(r.errors.is_empty(), "{:?}", r.errors);
    assert_ne!(r.git_revision, "");
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_over_worker_processes_merges_their_histograms() {
    let node = Node::start().await;
    let args = ConnectArgs {
        connections: 41,
        users: Some(7),
        rate: 200.0,
        hold_secs: 0.0,
        duration_secs: 30.0,
    };
    let mut s = spec(&node, Scenario::Connect(args));
    s.common.workers = 3;
    let r = run(s).await;
    assert_eq!(r.workers, 3);
    assert_eq!(count(&r, "conn_opened"), 41);
    assert_eq!(
        samples(&r, "handshake"),
        41,
        "one merged histogram holding every worker's samples"
    );
    // Three workers and the coordinator.
    assert_eq!(r.client_cpu.processes, 4);
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_stay_up_and_answer_pings() {
    let node = Node::start().await;
    let args = IdleArgs {
        connections: 30,
        users: None,
        rate: 0.0,
        hold_secs: 1.0,
        ping_secs: 0.25,
    };
    let r = run(spec(&node, Scenario::Idle(args))).await;
    assert_eq!(count(&r, "stayed_up"), 30);
    assert_eq!(count(&r, "conn_dropped"), 0);
    assert!(count(&r, "pings") >= 30, "{:?}", r.counts);
    assert_eq!(count(&r, "pongs"), count(&r, "pings"));
    assert_eq!(samples(&r, "ping_rtt"), count(&r, "pongs"));
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fanout_delivers_every_message_once_and_in_order() {
    let node = Node::start().await;
    let r = run(spec(&node, Scenario::Fanout(fanout(2, 4, 1, 25, 0.0)))).await;
    assert_eq!(count(&r, "messages_acked"), 50);
    assert_eq!(
        count(&r, "deliveries"),
        2 * 4 * 25,
        "every subscriber got every message"
    );
    assert_eq!(samples(&r, "publish_to_delivery"), 200);
    assert_eq!(count(&r, "lost"), 0);
    assert_eq!(count(&r, "duplicates"), 0);
    assert_eq!(count(&r, "out_of_order"), 0);
    assert!(count(&r, "entries_expected") >= 200);
    assert_eq!(
        count(&r, "entries_delivered"),
        count(&r, "entries_expected")
    );
    assert!(r.errors.is_empty(), "{:?}", r.errors);
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fanout_reports_an_injected_loss_as_lost_and_a_repeat_as_duplicate() {
    let node = Node::start().await;
    let mut s = spec(&node, Scenario::Fanout(fanout(1, 3, 1, 20, 0.0)));
    s.common.inject_drop = Some(5);
    s.common.inject_duplicate = Some(9);
    let r = run(s).await;
    assert_eq!(count(&r, "lost"), 1);
    assert_eq!(count(&r, "duplicates"), 1);
    assert_eq!(count(&r, "out_of_order"), 0);
    assert_eq!(
        count(&r, "entries_delivered"),
        count(&r, "entries_expected") - 1
    );
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fanout_over_worker_processes_in_messagepack() {
    let node = Node::start().await;
    // 4 publishers at 80 messages per second in all: 20 per second each.
    let mut s = spec(&node, Scenario::Fanout(fanout(2, 5, 2, 10, 80.0)));
    s.common.workers = 2;
    s.common.encoding = chorus_loadtest::cli::Enc::Msgpack;
    let r = run(s).await;
    assert_eq!(r.workers, 2);
    assert_eq!(count(&r, "messages_acked"), 40);
    assert_eq!(count(&r, "deliveries"), 2 * 5 * 2 * 10);
    assert_eq!(count(&r, "lost"), 0);
    assert_eq!(count(&r, "duplicates"), 0);
    assert_eq!(count(&r, "out_of_order"), 0);
    assert_eq!(samples(&r, "publish_to_delivery"), 200);
    // Paced sends leave when due, not when the in-flight window fills up
    // (at 20 per second per publisher, a window of 8 would hold each send
    // about 350 ms past its schedule, and latency counts from the schedule).
    let delivery = &r.latency_ms["publish_to_delivery"];
    assert!(delivery.p90 < 200.0, "{delivery:?}");
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_in_direct_and_group_rooms() {
    let node = Node::start().await;
    for (rooms, size) in [(4, 2), (2, 3)] {
        let args = ChatArgs {
            rooms,
            room_size: size,
            messages: 5,
            rate: 20.0,
            typing: 1.0,
            read: 1.0,
            duration_secs: 30.0,
        };
        let r = run(spec(&node, Scenario::Chat(args))).await;
        let sent = rooms * size * 5;
        assert_eq!(count(&r, "messages_acked"), sent, "rooms of {size}");
        assert_eq!(
            count(&r, "deliveries"),
            sent * (size - 1),
            "each message reached the other members"
        );
        assert_eq!(count(&r, "lost"), 0);
        assert_eq!(count(&r, "duplicates"), 0);
        assert_eq!(count(&r, "out_of_order"), 0);
        assert_eq!(count(&r, "typing_sent"), sent);
        assert!(count(&r, "typing_seen") > 0, "{:?}", r.counts);
        assert!(count(&r, "reads_sent") > 0, "{:?}", r.counts);
        assert!(count(&r, "receipts_seen") > 0, "{:?}", r.counts);
        assert_eq!(count(&r, "receipts_seen"), count(&r, "receipts_expected"));
        assert!(count(&r, "receipts_expected") <= count(&r, "reads_sent") * (size - 1));
        assert_eq!(samples(&r, "typing"), count(&r, "typing_seen"));
        assert_eq!(samples(&r, "receipt"), count(&r, "receipts_seen"));
    }
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_changes_reach_every_watcher() {
    let node = Node::start().await;
    let args = PresenceArgs {
        users: 3,
        watchers: 2,
        cycles: 2,
        online_ms: 50,
        offline_ms: 50,
        change_timeout_secs: 10.0,
    };
    let r = run(spec(&node, Scenario::Presence(args))).await;
    // 3 users × 2 cycles × (online + offline) × 2 watchers.
    assert_eq!(count(&r, "presence_expected"), 24);
    assert_eq!(count(&r, "presence_seen"), 24, "{:?}", r.counts);
    assert_eq!(count(&r, "presence_missed"), 0);
    assert_eq!(samples(&r, "presence_online"), 12);
    assert_eq!(samples(&r, "presence_offline"), 12);
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notify_bursts_reach_every_user_once() {
    let node = Node::start().await;
    let args = NotifyArgs {
        users: 12,
        bursts: 3,
        per_user: 2,
        batch: 5,
        interval_ms: 100,
        api_concurrency: 2,
        priority: "normal".into(),
    };
    let r = run(spec(&node, Scenario::Notify(args))).await;
    assert_eq!(count(&r, "notifications_created"), 72);
    assert_eq!(count(&r, "notifications_expected"), 72);
    assert_eq!(count(&r, "notifications_delivered"), 72);
    assert_eq!(count(&r, "notifications_lost"), 0);
    assert_eq!(count(&r, "notifications_duplicates"), 0);
    assert_eq!(count(&r, "api_errors"), 0);
    assert_eq!(samples(&r, "notify_delivery"), 72);
    assert!(samples(&r, "notify_api") >= 1);
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_baseline_measures_the_bundled_server_in_the_same_run() {
    let node = Node::start().await;
    let args = ConnectArgs {
        connections: 20,
        users: None,
        rate: 0.0,
        hold_secs: 0.0,
        duration_secs: 30.0,
    };
    let mut s = spec(&node, Scenario::Connect(args));
    s.common.with_baseline = true;
    let r = run(s).await;
    let base = r.baseline.as_ref().expect("a baseline report");
    assert_eq!(count(base, "conn_opened"), 20);
    assert!(
        base.server.as_ref().is_some_and(|s| s.rss_before_kib > 0),
        "the baseline process was sampled"
    );
    assert!(
        r.ratio_to_baseline
            .contains_key("throughput_per_sec.connects_per_sec"),
        "{:?}",
        r.ratio_to_baseline
    );
    node.stop().await;
}

#[tokio::test]
async fn targets_outside_loopback_are_refused() {
    let mut common = CommonArgs::for_target("192.168.1.10:7600").unwrap();
    common.progress_secs = 0.0;
    let args = ConnectArgs {
        connections: 1,
        users: None,
        rate: 0.0,
        hold_secs: 0.0,
        duration_secs: 1.0,
    };
    let err = chorus_loadtest::run(
        RunSpec {
            common,
            scenario: Scenario::Connect(args),
        },
        &options(),
    )
    .await
    .unwrap_err();
    assert!(err.to_string().contains("127.0.0.0/8"), "{err:#}");
}
