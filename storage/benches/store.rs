//! Storage benchmark: message append and history-page throughput with p50 /
//! p99 latency, for the embedded backend and (when `CHORUS_CQL` is set) the
//! ScyllaDB backend, printed as one table with the ratio of the two.
//!
//! ```text
//! cargo bench -p chorus-storage --bench store
//! scripts/cassandra.sh start && CHORUS_CQL=127.0.0.1:9042 cargo bench -p chorus-storage --bench store
//! ```
//!
//! Bounded in count and time: each scenario stops after `CHORUS_BENCH_CALLS`
//! calls (default 20000) or `CHORUS_BENCH_SECS` seconds (default 10),
//! whichever comes first, after an unmeasured warm-up of at most
//! `CHORUS_BENCH_WARMUP_SECS` (default 3). The ScyllaDB run uses a fresh
//! keyspace and drops it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chorus_storage::embedded::{EmbeddedConfig, EmbeddedStore};
use chorus_storage::scylla::{ScyllaConfig, ScyllaStore};
use chorus_storage::{Entry, EntryKind, Store};
use hdrhistogram::Histogram;

/// Concurrent callers in every scenario (a node's room actors, say).
const CONCURRENCY: usize = 16;
/// Entries of the channel the history scenario pages through.
const HISTORY: u64 = 5000;
/// Entries per history page.
const PAGE: usize = 50;

struct Limits {
    calls: u64,
    time: Duration,
    warmup: Duration,
}

struct Outcome {
    calls: u64,
    items: u64,
    elapsed: Duration,
    latency_us: Histogram<u64>,
}

impl Outcome {
    fn per_sec(&self) -> f64 {
        self.items as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
    fn ms(&self, q: f64) -> f64 {
        self.latency_us.value_at_quantile(q) as f64 / 1000.0
    }
}

fn entry(offset: u64, i: usize) -> Entry {
    let mut e = Entry::new(
        offset,
        EntryKind::Message,
        offset,
        1_700_000_000_000 + offset as i64,
    );
    e.sender = Some(format!("user{i}"));
    e.client_id = Some(format!("c{i}-{offset}"));
    e.text = Some(format!(
        "message {offset} from user{i}: a typical short chat line of text"
    ));
    e
}

fn histogram() -> Histogram<u64> {
    // 1 µs .. 60 s at 3 significant digits; the bounds are constants.
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid histogram bounds")
}

/// `CONCURRENCY` appenders, each on its own channel, appending `batch`
/// entries per call until the shared call budget or the time runs out.
async fn appends(store: Arc<dyn Store>, tag: &str, batch: usize, limits: &Limits) -> Outcome {
    let calls = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let deadline = started + limits.time;
    let mut tasks = Vec::new();
    for i in 0..CONCURRENCY {
        let (store, calls, budget) = (Arc::clone(&store), Arc::clone(&calls), limits.calls);
        let channel = format!("room:bench-{tag}-{batch}-{i}");
        tasks.push(tokio::spawn(async move {
            store
                .create_channel(&channel, "bench")
                .await
                .expect("create_channel");
            let mut hist = histogram();
            let mut next = 1u64;
            while Instant::now() < deadline && calls.fetch_add(1, Ordering::Relaxed) < budget {
                let entries: Vec<Entry> =
                    (next..next + batch as u64).map(|o| entry(o, i)).collect();
                let t0 = Instant::now();
                store.append(&channel, &entries).await.expect("append");
                hist.record(t0.elapsed().as_micros().max(1) as u64)
                    .expect("in histogram range");
                next += batch as u64;
            }
            hist
        }));
    }
    let mut latency_us = histogram();
    for task in tasks {
        latency_us
            .add(task.await.expect("appender"))
            .expect("same bounds");
    }
    let calls = latency_us.len();
    Outcome {
        calls,
        items: calls * batch as u64,
        elapsed: started.elapsed(),
        latency_us,
    }
}

/// Fills one channel, then `CONCURRENCY` readers fetch pages of `PAGE`
/// entries ending at pseudo-random offsets.
async fn history_pages(store: Arc<dyn Store>, limits: &Limits) -> Outcome {
    let channel = "room:bench-history";
    store
        .create_channel(channel, "bench")
        .await
        .expect("create_channel");
    let mut next = 1;
    while next <= HISTORY {
        let end = (next + 249).min(HISTORY);
        let entries: Vec<Entry> = (next..=end).map(|o| entry(o, 0)).collect();
        store.append(channel, &entries).await.expect("prefill");
        next = end + 1;
    }
    let calls = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let deadline = started + limits.time;
    let mut tasks = Vec::new();
    for i in 0..CONCURRENCY {
        let (store, calls, budget) = (Arc::clone(&store), Arc::clone(&calls), limits.calls);
        tasks.push(tokio::spawn(async move {
            let mut hist = histogram();
            let mut x = 0x9e37_79b9_7f4a_7c15u64 ^ i as u64;
            while Instant::now() < deadline && calls.fetch_add(1, Ordering::Relaxed) < budget {
                // xorshift: a spread of page ends without a shared RNG.
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let before = PAGE as u64 + 1 + x % (HISTORY - PAGE as u64);
                let t0 = Instant::now();
                let page = store
                    .read_before(channel, before, PAGE)
                    .await
                    .expect("read_before");
                hist.record(t0.elapsed().as_micros().max(1) as u64)
                    .expect("in histogram range");
                assert_eq!(page.len(), PAGE, "a full page below {before}");
            }
            hist
        }));
    }
    let mut latency_us = histogram();
    for task in tasks {
        latency_us
            .add(task.await.expect("reader"))
            .expect("same bounds");
    }
    let calls = latency_us.len();
    Outcome {
        calls,
        items: calls,
        elapsed: started.elapsed(),
        latency_us,
    }
}

const SCENARIOS: [(&str, &str); 3] = [
    ("append, 1 entry/call", "msgs/s"),
    ("append, 16 entries/call", "msgs/s"),
    ("history page of 50", "pages/s"),
];

async fn run_all(store: Arc<dyn Store>, tag: &str, limits: &Limits) -> Vec<Outcome> {
    // Unmeasured warm-up: connection pools, caches, and a JVM server's JIT.
    let warmup = Limits {
        calls: limits.calls.min(2000),
        time: limits.warmup,
        warmup: Duration::ZERO,
    };
    appends(Arc::clone(&store), &format!("{tag}w"), 4, &warmup).await;
    vec![
        appends(Arc::clone(&store), tag, 1, limits).await,
        appends(Arc::clone(&store), tag, 16, limits).await,
        history_pages(store, limits).await,
    ]
}

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    // `cargo bench` passes `--bench`; a filter argument is not supported.
    let limits = Limits {
        calls: env_u64("CHORUS_BENCH_CALLS", 20_000),
        time: Duration::from_secs(env_u64("CHORUS_BENCH_SECS", 10)),
        warmup: Duration::from_secs(env_u64("CHORUS_BENCH_WARMUP_SECS", 3)),
    };
    println!(
        "storage benchmark: {CONCURRENCY} concurrent callers, at most {} calls or {}s per scenario",
        limits.calls,
        limits.time.as_secs()
    );

    let dir = tempfile::tempdir().expect("temporary directory");
    let embedded_config = EmbeddedConfig {
        path: dir.path().join("store"),
        ..EmbeddedConfig::default()
    };
    let embedded: Arc<dyn Store> =
        Arc::new(EmbeddedStore::open(&embedded_config).expect("open embedded store"));
    let mut results = vec![(
        "embedded",
        run_all(Arc::clone(&embedded), "e", &limits).await,
    )];
    embedded.flush().await.expect("flush");
    drop(embedded);

    match std::env::var("CHORUS_CQL").ok().filter(|a| !a.is_empty()) {
        None => {
            println!("scylla: skipped (set CHORUS_CQL=127.0.0.1:9042, scripts/cassandra.sh start)")
        }
        Some(addr) => {
            let keyspace = format!("chorus_bench_{:08x}", rand::random::<u32>());
            let config = ScyllaConfig {
                contact_points: vec![addr],
                keyspace: keyspace.clone(),
                request_timeout_ms: 20_000,
                ..ScyllaConfig::default()
            };
            let store = Arc::new(
                ScyllaStore::connect(&config)
                    .await
                    .expect("connect to the CQL server"),
            );
            let outcomes = run_all(Arc::clone(&store) as Arc<dyn Store>, "s", &limits).await;
            results.push(("scylla", outcomes));
            let drop_ks = format!("DROP KEYSPACE IF EXISTS {keyspace}");
            if let Err(e) = store.session().query_unpaged(drop_ks, &[]).await {
                eprintln!("could not drop {keyspace}: {e}");
            }
        }
    }

    println!();
    println!(
        "| {:<9} | {:<24} | {:>7} | {:>14} | {:>9} | {:>9} |",
        "backend", "scenario", "calls", "throughput", "p50 ms", "p99 ms"
    );
    println!(
        "|{:-<11}|{:-<26}|{:->9}|{:->16}|{:->11}|{:->11}|",
        "", "", "", "", "", ""
    );
    for (backend, outcomes) in &results {
        for ((name, unit), o) in SCENARIOS.iter().zip(outcomes) {
            println!(
                "| {:<9} | {:<24} | {:>7} | {:>14} | {:>9.2} | {:>9.2} |",
                backend,
                name,
                o.calls,
                format!("{:.0} {unit}", o.per_sec()),
                o.ms(0.5),
                o.ms(0.99)
            );
        }
    }
    if let [(_, embedded), (_, scylla)] = results.as_slice() {
        println!();
        println!("embedded / scylla:");
        for ((name, _), (e, s)) in SCENARIOS.iter().zip(embedded.iter().zip(scylla)) {
            println!(
                "  {name:<24} throughput x{:.1}, p99 latency x{:.2}",
                e.per_sec() / s.per_sec().max(1e-9),
                e.ms(0.99) / s.ms(0.99).max(1e-9)
            );
        }
    }
}
