//! The bundled baseline server, driven by the harness like a node: it must
//! be a correct floor for the ratios the benchmarks give.

use std::path::PathBuf;

use chorus_loadtest::cli::{FanoutArgs, IdleArgs};
use chorus_loadtest::{CommonArgs, Report, RunOptions, RunSpec, Scenario};
use tokio::net::TcpListener;
use tokio::sync::oneshot;

struct Baseline {
    addr: std::net::SocketAddr,
    stop: oneshot::Sender<()>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

async fn start() -> Baseline {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(chorus_loadtest::baseline::serve(listener, async move {
        let _ = stopped.await;
    }));
    Baseline { addr, stop, task }
}

async fn run(b: &Baseline, scenario: Scenario, workers: usize) -> Report {
    let mut common = CommonArgs::for_target(&b.addr.to_string()).unwrap();
    common.progress_secs = 0.0;
    common.workers = workers;
    common.max_seconds = 60.0;
    let opts = RunOptions {
        exe: Some(PathBuf::from(env!("CARGO_BIN_EXE_chorus-loadtest"))),
        progress: false,
    };
    let r = chorus_loadtest::run(RunSpec { common, scenario }, &opts)
        .await
        .unwrap();
    println!("{}", r.summary());
    r
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fanout_through_the_baseline_loses_nothing() {
    let b = start().await;
    let args = FanoutArgs {
        rooms: 2,
        subscribers: 10,
        publishers: 2,
        messages: 30,
        rate: 0.0,
        max_inflight: 8,
        duration_secs: 30.0,
        payload_bytes: 32,
        join: false,
    };
    let r = run(&b, Scenario::Fanout(args), 2).await;
    assert_eq!(r.counts["messages_acked"], 120);
    assert_eq!(r.counts["deliveries"], 2 * 10 * 2 * 30);
    assert_eq!(r.counts["lost"], 0);
    assert_eq!(r.counts["duplicates"], 0);
    assert_eq!(r.counts["out_of_order"], 0);
    b.stop.send(()).unwrap();
    b.task.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_through_the_baseline_answer_pings() {
    let b = start().await;
    let args = IdleArgs {
        connections: 25,
        users: None,
        rate: 0.0,
        hold_secs: 0.5,
        ping_secs: 0.2,
    };
    let r = run(&b, Scenario::Idle(args), 1).await;
    assert_eq!(r.counts["stayed_up"], 25);
    assert!(r.counts["pongs"] > 0);
    assert_eq!(r.counts["pongs"], r.counts["pings"]);
    b.stop.send(()).unwrap();
    b.task.await.unwrap().unwrap();
}
